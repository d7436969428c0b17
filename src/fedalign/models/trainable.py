"""Which parameters train and travel (``model.trainable``), and how the rest is stored."""

from __future__ import annotations

import torch
from torch import nn

from fedalign.config import ConfigError, ModelConfig
from fedalign.models.lora import wrap_with_lora
from fedalign.models.upcycle import EncoderClassifier
from fedalign.moe.layout import MoELayout


def _head_names(model: nn.Module) -> list[str]:
    """Parameters of the classification head (``classifier.*``, ``score.*``)."""
    heads = ("classifier.", "score.")
    return [n for n, _ in model.named_parameters() if any(n.startswith(h) for h in heads)]


def select_trainable(model: nn.Module, config: ModelConfig, full_layout: MoELayout) -> nn.Module:
    """Set ``requires_grad`` per ``model.trainable``; may wrap the model with LoRA (peft)."""
    if config.trainable == "all":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if config.trainable == "moe+head":
        keep = full_layout.router_param_names() | full_layout.expert_param_names()
        keep |= set(_head_names(model))
        # everything inside an MoE block trains too (e.g. Qwen2-MoE's shared expert and its
        # gate); what is neither router nor routed expert is aggregated like the rest
        blocks = tuple(f"{layer.name}." for layer in full_layout.layers)
        for name, param in model.named_parameters():
            param.requires_grad_(name in keep or name.startswith(blocks))
        return model
    if config.trainable == "lora":
        wrapped, _ = wrap_lora(model, config, full_layout)
        return wrapped
    raise ConfigError(
        f"model.trainable must be one of ['all', 'moe+head', 'lora'] (got {config.trainable!r})"
    )


def wrap_lora(
    model: nn.Module, config: ModelConfig, full_layout: MoELayout
) -> tuple[nn.Module, dict[str, str]]:
    """peft-wrapped ``model``; routers (``lora-router = "full"``) and the head train fully."""
    extra = list(_head_names(model))
    if config.lora_router == "full":
        extra += sorted(full_layout.router_param_names())
    return wrap_with_lora(model, config, full_layout, extra)


def store_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every floating-point parameter that does not train to ``dtype``; returns how
    many were cast.

    Trainable parameters keep float32, and so do normalisation layers (LayerNorm, RMSNorm:
    a few vectors; a bfloat16 LayerNorm weight meeting float32 activations fails on CPU).
    """
    cast = 0
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower():
            continue
        for param in module.parameters(recurse=False):
            if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
                cast += 1
    return cast


def first_trainable_layer(model: EncoderClassifier, trainable: set[str]) -> int:
    """Index of the first encoder layer holding a trainable parameter (BERT-style only)."""
    if not model._is_bert():
        return 0
    for index, layer in enumerate(model._layers()):
        prefix = f"encoder.encoder.layer.{index}."
        if any(n.startswith(prefix) for n in trainable) or any(
            p.requires_grad for p in layer.parameters()
        ):
            return index
    return len(model._layers())
