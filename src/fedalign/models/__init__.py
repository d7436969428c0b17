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
from fedalign.models.capture import RouterTap, RoutingCapture
from fedalign.models.device import (
    autocast,
    bf16_supported,
    resolve_device,
    resolve_precision,
    set_deterministic,
)
from fedalign.models.heads import PooledClassifier, mean_pool
from fedalign.models.loading import (
    CAUSAL_TINY_MODELS,
    EMBEDDED_MODELS,
    SUPPORTED_TYPES,
    TINY_MODELS,
    MoEModel,
    build_causal_lm,
    build_classifier,
    load_moe_model,
    minilm_path,
)
from fedalign.models.upcycle import EncoderClassifier, UpcycledMoE, upcycle_encoder

__all__ = [
    "ADAPTERS",
    "CAUSAL_TINY_MODELS",
    "EMBEDDED_MODELS",
    "GENERIC",
    "SUPPORTED_TYPES",
    "TINY_MODELS",
    "EncoderClassifier",
    "MoEAdapter",
    "MoEModel",
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
    "upcycle_encoder",
]
