"""LoRA with peft on MoE models: adapters on attention, experts and routers, and their view.

``model.trainable = "lora"`` wraps the classifier with peft (Hu et al. 2021):

* ``model.lora-targets``: ``target_modules`` (attention projections, ...);
* ``model.lora-experts = true``: one rank-``r`` adapter per routed expert. Fused expert
  tensors ``(E, out, in)`` (transformers 5: ``experts.gate_up_proj``, ``experts.down_proj``)
  are adapted with peft ``target_parameters`` (a ``ParamWrapper``; rank stacked per expert,
  see :mod:`fedalign.moe.lora`); per-expert linear layers (Switch, upcycled encoders) with
  ``target_modules``;
* ``model.lora-router``: the routers train fully (``full``), get LoRA (``lora``) or stay
  frozen (``frozen``).

:func:`lora_view` reads the wrapped model back into pure data: every LoRA pair as a
:class:`~fedalign.moe.lora.LoRAFactors` and, per MoE layer and expert, the
:class:`~fedalign.moe.lora.LoRAExpertSlice` objects whose updates ``s B_e A_e`` the
strategies work on. :func:`quantization_kwargs` gives ``from_pretrained`` its 4-bit
configuration (``model.quantize``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedalign.config import ConfigError, ModelConfig
from fedalign.models.capture import RouterTap
from fedalign.moe.layout import ExpertSlice, MoELayout
from fedalign.moe.lora import LoRAExpertSlice, LoRAFactors

ADAPTER = "default"
"""The peft adapter name this package creates and reads."""


# ------------------------------------------------------------------------ targeting
def _module_of(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def expert_targets(model: nn.Module, layout: MoELayout) -> tuple[list[str], list[str]]:
    """The routed experts' LoRA targets: ``(target_modules, target_parameters)``.

    Fused expert tensors (slices of dimension 0) become ``target_parameters``; whole-tensor
    experts become ``target_modules`` when their tensor is an ``nn.Linear``'s weight (their
    biases are not adapted). Full names, so only the MoE layers' experts match.

    Raises
    ------
    ConfigError
        When no expert tensor can take LoRA (naming ``model.lora-experts``).
    """
    modules = dict(model.named_modules())
    parameters: list[str] = []
    linears: list[str] = []
    for layer in layout.layers:
        for slices in layer.experts:
            for expert_slice in slices:
                if expert_slice.start is not None:
                    if expert_slice.param not in parameters:
                        parameters.append(expert_slice.param)
                    continue
                module_name, _, leaf = expert_slice.param.rpartition(".")
                module = modules.get(module_name)
                linear = leaf == "weight" and isinstance(module, nn.Linear)
                if linear and module_name not in linears:
                    linears.append(module_name)
    if not parameters and not linears:
        raise ConfigError(
            "model.lora-experts = true, but no expert tensor of this model can take LoRA "
            "(neither fused (E, out, in) expert tensors nor per-expert nn.Linear layers)"
        )
    return linears, parameters


def router_targets(model: nn.Module, layout: MoELayout) -> list[str]:
    """Modules holding the routers (for ``model.lora-router = "lora"``)."""
    names = []
    for layer in layout.layers:
        for name in layer.router_params:
            module = _module_of(name)
            if module not in names:
                names.append(module)
    return names


def lora_config(model: nn.Module, config: ModelConfig, layout: MoELayout) -> Any:
    """The peft ``LoraConfig`` for ``config`` (``layout``: the bare model's MoE view)."""
    from peft import LoraConfig

    if not config.lora_experts and config.lora_router != "lora":
        # exactly the adapters of before lora-experts / lora-router existed
        return LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            target_modules=list(config.lora_targets),
        )
    modules = list(config.lora_targets)
    parameters: list[str] = []
    if config.lora_experts:
        linears, parameters = expert_targets(model, layout)
        modules += linears
    if config.lora_router == "lora":
        modules += router_targets(model, layout)
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        target_modules=modules or None,
        target_parameters=parameters or None,
    )


def _error_key(config: ModelConfig) -> str:
    keys = ["model.lora-targets"]
    if config.lora_experts:
        keys.append("model.lora-experts")
    if config.lora_router == "lora":
        keys.append("model.lora-router")
    return " / ".join(keys)


def wrap_with_lora(
    model: nn.Module, config: ModelConfig, layout: MoELayout, trainable_extra: Sequence[str]
) -> tuple[nn.Module, dict[str, str]]:
    """``model`` wrapped by peft per ``config``, and its parameters' renaming.

    Parameters
    ----------
    model : nn.Module
        The bare classifier.
    config : ModelConfig
    layout : MoELayout
        The bare model's full MoE view.
    trainable_extra : sequence of str
        Bare names of the tensors that train fully next to the adapters (head, and the
        routers with ``lora-router = "full"``).

    Returns
    -------
    wrapped : nn.Module
    names : dict of str to str
        Bare parameter name -> name in the wrapped model (peft prefixes ``base_model.model.``
        and moves adapted tensors under ``base_layer``).
    """
    from peft import get_peft_model

    bare_names = {id(p): n for n, p in model.named_parameters()}
    try:
        wrapped = get_peft_model(model, lora_config(model, config, layout))
    except ValueError as error:
        raise ConfigError(f"{_error_key(config)} {config.lora_targets!r}: {error}") from error
    names = {bare_names[id(p)]: n for n, p in wrapped.named_parameters() if id(p) in bare_names}
    # a tensor peft adapted (moved under ``base_layer``) stays frozen: its adapter trains
    extra = {names[n] for n in trainable_extra if n in names and ".base_layer." not in names[n]}
    for name, param in wrapped.named_parameters():
        if name in extra:
            param.requires_grad_(True)
    return wrapped, names


