"""Aggregation strategies: FedAlign-MoE and the baselines, behind one interface.

Strategies are pure functions of the global state and the client results; they know
nothing about configuration files, command lines or transports. :data:`REGISTRY` lists
them; :func:`build_strategy` makes one from a name and option values.
"""

from __future__ import annotations

from fedalign.strategies.base import AggregationResult, Strategy, StrategyState
from fedalign.strategies.fedalign import (
    ABLATION_PRESETS,
    ABLATIONS,
    FedAlignMoE,
    FedAlignOptions,
    ablation_overrides,
)
from fedalign.strategies.fedavg import FedAvg, FedAvgOptions
from fedalign.strategies.fedmoe import FedMoE, FedMoEOptions
from fedalign.strategies.fedopt import FedAdam, FedOpt, FedOptOptions, FedYogi
from fedalign.strategies.fedprox import FedProx, FedProxOptions
from fedalign.strategies.registry import REGISTRY, StrategyEntry, build_strategy

__all__ = [
    "ABLATIONS",
    "ABLATION_PRESETS",
    "REGISTRY",
    "AggregationResult",
    "FedAdam",
    "FedAlignMoE",
    "FedAlignOptions",
    "FedAvg",
    "FedAvgOptions",
    "FedMoE",
    "FedMoEOptions",
    "FedOpt",
    "FedOptOptions",
    "FedProx",
    "FedProxOptions",
    "FedYogi",
    "Strategy",
    "StrategyEntry",
    "StrategyState",
    "ablation_overrides",
    "build_strategy",
]
