"""The MoE view of a model: layouts (pure data), LoRA experts and, in :mod:`fedalign.models`,
adapters."""

from fedalign.moe.layout import ExpertSlice, MoELayerLayout, MoELayout
from fedalign.moe.lora import LoRAExpertSlice, LoRAFactors

__all__ = ["ExpertSlice", "LoRAExpertSlice", "LoRAFactors", "MoELayerLayout", "MoELayout"]
