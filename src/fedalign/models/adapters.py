"""Architecture adapters: the one place that knows where routers and experts live.

An adapter scans a model's modules and returns, for every MoE layer, a
:class:`~fedalign.moe.MoELayerLayout` (router tensors, per-expert slices) and a
:class:`~fedalign.models.capture.RouterTap` (router module and how to read its logits).
Supporting a new architecture means adding one small :class:`MoEAdapter` here.

Dedicated adapters, tried in this order (the first that recognises any module of a model
describes all of it):

* ``upcycled``: our sparsely upcycled / MoEfied BERT-style encoders;
* ``fused-experts``: transformers-5 blocks with a ``gate`` holding the router weight
  ``(E, H)`` and an ``experts`` module holding every expert in ``(E, ...)`` tensors. This
  one layout covers Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2 and DeepSeek-V3.
  Shared experts (Qwen2-MoE's ``shared_expert`` and ``shared_expert_gate``, DeepSeek's
  ``shared_experts``) live in the block but are not routed experts: they are not listed
  and are aggregated like any other parameter. The DeepSeek gate computes
  ``router_logits = hidden @ W.T`` (float32) and then scores them (V2: softmax, V3:
  sigmoid plus the ``e_score_correction_bias`` buffer), keeps the ``topk_group`` best of
  ``n_group`` expert groups and takes ``num_experts_per_tok`` experts among those. The
  tap captures ``router_logits``, before scoring, bias and grouping: the only part that
  is a differentiable function of the router's parameters, so the routing regulariser
  and the load-balancing loss train the router through it; statistics take softmax and
  top-k over it, which describes the router's preference (it can differ from the
  experts a grouped, biased selection actually runs);
* ``switch``: Switch Transformers (``router.classifier`` and one module per expert), in
  the encoder and, when a full ``ForConditionalGeneration`` model is scanned, in the
  decoder too.

When none of them matches, :data:`GENERIC` looks for the usual shape of an MoE block (a
router ``Linear(H, E)`` beside ``E`` experts, fused or listed; :func:`match_generic`), so
that families nobody wrote an adapter for (GraniteMoE, PhiMoE, JetMoE, ...) work, and a
model without one fails with a message saying what was looked for and what was found.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedalign.models.block import UpcycledMoE
from fedalign.models.capture import RouterTap
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
        inside: tuple[str, ...] = ()  # blocks found so far: their submodules are theirs
        for module_name, module in model.named_modules():
            if module_name.startswith(inside):
                continue
            if self.is_moe_block(module):
                layout, tap = self.describe(module_name, module)
                layers.append(layout)
                taps.append(tap)
                inside = (*inside, f"{module_name}." if module_name else "")
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
    # the tap is the router's linear classifier, whose output is the raw logits (E per
    # token): the router's own return value is (dispatch mask, top probability, logits) in
    # transformers 5.23 but (top probability, dispatch mask, max probability) in 5.17
    tap = block.router.classifier  # a LoRA wrapper when peft wraps it: its output has the delta
    return layout, RouterTap(layer=name, module=tap, logits_from_output=_first)


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


# --- generic: a router (E, H) beside E experts, fused or listed ---------------------------
@dataclass(frozen=True)
class GenericMatch:
    """What :func:`match_generic` found in one block (paths relative to the block).

    Parameters
    ----------
    router_path : str
        The router module, e.g. ``"router"`` or ``"router.layer"`` (JetMoE).
    router : nn.Module
        That module: its ``weight`` is ``(E, H)`` and it is hooked for the logits.
    num_experts, hidden_size : int
        ``E`` and ``H``.
    expert_tensors : tuple of str
        Fused storage: tensors with one row per expert on dimension 0.
    expert_modules : tuple of str
        Listed storage: the ``E`` expert modules in routing order (``experts.0``, ...).
    """

    router_path: str
    router: nn.Module
    num_experts: int
    hidden_size: int
    expert_tensors: tuple[str, ...] = ()
    expert_modules: tuple[str, ...] = ()


def _router_weight(module: nn.Module) -> Tensor | None:
    """The ``(E, H)`` weight of a router-shaped module (E >= 2), else None."""
    if isinstance(module, nn.Embedding):
        return None
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.ndim == 2 and weight.shape[0] >= 2:
        return weight
    return None


def _router_candidates(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children with a 2-D weight, else such a grandchild that is all its parent holds.

    The second case is a gating module wrapped around its ``Linear`` (JetMoE's
    ``router.layer``); a child holding more than that is a block or a layer, not a router.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, child in block.named_children():
        if _router_weight(child) is not None:
            found.append((name, child))
            continue
        inner = [(n, m) for n, m in child.named_children() if _router_weight(m) is not None]
        if len(inner) == 1:
            path, grandchild = inner[0]
            own = {id(p) for p in child.parameters()}
            if own == {id(p) for p in grandchild.parameters()}:
                found.append((f"{name}.{path}", grandchild))
    return found


def _fused_tensors(block: nn.Module, skip: str, num_experts: int) -> list[str]:
    """Parameters that hold every expert on dimension 0 (at least one of them 3-D or more)."""
    tensors = [
        name
        for name, param in block.named_parameters(recurse=False)
        if param.ndim >= 3 and param.shape[0] == num_experts
    ]
    for child_name, child in block.named_children():
        if child_name == skip:
            continue
        own = list(child.named_parameters(recurse=False))
        if any(p.ndim >= 3 and p.shape[0] == num_experts for _, p in own):
            tensors += [f"{child_name}.{n}" for n, p in own if p.shape[0] == num_experts]
    return tensors


def _listed_experts(block: nn.Module, num_experts: int) -> list[list[str]]:
    """Per ModuleList/ModuleDict child of ``E`` structurally identical modules: their paths."""
    lists: list[list[str]] = []
    for child_name, child in block.named_children():
        if not isinstance(child, (nn.ModuleList, nn.ModuleDict)) or len(child) != num_experts:
            continue
        items = list(child.named_children())
        shapes = [[(n, tuple(p.shape)) for n, p in m.named_parameters()] for _, m in items]
        if shapes[0] and all(s == shapes[0] for s in shapes):
            lists.append([f"{child_name}.{key}" for key, _ in items])
    return lists


def match_generic(block: nn.Module) -> GenericMatch | None:
    """The generic MoE shape in ``block``, or None.

    A block matches when one child (or the only parameterised child of a child) has a 2-D
    ``weight`` ``(E, H)`` with ``E >= 2`` -- the router -- and, beside it, either fused
    expert tensors (parameters of the block or of one of its children with dimension 0
    equal to ``E``, at least one of them 3-D) or one ``nn.ModuleList`` / ``nn.ModuleDict``
    of ``E`` modules with identical parameter shapes; some expert tensor must have a
    dimension equal to ``H``. Expert ``e`` is row ``e`` of the fused tensors, or the
    ``e``-th listed module: the order the router's logit columns index them in every
    transformers family.

    Raises
    ------
    ValueError
        When the block matches more than one way (two routers, or fused and listed
        experts): guessing would silently mix experts up.
    """
    matches: list[GenericMatch] = []
    for path, router in _router_candidates(block):
        weight = _router_weight(router)
        assert weight is not None
        num_experts, hidden_size = int(weight.shape[0]), int(weight.shape[1])
        top = path.split(".")[0]
        fused = _fused_tensors(block, top, num_experts)
        listed = [
            paths for paths in _listed_experts(block, num_experts) if paths[0].split(".")[0] != top
        ]
        params = dict(block.named_parameters()) if fused else {}
        if fused and any(hidden_size in params[t].shape[1:] for t in fused):
            matches.append(
                GenericMatch(path, router, num_experts, hidden_size, expert_tensors=tuple(fused))
            )
        for paths in listed:
            shapes = [p.shape for p in block.get_submodule(paths[0]).parameters()]
            if any(hidden_size in shape for shape in shapes):
                matches.append(
                    GenericMatch(
                        path, router, num_experts, hidden_size, expert_modules=tuple(paths)
                    )
                )
    if len(matches) > 1:
        found = [
            f"router {m.router_path!r} (E={m.num_experts}) with "
            + (
                f"fused {list(m.expert_tensors)}"
                if m.expert_tensors
                else f"{m.num_experts} modules"
            )
            for m in matches
        ]
        raise ValueError(
            f"generic MoE adapter: {type(block).__name__} matches more than one way ({found}); "
            "write a dedicated adapter in fedalign.models.adapters"
        )
    return matches[0] if matches else None


TOP_K_KEYS = ("top_k", "num_experts_per_tok", "moe_topk", "num_selected_experts")
"""Attributes read for ``top_k``, on the router, the block, then their ``config``."""


def _generic_top_k(name: str, block: nn.Module, match: GenericMatch) -> int:
    owners: list[tuple[str, Any]] = [("router", match.router)]
    if "." in match.router_path:  # a gating module around the Linear (JetMoE)
        parent = match.router_path.rsplit(".", 1)[0]
        owners.append((parent, block.get_submodule(parent)))
    owners += [
        ("block", block),
        ("block.config", getattr(block, "config", None)),
        ("router.config", getattr(match.router, "config", None)),
    ]
    for _, owner in owners:
        for key in TOP_K_KEYS:
            value = getattr(owner, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                if not 1 <= value <= match.num_experts:
                    raise ValueError(
                        f"generic MoE adapter: block {name!r} has {key}={value}, outside "
                        f"[1, {match.num_experts}]"
                    )
                return value
    raise ValueError(
        f"generic MoE adapter: block {name!r} ({type(block).__name__}) has a router "
        f"{match.router_path!r} ({match.num_experts}, {match.hidden_size}) and its experts, "
        f"but no top-k: looked for {list(TOP_K_KEYS)} on {[o for o, _ in owners]}"
    )


def _logits_by_width(num_experts: int) -> Callable[[Any], Tensor]:
    """The router's logits: its output, or the first floating ``(..., E)`` tensor it returns."""

    def pick(output: Any) -> Tensor:
        if isinstance(output, Tensor):
            return output
        for item in output:
            is_float = isinstance(item, Tensor) and item.is_floating_point()
            if is_float and item.ndim >= 2 and item.shape[-1] == num_experts:
                return item
        raise ValueError(
            f"generic MoE adapter: the router returned no floating (..., {num_experts}) tensor"
        )

    return pick


