"""Load any supported model as an MoE classifier or causal LM with its MoE view.

:func:`load_moe_model` turns a :class:`~fedalign.config.ModelConfig` into a
:class:`~fedalign.models.moe_model.MoEModel`: the ``nn.Module``, its tokenizer, the
:class:`~fedalign.moe.MoELayout` of its trainable parameters and the router taps. It only
orchestrates; each step lives in its own module:

* :mod:`fedalign.models.classifier`: the bare classifier (``upcycled-minilm``, the tiny
  configurations, hub ids and folders; :func:`~fedalign.models.classifier.build_classifier`);
* :mod:`fedalign.models.causal`: with ``head="causal-lm"`` (multiple-choice data), a decoder
  MoE loaded with ``AutoModelForCausalLM`` instead
  (:func:`~fedalign.models.causal.build_causal_lm`);
* :mod:`fedalign.models.tiny`: the supported families, one table entry each (tiny test
  configuration, ``model_type``, head, causal LM or not);
* :mod:`fedalign.models.tokenizer`: the tokenizer and the vocabulary check;
* :mod:`fedalign.models.trainable`: ``model.trainable`` (and LoRA), ``run.frozen-dtype``.

Router taps are found by :func:`~fedalign.models.adapters.scan_moe`, the same way for every
model. The model is built on the CPU (so its initial weights do not depend on the device)
and then moved to ``run.device``; :meth:`MoEModel.autocast` applies ``run.precision``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedalign.config import ConfigError, ModelConfig
from fedalign.models.adapters import scan_moe
from fedalign.models.capture import RouterTap
from fedalign.models.causal import build_causal_lm
from fedalign.models.classifier import build_classifier
from fedalign.models.device import resolve_device, resolve_precision
from fedalign.models.lora import lora_view, rewrap_taps
from fedalign.models.moe_model import MoEModel
from fedalign.models.tokenizer import check_vocabulary
from fedalign.models.trainable import (
    first_trainable_layer,
    select_trainable,
    store_frozen,
    wrap_lora,
)
from fedalign.models.upcycle import EncoderClassifier
from fedalign.moe.layout import MoELayout


def load_moe_model(
    config: ModelConfig,
    num_labels: int,
    seed: int = 0,
    *,
    head: str = "classification",
    device: str = "cpu",
    precision: str = "fp32",
    frozen_dtype: str = "fp32",
) -> MoEModel:
    """Build or load the model named by ``config`` as an :class:`MoEModel`.

    Parameters
    ----------
    config : ModelConfig
    num_labels : int
        Classes of the task (unused by a causal LM).
    seed : int, default 0
        Seeds the fresh parts (router, head, tiny models).
    head : str, default "classification"
        ``classification`` or ``causal-lm`` (:meth:`ExperimentConfig.model_head`).
    device : str, default "cpu"
        ``run.device``; the model is built on the CPU and then moved there.
    precision : str, default "fp32"
        ``run.precision`` (autocast of forward passes).
    frozen_dtype : str, default "fp32"
        ``run.frozen-dtype``: ``bf16`` stores the parameters that do not train in bfloat16
        (needs a bfloat16 autocast).
    """
    _placement(device, precision, frozen_dtype)  # a bad device or precision fails first
    bare_model, tokenizer, model_type = _bare_model(config, num_labels, seed, head)
    return wrap_moe_model(
        bare_model,
        tokenizer,
        model_type,
        config,
        num_labels,
        head=head,
        device=device,
        precision=precision,
        frozen_dtype=frozen_dtype,
    )


def wrap_moe_model(
    bare_model: nn.Module,
    tokenizer: Any,
    model_type: str,
    config: ModelConfig,
    num_labels: int,
    *,
    head: str = "classification",
    device: str = "cpu",
    precision: str = "fp32",
    frozen_dtype: str = "fp32",
) -> MoEModel:
    """An already built model (its head chosen, weights in place) as an :class:`MoEModel`:
    checks the tokenizer's vocabulary, chooses the trainable parameters of
    ``config.trainable`` (maybe LoRA), applies ``frozen_dtype`` and moves it to ``device``.

    :func:`load_moe_model` builds the model from ``config`` and calls this; a caller that
    builds its own (a random model of a given size straight on a GPU, say) calls it directly.
    """
    torch_device, dtype = _placement(device, precision, frozen_dtype)
    check_vocabulary(bare_model, tokenizer, config)
    model, full_layout, taps = _trainable_model(bare_model, config)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(model, EncoderClassifier) and config.trainable == "moe+head":
        model.prefix_layers = first_trainable_layer(model, set(trainable_names))
    if frozen_dtype == "bf16":
        store_frozen(model, torch.bfloat16)
    model.to(torch_device)
    return MoEModel(
        model=model,
        tokenizer=tokenizer,
        layout=full_layout.restrict(trainable_names),
        full_layout=full_layout,
        taps=taps,
        architecture=model_type,
        num_labels=num_labels,
        trainable_names=trainable_names,
        head=head,
        device=torch_device,
        autocast_dtype=dtype,
    )


def _placement(
    device: str, precision: str, frozen_dtype: str
) -> tuple[torch.device, torch.dtype | None]:
    """``run.device`` and the autocast dtype of ``run.precision``; checks ``run.frozen-dtype``."""
    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    if frozen_dtype == "bf16" and dtype is None:
        raise ConfigError(
            f"run.frozen-dtype 'bf16' needs bfloat16 autocast, but run.precision {precision!r} "
            f"is float32 on {torch_device}; accepted: run.frozen-dtype 'fp32', or "
            "run.precision 'bf16'"
        )
    return torch_device, dtype


def _bare_model(
    config: ModelConfig, num_labels: int, seed: int, head: str
) -> tuple[nn.Module, Any, str]:
    """The model for ``head`` before any trainable choice, its tokenizer and model type."""
    if head == "causal-lm":
        return build_causal_lm(config, seed)
    if head == "classification":
        if num_labels < 2:
            raise ConfigError(f"the dataset must have at least 2 classes (got {num_labels})")
        return build_classifier(config, num_labels, seed)
    raise ConfigError(f"model.head must be one of ['classification', 'causal-lm'] (got {head!r})")


def _trainable_model(
    bare_model: nn.Module, config: ModelConfig
) -> tuple[nn.Module, MoELayout, list[RouterTap]]:
    """The model with its trainable parameters chosen (maybe LoRA-wrapped), its MoE layout
    over every parameter and its router taps."""
    try:
        full_layout, taps = scan_moe(bare_model)
    except ValueError as error:
        raise ConfigError(f"model.name {config.name!r}: {error}") from error
    if config.trainable == "lora" and config.lora_experts:
        # peft hides fused expert tensors inside ParamWrappers: rename the bare view
        bare_modules = {id(m): n for n, m in bare_model.named_modules()}
        model, names = wrap_lora(bare_model, config, full_layout)
        blocks = {bare_modules[id(m)]: n for n, m in model.named_modules() if id(m) in bare_modules}
        full_layout = full_layout.rename(names, blocks)
        taps = rewrap_taps(model, taps, blocks)
    else:
        model = select_trainable(bare_model, config, full_layout)
        # scan again: LoRA wrapping renames modules
        full_layout, taps = scan_moe(model)
    if config.trainable == "lora":
        full_layout = lora_view(model, full_layout)
    return model, full_layout, taps
