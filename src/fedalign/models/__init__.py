"""Models as MoE classifiers: loading, heads, sparse upcycling, adapters and routing capture."""

from fedalign.models.adapters import (
    ADAPTERS,
    GENERIC,
    MoEAdapter,
    find_adapter,
    match_generic,
    scan_moe,
)
from fedalign.models.capture import RouterTap, RoutingCapture
from fedalign.models.heads import PooledClassifier, mean_pool
from fedalign.models.loading import (
    EMBEDDED_MODELS,
    SUPPORTED_TYPES,
    TINY_MODELS,
    MoEModel,
    build_classifier,
    load_moe_model,
    minilm_path,
)
from fedalign.models.upcycle import EncoderClassifier, UpcycledMoE, upcycle_encoder

__all__ = [
    "ADAPTERS",
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
    "build_classifier",
    "find_adapter",
    "load_moe_model",
    "match_generic",
    "mean_pool",
    "minilm_path",
    "scan_moe",
    "upcycle_encoder",
]