def _is_generic_block(module: nn.Module) -> bool:
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return False  # containers hold blocks or experts, they are not blocks
    return match_generic(module) is not None


def _describe_generic(name: str, block: Any) -> tuple[MoELayerLayout, RouterTap]:
    match = match_generic(block)
    assert match is not None
    router, router_name = _router(name, match.router_path, match.router)
    router_params = [f"{router_name}.weight"]
    bias = getattr(router, "bias", None)
    if isinstance(bias, nn.Parameter) and bias.shape == (match.num_experts,):
        router_params.append(f"{router_name}.bias")
    experts: list[tuple[ExpertSlice, ...]] = []
    for e in range(match.num_experts):
        if match.expert_tensors:
            experts.append(
                tuple(ExpertSlice(_join(name, t), e, e + 1) for t in match.expert_tensors)
            )
        else:
            module = block.get_submodule(match.expert_modules[e])
            experts.append(
                tuple(
                    ExpertSlice(_join(name, f"{match.expert_modules[e]}.{pname}"))
                    for pname, _ in module.named_parameters()
                )
            )
    layout = MoELayerLayout(
        name=name,
        num_experts=match.num_experts,
        top_k=_generic_top_k(name, block, match),
        hidden_size=match.hidden_size,
        router_params=tuple(router_params),
        experts=tuple(experts),
    )
    return layout, RouterTap(
        layer=name, module=match.router, logits_from_output=_logits_by_width(match.num_experts)
    )


