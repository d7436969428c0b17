"""Aggregation strategies: FedAlign-MoE and the baselines, behind one interface.

:func:`build_strategy` turns a :class:`~fedalign.config.StrategyConfig` into a strategy.
"""

from __future__ import annotations

from fedalign.config import STRATEGIES, ConfigError, StrategyConfig
from fedalign.moe.layout import MoELayout
from fedalign.strategies.base import (
    AggregationResult,
    ClientResult,
    LayerRoutingStatistics,
    RoutingStatistics,
    Strategy,
    StrategyState,
    TrainInstructions,
)
from fedalign.strategies.fedalign import FedAlignMoE
from fedalign.strategies.fedavg import FedAvg
from fedalign.strategies.fedmoe import FedMoE
from fedalign.strategies.fedopt import FedAdam, FedOpt, FedYogi
from fedalign.strategies.fedprox import FedProx

__all__ = [
    "AggregationResult",
    "ClientResult",
    "FedAdam",
    "FedAlignMoE",
    "FedAvg",
    "FedMoE",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "LayerRoutingStatistics",
    "RoutingStatistics",
    "Strategy",
    "StrategyState",
    "TrainInstructions",
    "build_strategy",
]


def build_strategy(config: StrategyConfig, layout: MoELayout) -> Strategy:
    """The strategy named by ``config.name``, with the knobs that apply to it.

    Parameters
    ----------
    config : StrategyConfig
        ``name`` picks the class: ``fedavg``, ``fedprox`` (``proximal_mu``), ``fedmoe``
        (``fedmoe_u_min``), ``fedalign`` (``ablation``, ``routing_lambda``, ``beta``, ``eps``,
        ``personalized_experts``, ``overlap``, ``routing_form``, ``routing_signal``,
        ``count_weighted``, ``semantic_centre``, ``selection``), ``fedadam`` / ``fedyogi``
        (``server_lr``, ``server_beta1``, ``server_beta2``, ``server_tau``). Client-side knobs
        (``stats_max_examples``, ``hidden_noise_std``) are not the strategy's.
    layout : MoELayout
        Where routers and experts live among the trainable parameters.

    Returns
    -------
    Strategy

    Raises
    ------
    ConfigError
        For an unknown ``config.name`` (the message names ``strategy.name`` and the
        accepted values) or an invalid knob.
    """
    name = config.name
    if name == "fedavg":
        return FedAvg(layout)
    if name == "fedprox":
        return FedProx(layout, proximal_mu=config.proximal_mu)
    if name == "fedmoe":
        return FedMoE(layout, u_min=config.fedmoe_u_min)
    if name == "fedalign":
        return FedAlignMoE(
            layout,
            ablation=config.ablation,
            routing_lambda=config.routing_lambda,
            beta=config.beta,
            eps=config.eps,
            personalized_experts=config.personalized_experts,
            overlap=config.overlap,
            routing_form=config.routing_form,
            routing_signal=config.routing_signal,
            count_weighted=config.count_weighted,
            semantic_centre=config.semantic_centre,
            selection=config.selection,
        )
    if name in ("fedadam", "fedyogi"):
        optimizer_class = FedAdam if name == "fedadam" else FedYogi
        return optimizer_class(
            layout,
            server_lr=config.server_lr,
            beta1=config.server_beta1,
            beta2=config.server_beta2,
            tau=config.server_tau,
        )
    raise ConfigError(f"strategy.name must be one of {list(STRATEGIES)} (got {name!r})")