def rewrap_taps(
    model: nn.Module, taps: Sequence[RouterTap], layer_names: Mapping[str, str]
) -> list[RouterTap]:
    """Taps on the bare routers moved to their outermost peft wrapper, if any, and their
    layers renamed by ``layer_names`` (bare module path -> wrapped module path).

    A LoRA ``nn.Linear`` wrapper adds its update after calling the base router, so a hook
    on the base module would miss it.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner: set[int] = set()
    wrappers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for module in wrappers:
        base = getattr(module, "base_layer", None)
        if isinstance(base, BaseTunerLayer):
            inner.add(id(base))
    outermost = {
        id(m.get_base_layer()): m for m in wrappers if id(m) not in inner
    }  # base module -> outermost wrapper
    return [
        dataclasses.replace(
            tap,
            layer=layer_names.get(tap.layer, tap.layer),
            module=outermost.get(id(tap.module), tap.module),
        )
        for tap in taps
    ]


# ----------------------------------------------------------------------------- view
def lora_view(model: nn.Module, layout: MoELayout) -> MoELayout:
    """``layout`` (of the wrapped model) with its LoRA pairs and LoRA experts filled in.

    Every peft LoRA layer with adapter :data:`ADAPTER` becomes a :class:`LoRAFactors`
    (:attr:`MoELayout.lora_modules`); an adapter on a fused expert tensor gives expert
    ``e`` its block ``e``, one on a whole per-expert tensor gives that expert block 0.
    """
    from peft.tuners.lora import LoraLayer, ParamWrapper

    names = {id(p): n for n, p in model.named_parameters()}
    by_base: dict[str, LoRAFactors] = {}
    modules: list[LoRAFactors] = []
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            continue
        if isinstance(module, ParamWrapper):
            base = module.get_param()
            num_experts = int(module.num_experts)
            transposed = base.dim() == 3 and not module._did_swap_in_out_features
        else:
            base = module.get_base_layer().weight
            num_experts, transposed = 1, bool(getattr(module, "fan_in_fan_out", False))
        factors = LoRAFactors(
            lora_a=f"{module_name}.lora_A.{ADAPTER}.weight",
            lora_b=f"{module_name}.lora_B.{ADAPTER}.weight",
            rank=int(module.r[ADAPTER]),
            scaling=float(module.scaling[ADAPTER]),
            num_experts=num_experts,
            transposed=transposed,
            base=names.get(id(base), ""),
        )
        modules.append(factors)
        if factors.base:
            by_base[factors.base] = factors
    layers = []
    for layer in layout.layers:
        lora_experts = []
        for expert, slices in enumerate(layer.experts):
            lora_experts.append(tuple(_expert_blocks(slices, expert, by_base)))
        has_any = any(lora_experts)
        layers.append(
            dataclasses.replace(layer, lora_experts=tuple(lora_experts) if has_any else ())
        )
    return MoELayout(layers=tuple(layers), lora_modules=tuple(modules))


def _expert_blocks(
    slices: Sequence[ExpertSlice], expert: int, by_base: Mapping[str, LoRAFactors]
) -> list[LoRAExpertSlice]:
    blocks = []
    for expert_slice in slices:
        factors = by_base.get(expert_slice.param)
        if factors is None:
            continue
        if expert_slice.start is None:
            blocks.append(LoRAExpertSlice(factors, 0))
        elif factors.num_experts > 1:
            blocks.append(LoRAExpertSlice(factors, expert))
    return blocks


# ------------------------------------------------------------------------ 4-bit base
def quantization_kwargs(config: ModelConfig) -> dict[str, Any]:
    """``from_pretrained`` keywords for ``model.quantize``: ``{}`` for ``"none"``.

    ``"4bit"`` loads the base weights as 4-bit NF4 with bfloat16 compute
    (``BitsAndBytesConfig(load_in_4bit=True)``). bitsandbytes quantizes ``nn.Linear``
    layers only: fused ``(E, out, in)`` expert tensors stay in full precision.

    Raises
    ------
    ConfigError
        Without CUDA or without the ``bitsandbytes`` package (the ``gpu`` extra), saying
        which is missing.
    """
    if config.quantize == "none":
        return {}
    if not torch.cuda.is_available():
        raise ConfigError(
            f"model.quantize = {config.quantize!r} needs a CUDA GPU (bitsandbytes 4-bit "
            "kernels); none is visible here. Use model.quantize = 'none'"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantize = {config.quantize!r} needs the bitsandbytes package "
            "(pip install 'fedalign[gpu]' or pip install bitsandbytes)"
        )
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    }