GENERIC = MoEAdapter("generic", _is_generic_block, _describe_generic)
"""Tried only when no dedicated adapter recognises any module of the model."""

ADAPTERS = (UPCYCLED, FUSED, SWITCH, GENERIC)


def _diagnose(model: nn.Module, limit: int = 3) -> str:
    """What a failed scan saw: router-shaped weights, expert-shaped tensors, module lists."""
    routers: list[str] = []
    stacked: list[str] = []
    lists: list[str] = []
    for module_name, module in model.named_modules():
        for path, router in _router_candidates(module):
            weight = _router_weight(router)
            assert weight is not None
            entry = f"{_join(module_name, path)} {tuple(weight.shape)}"
            if entry not in routers:  # a grandchild of one module is a child of the next
                routers.append(entry)
        for pname, param in module.named_parameters(recurse=False):
            if param.ndim >= 3:
                stacked.append(f"{_join(module_name, pname)} {tuple(param.shape)}")
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            lists.append(f"{module_name} ({len(module)} modules)")

    def some(items: list[str]) -> str:
        if not items:
            return "none"
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    return (
        f"2-D weights that could be routers: {some(routers)}; parameters with 3 or more "
        f"dimensions: {some(stacked)}; module lists: {some(lists)}"
    )


def find_adapter(model: nn.Module) -> MoEAdapter | None:
    """The first adapter of :data:`ADAPTERS` that recognises a module of ``model``, or None."""
    for adapter in ADAPTERS:
        if any(adapter.is_moe_block(m) for m in model.modules()):
            return adapter
    return None


def scan_moe(model: nn.Module) -> tuple[MoELayout, list[RouterTap]]:
    """Find the MoE layers of ``model`` with the first adapter that recognises it.

    Raises
    ------
    ValueError
        When no adapter recognises any module; the message says what the generic adapter
        looked for and what the model holds instead.
    """
    adapter = find_adapter(model)
    if adapter is not None:
        return adapter.scan(model)
    raise ValueError(
        f"no MoE layer recognised in {type(model).__name__}: the dedicated adapters "
        f"{[a.name for a in ADAPTERS if a is not GENERIC]} matched no module, and the generic "
        "adapter looked for a module with a router (a child, or the one parameterised child "
        "of a child, with a 2-D weight (E, H), E >= 2) beside either expert tensors of shape "
        "(E, ...) with 3 or more dimensions or an nn.ModuleList / nn.ModuleDict of E "
        "identical expert modules; found "
        f"{_diagnose(model)}"
    )
