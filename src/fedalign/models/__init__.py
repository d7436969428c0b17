"""Models as MoE classifiers or causal LMs: loading, heads, devices and precision, sparse
upcycling, adapters and routing capture."""

from fedalign.models.adapters import (
    ADAPTERS,
    GENERIC,
    MoEAdapter,
    find_adapter,
    match_generic,
    scan_moe,
)
from fedalign.models.block import UpcycledMoE
from fedalign.models.capture import RouterTap, RoutingCapture
from fedalign.models.causal import build_causal_lm
from fedalign.models.classifier import build_classifier
from fedalign.models.device import (
    autocast,
    bf16_supported,
    resolve_device,
    resolve_precision,
    set_deterministic,
)
from fedalign.models.heads import PooledClassifier, mean_pool
from fedalign.models.loading import load_moe_model, wrap_moe_model
from fedalign.models.moe_model import MoEModel
from fedalign.models.tiny import (
    CAUSAL_TINY_MODELS,
    EMBEDDED_MODELS,
    FAMILIES,
    SUPPORTED_TYPES,
    TINY_MODELS,
    ModelFamily,
    tiny_hf_config,
)
from fedalign.models.tokenizer import minilm_path
from fedalign.models.upcycle import EncoderClassifier, upcycle_encoder

__all__ = [
    "ADAPTERS",
    "CAUSAL_TINY_MODELS",
    "EMBEDDED_MODELS",
    "FAMILIES",
    "GENERIC",
    "SUPPORTED_TYPES",
    "TINY_MODELS",
    "EncoderClassifier",
    "MoEAdapter",
    "MoEModel",
    "ModelFamily",
    "PooledClassifier",
    "RouterTap",
    "RoutingCapture",
    "UpcycledMoE",
    "autocast",
    "bf16_supported",
    "build_causal_lm",
    "build_classifier",
    "find_adapter",
    "load_moe_model",
    "match_generic",
    "mean_pool",
    "minilm_path",
    "resolve_device",
    "resolve_precision",
    "scan_moe",
    "set_deterministic",
    "tiny_hf_config",
    "upcycle_encoder",
    "wrap_moe_model",
]
