"""The MoE view of a model: layouts (pure data) and, in :mod:`fedalign.models`, adapters."""

from fedalign.moe.layout import ExpertSlice, MoELayerLayout, MoELayout

__all__ = ["ExpertSlice", "MoELayerLayout", "MoELayout"]
