"""Models as MoE classifiers: loading, sparse upcycling, adapters and routing capture."""

from fedalign.models.adapters import ADAPTERS, MoEAdapter, scan_moe
from fedalign.models.capture import RouterTap, RoutingCapture
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
    "SUPPORTED_TYPES",
    "TINY_MODELS",
    "EncoderClassifier",
    "MoEAdapter",
    "MoEModel",
    "RouterTap",
    "RoutingCapture",
    "UpcycledMoE",
    "build_classifier",
    "load_moe_model",
    "minilm_path",
    "scan_moe",
    "upcycle_encoder",
]
