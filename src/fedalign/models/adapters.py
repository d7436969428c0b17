"""Architecture adapters: the one place that knows where routers and experts live.

An adapter scans a model's modules and returns, for every MoE layer, a
:class:`~fedalign.moe.MoELayerLayout` (router tensors, per-expert slices) and a
:class:`~fedalign.models.capture.RouterTap` (router module and how to read its logits).
Supporting a new architecture means adding one small :class:`MoEAdapter` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedalign.models.capture import RouterTap
from fedalign.models.upcycle import UpcycledMoE
from fedalign.moe.layout import ExpertSlice, MoELayerLayout, MoELayout

Tensor = torch.Tensor


@dataclass(frozen=True)
class MoEAdapter:
    """How to find the MoE blocks of one family of architectures.

    Parameters
    ----------
    name : str
        Architecture family name (for messages and records).
    is_moe_block : callable
        True for a module that is one MoE block.
    describe : callable
        ``(module_name, module) -> (MoELayerLayout, RouterTap)`` for an MoE block.
    """

    name: str
    is_moe_block: Callable[[nn.Module], bool]
    describe: Callable[[str, Any], tuple[MoELayerLayout, RouterTap]]

    def scan(self, model: nn.Module) -> tuple[MoELayout, list[RouterTap]]:
        layers: list[MoELayerLayout] = []
        taps: list[RouterTap] = []
        for module_name, module in model.named_modules():
            if self.is_moe_block(module):
                layout, tap = self.describe(module_name, module)
                layers.append(layout)
                taps.append(tap)
        if not layers:
            raise ValueError(f"no MoE layer found for architecture {self.name!r}")
        return MoELayout(layers=tuple(layers)), taps


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _router(block_name: str, path: str, module: nn.Module) -> tuple[Any, str]:
    """The module holding a router's tensors and its name.

    peft LoRA on the router itself (``lora_targets`` naming it) moves its tensors to
    ``<path>.base_layer``; the layout must name the tensors that exist.
    """
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module):
        return base, _join(block_name, f"{path}.base_layer")
    return module, _join(block_name, path)


def _first(output: Any) -> Tensor:
    logits: Tensor = output[0] if isinstance(output, tuple) else output
    return logits


# --- transformers 5 fused experts: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, ... -----------------
def _is_fused_block(module: nn.Module) -> bool:
    gate = getattr(module, "gate", None)
    experts = getattr(module, "experts", None)
    return (
        gate is not None
        and experts is not None
        and isinstance(getattr(gate, "weight", None), nn.Parameter)
        and isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter)
    )


def _describe_fused(name: str, block: Any) -> tuple[MoELayerLayout, RouterTap]:
    gate, gate_name = _router(name, "gate", block.gate)
    experts = block.experts
    num_experts, hidden_size = gate.weight.shape
    router_params = [f"{gate_name}.weight"]
    if isinstance(getattr(gate, "bias", None), nn.Parameter):
        router_params.append(f"{gate_name}.bias")
    # every expert tensor is stored (E, ...): expert e is row e of dimension 0
    expert_tensors = [
        _join(name, f"experts.{pname}")
        for pname, param in experts.named_parameters(recurse=False)
        if param.shape[0] == num_experts
    ]
    layout = MoELayerLayout(
        name=name,
        num_experts=int(num_experts),
        top_k=int(getattr(gate, "top_k", 1)),
        hidden_size=int(hidden_size),
        router_params=tuple(router_params),
        experts=tuple(
            tuple(ExpertSlice(p, e, e + 1) for p in expert_tensors) for e in range(num_experts)
        ),
    )
    return layout, RouterTap(layer=name, module=block.gate, logits_from_output=_first)


FUSED = MoEAdapter("fused-experts", _is_fused_block, _describe_fused)


# --- Switch Transformers: one DenseActDense per expert ------------------------------------
def _is_switch_block(module: nn.Module) -> bool:
    router = getattr(module, "router", None)
    return router is not None and hasattr(router, "classifier") and hasattr(module, "experts")


def _describe_switch(name: str, block: Any) -> tuple[MoELayerLayout, RouterTap]:
    classifier, classifier_name = _router(name, "router.classifier", block.router.classifier)
    num_experts = int(classifier.out_features)
    router_params = [f"{classifier_name}.weight"]
    if classifier.bias is not None:
        router_params.append(f"{classifier_name}.bias")
    experts = []
    for e in range(num_experts):
        expert_module = block.experts[f"expert_{e}"]
        experts.append(
            tuple(
                ExpertSlice(_join(name, f"experts.expert_{e}.{pname}"))
                for pname, _ in expert_module.named_parameters()
            )
        )
    layout = MoELayerLayout(
        name=name,
        num_experts=num_experts,
        top_k=1,
        hidden_size=int(classifier.in_features),
        router_params=tuple(router_params),
        experts=tuple(experts),
    )
    # the Switch router returns (dispatch mask, top probability, router logits)
    return layout, RouterTap(
        layer=name, module=block.router, logits_from_output=lambda output: output[2]
    )


SWITCH = MoEAdapter("switch", _is_switch_block, _describe_switch)


# --- our sparsely upcycled encoders -------------------------------------------------------
def _describe_upcycled(name: str, block: Any) -> tuple[MoELayerLayout, RouterTap]:
    assert isinstance(block, UpcycledMoE)
    router, router_name = _router(name, "router", block.router)
    experts = []
    for e, expert in enumerate(block.experts):
        experts.append(
            tuple(
                ExpertSlice(_join(name, f"experts.{e}.{pname}"))
                for pname, _ in expert.named_parameters()
            )
        )
    layout = MoELayerLayout(
        name=name,
        num_experts=block.num_experts,
        top_k=block.top_k,
        hidden_size=int(router.in_features),
        router_params=(f"{router_name}.weight",),
        experts=tuple(experts),
    )
    return layout, RouterTap(layer=name, module=block.router, logits_from_output=_first)


UPCYCLED = MoEAdapter("upcycled", lambda m: isinstance(m, UpcycledMoE), _describe_upcycled)

ADAPTERS = (UPCYCLED, FUSED, SWITCH)


def scan_moe(model: nn.Module) -> tuple[MoELayout, list[RouterTap]]:
    """Find the MoE layers of ``model`` with the first adapter that recognises it."""
    for adapter in ADAPTERS:
        if any(adapter.is_moe_block(m) for m in model.modules()):
            return adapter.scan(model)
    raise ValueError(
        f"no MoE layer recognised in {type(model).__name__}; adapters: {[a.name for a in ADAPTERS]}"
    )
