"""The model families fedalign supports, one table entry each, with a tiny test configuration.

Each :class:`ModelFamily` in :data:`FAMILIES` names the family's tiny configuration
(``tiny-*``: small, random weights, for tests), the transformers config class and its
options, the ``model_type``, how a classifier is built from it (``head``) and whether it
also loads as a causal LM. Everything else is derived from the table: :data:`TINY_MODELS`,
:data:`CAUSAL_TINY_MODELS` and the ``model_type`` groups the loaders dispatch on
(:data:`SEQUENCE_CLASSIFICATION_TYPES`, :data:`POOLED_HEAD_TYPES`, ...). Adding a family
is one entry here (plus an adapter in :mod:`fedalign.models.adapters` when the generic one
does not read its MoE blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

HEADS = ("sequence-classification", "pooled", "encoder", "upcycled")
"""How a family's classifier is built.

``sequence-classification``: ``AutoModelForSequenceClassification`` (a ``score`` on the last
real token); ``pooled``: the base model (``AutoModel``) plus
:class:`~fedalign.models.heads.PooledClassifier` (no such head in transformers); ``encoder``:
an MoE encoder under :class:`~fedalign.models.upcycle.EncoderClassifier`; ``upcycled``: a
dense BERT-style encoder, upcycled, under the same classifier.
"""


@dataclass(frozen=True)
class ModelFamily:
    """One supported family and its tiny configuration.

    Parameters
    ----------
    name : str
        The tiny configuration's ``model.name`` (``tiny-*``).
    model_type : str
        transformers' ``model_type`` of the family (what hub checkpoints are matched on).
    config : str
        Name of the transformers config class (``Qwen3MoeConfig``).
    options : dict
        Keyword arguments of the tiny configuration.
    head : str
        One of :data:`HEADS`.
    causal_lm : bool
        Whether the tiny configuration also loads as a causal LM (``model.head = causal-lm``).
    """

    name: str
    model_type: str
    config: str
    options: dict[str, Any] = field(repr=False)
    head: str
    causal_lm: bool

    def build_config(self) -> Any:
        """A fresh transformers config of the tiny model."""
        import transformers  # lazy: importing transformers takes seconds

        # typed as Any: the config constructors take many keyword-only knobs
        hf: Any = transformers
        return getattr(hf, self.config)(**self.options)


_COMMON: dict[str, Any] = {
    "vocab_size": 30522,
    "pad_token_id": 0,
    "max_position_embeddings": 256,
}
# 3 layers, the first dense (first_k_dense_replace=1); 8 routed experts in 4 groups, each
# token choosing its 2 experts among the 2 best groups; one shared expert
_DEEPSEEK: dict[str, Any] = {
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
    **_COMMON,
}
# OLMoE, GraniteMoE, PhiMoE: 2 layers, 4 experts of width 32, top-2
_DECODER: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
}
_SEQ = "sequence-classification"

FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        "tiny-qwen3moe",
        "qwen3_moe",
        "Qwen3MoeConfig",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            **_COMMON,
        },
        head=_SEQ,
        causal_lm=True,
    ),
    ModelFamily(
        "tiny-qwen2moe",
        "qwen2_moe",
        "Qwen2MoeConfig",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            **_COMMON,
        },
        head=_SEQ,
        causal_lm=True,
    ),
    ModelFamily(
        "tiny-mixtral",
        "mixtral",
        "MixtralConfig",
        {
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            **_COMMON,
        },
        head=_SEQ,
        causal_lm=True,
    ),
    ModelFamily(
        "tiny-switch",
        "switch_transformers",
        "SwitchTransformersConfig",
        {
            "vocab_size": 30522,
            "d_model": 64,
            "d_ff": 128,
            "d_kv": 16,
            "num_heads": 4,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_experts": 4,
            "encoder_sparse_step": 1,
            "decoder_sparse_step": 1,
            "expert_capacity": 1024,
            "pad_token_id": 0,
            "decoder_start_token_id": 0,  # the full text-to-text model (its decoder) needs one
        },
        head="encoder",
        causal_lm=False,
    ),
    ModelFamily(
        "tiny-upcycled",
        "bert",
        "BertConfig",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            **_COMMON,
        },
        head="upcycled",
        causal_lm=False,
    ),
    ModelFamily(
        "tiny-deepseek-v2",
        "deepseek_v2",
        "DeepseekV2Config",
        {"topk_method": "group_limited_greedy", "q_lora_rank": None, **_DEEPSEEK},
        head=_SEQ,
        causal_lm=True,
    ),
    ModelFamily(
        "tiny-deepseek-v3",
        "deepseek_v3",
        "DeepseekV3Config",
        {"q_lora_rank": 32, **_DEEPSEEK},
        head=_SEQ,
        causal_lm=True,
    ),
    ModelFamily(
        "tiny-olmoe",
        "olmoe",
        "OlmoeConfig",
        {"num_experts": 4, "eos_token_id": None, **_DECODER, **_COMMON},
        head="pooled",
        causal_lm=True,
    ),
    ModelFamily(
        "tiny-granitemoe",
        "granitemoe",
        "GraniteMoeConfig",
        {"num_local_experts": 4, **_DECODER, **_COMMON},
        head="pooled",
        causal_lm=True,
    ),
    ModelFamily(
        "tiny-phimoe",
        "phimoe",
        "PhimoeConfig",
        {"num_local_experts": 4, **_DECODER, **_COMMON},
        head=_SEQ,
        causal_lm=True,
    ),
    ModelFamily(
        "tiny-jetmoe",
        "jetmoe",
        "JetMoeConfig",
        {
            "hidden_size": 64,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "kv_channels": 16,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            **_COMMON,
        },
        head=_SEQ,
        causal_lm=True,
    ),
)
_BY_NAME = {family.name: family for family in FAMILIES}

TINY_MODELS = tuple(family.name for family in FAMILIES)
"""The tiny configurations (``model.name``), one per family."""
CAUSAL_TINY_MODELS = tuple(family.name for family in FAMILIES if family.causal_lm)
"""Tiny decoder configurations that also load as causal LMs (``model.head = causal-lm``)."""


def _types(head: str) -> tuple[str, ...]:
    return tuple(family.model_type for family in FAMILIES if family.head == head)


SEQUENCE_CLASSIFICATION_TYPES = _types("sequence-classification")
"""Loaded with ``AutoModelForSequenceClassification`` (a ``score`` on the last real token)."""
POOLED_HEAD_TYPES = _types("pooled")
"""Base model (``AutoModel``) plus :class:`~fedalign.models.heads.PooledClassifier`."""
ENCODER_TYPES = _types("encoder")
UPCYCLABLE_TYPES = _types("upcycled")
SUPPORTED_TYPES = (
    SEQUENCE_CLASSIFICATION_TYPES + POOLED_HEAD_TYPES + ENCODER_TYPES + UPCYCLABLE_TYPES
)
EMBEDDED_MODELS = ("upcycled-minilm",)
"""Built from a model shipped with the package (no download)."""


def tiny_family(name: str) -> ModelFamily:
    """The family of the tiny configuration ``name`` (KeyError when unknown)."""
    return _BY_NAME[name]


def tiny_hf_config(name: str) -> Any:
    """A fresh transformers config of the tiny model ``name`` (KeyError when unknown)."""
    return tiny_family(name).build_config()


def is_builtin(name: str) -> bool:
    """Whether ``name`` is built by the package (embedded or tiny), not loaded from a hub."""
    return name in EMBEDDED_MODELS or name.startswith("tiny-")
