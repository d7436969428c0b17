"""Decoder MoEs with their language-modelling head (``model.head = causal-lm``)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from fedalign.config import ConfigError, ModelConfig
from fedalign.models.lora import quantization_kwargs
from fedalign.models.tiny import CAUSAL_TINY_MODELS, EMBEDDED_MODELS, tiny_hf_config
from fedalign.models.tokenizer import has_tokenizer, tokenizer_for


def build_causal_lm(config: ModelConfig, seed: int) -> tuple[nn.Module, Any, str]:
    """A decoder MoE with its language-modelling head, its tokenizer and model type.

    The tiny decoder configurations (:data:`~fedalign.models.tiny.CAUSAL_TINY_MODELS`)
    build with random weights (the offline MiniLM tokenizer; same vocabulary size);
    anything else loads with ``AutoModelForCausalLM.from_pretrained``.

    Raises
    ------
    ConfigError
        For an encoder (``upcycled-minilm``, ``tiny-switch``, ``tiny-upcycled``: no LM
        head), or a name that does not load as a causal LM.
    """
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(seed)
    name = config.name
    accepted = (
        f"accepted: {list(CAUSAL_TINY_MODELS)} or a Hugging Face model id / local folder of a "
        "decoder MoE with a causal-LM head"
    )
    if name in EMBEDDED_MODELS or (name.startswith("tiny-") and name not in CAUSAL_TINY_MODELS):
        raise ConfigError(
            f"model.name {name!r} is an encoder without a language-modelling head and cannot "
            f"score multiple-choice data (model.head 'causal-lm'); {accepted}"
        )
    if name in CAUSAL_TINY_MODELS:
        if config.quantize != "none":
            raise ConfigError(
                f"model.quantize = {config.quantize!r} needs a hub id or a saved folder "
                f"(model.name {name!r} is built in full precision)"
            )
        hf_config = tiny_hf_config(name)
        model = AutoModelForCausalLM.from_config(hf_config)
        return model, tokenizer_for(config, None), str(hf_config.model_type)
    quantization = quantization_kwargs(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **quantization)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model.name {name!r} does not load as a causal LM ({accepted}): {error}"
        ) from error
    tokenizer = tokenizer_for(config, name if has_tokenizer(name) else None)
    return model, tokenizer, str(getattr(model.config, "model_type", ""))
