"""The strategy registry: a name, an options dataclass and a builder per strategy.

Adding a strategy is one module (the class and its options dataclass) plus one entry in
:data:`REGISTRY`. The composition root (``fedalign/__init__.py``) registers every entry's
options with the configuration, so the options reach TOML, ``--set``, the CLI help and the
Flower run config with no further edit.

This module knows no configuration file and no command line: :func:`build_strategy` takes
a name and a mapping of option values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedalign.errors import OptionError
from fedalign.moe.layout import MoELayout
from fedalign.strategies.base import Strategy
from fedalign.strategies.fedalign import FedAlignMoE, FedAlignOptions
from fedalign.strategies.fedavg import FedAvg, FedAvgOptions
from fedalign.strategies.fedmoe import FedMoE, FedMoEOptions
from fedalign.strategies.fedopt import FedAdam, FedOptOptions, FedYogi
from fedalign.strategies.fedprox import FedProx, FedProxOptions


@dataclass(frozen=True)
class StrategyEntry:
    """One registered strategy.

    Parameters
    ----------
    name : str
        ``strategy.name`` value.
    options : type
        Dataclass of the strategy's options; its fields are the config keys (flat, shared
        across strategies only with equal type and default) and it validates itself.
    build : callable
        ``build(layout, options) -> Strategy``.
    """

    name: str
    options: type
    build: Callable[[MoELayout, Any], Strategy]


REGISTRY: dict[str, StrategyEntry] = {
    entry.name: entry
    for entry in (
        StrategyEntry("fedavg", FedAvgOptions, lambda layout, _o: FedAvg(layout)),
        StrategyEntry(
            "fedprox", FedProxOptions, lambda layout, o: FedProx(layout, proximal_mu=o.proximal_mu)
        ),
        StrategyEntry("fedmoe", FedMoEOptions, lambda layout, o: FedMoE(layout, o.fedmoe_u_min)),
        StrategyEntry(
            "fedalign",
            FedAlignOptions,
            lambda layout, o: FedAlignMoE(
                layout,
                ablation=o.ablation,
                routing_lambda=o.routing_lambda,
                beta=o.beta,
                eps=o.eps,
                personalized_experts=o.personalized_experts,
                overlap=o.overlap,
                routing_form=o.routing_form,
                routing_signal=o.routing_signal,
                count_weighted=o.count_weighted,
                semantic_centre=o.semantic_centre,
                selection=o.selection,
                sketch_dim=o.sketch_dim,
                client_proximal_mu=o.client_proximal_mu,
            ),
        ),
        StrategyEntry(
            "fedadam",
            FedOptOptions,
            lambda layout, o: FedAdam(
                layout, o.server_lr, o.server_beta1, o.server_beta2, o.server_tau
            ),
        ),
        StrategyEntry(
            "fedyogi",
            FedOptOptions,
            lambda layout, o: FedYogi(
                layout, o.server_lr, o.server_beta1, o.server_beta2, o.server_tau
            ),
        ),
    )
}
"""Every strategy, by ``strategy.name``."""


class UnknownStrategyError(OptionError):
    """``name`` is not in the registry."""

    def __init__(self, name: str) -> None:
        super().__init__("name", name, f"must be one of {sorted(REGISTRY)}")


def build_strategy(
    name: str, options: Mapping[str, Any], layout: MoELayout, lora_aggregation: str = "factors"
) -> Strategy:
    """The strategy called ``name`` with its options taken from ``options``.

    Parameters
    ----------
    name : str
        A key of :data:`REGISTRY`.
    options : mapping of str to value
        Option values by field name; keys of other strategies are ignored, missing keys
        take the option's default.
    layout : MoELayout
        Where routers and experts live among the trainable parameters.
    lora_aggregation : {"factors", "product-svd"}, default "factors"
        How LoRA pairs are aggregated (``model.lora-aggregation``; see
        :mod:`fedalign.strategies.lora`).

    Raises
    ------
    OptionError
        For an unknown name or an option out of range (naming the option).
    """
    entry = REGISTRY.get(name)
    if entry is None:
        raise UnknownStrategyError(name)
    own = {f.name for f in fields(entry.options)}
    values = entry.options(**{key: value for key, value in options.items() if key in own})
    strategy = entry.build(layout, values)
    strategy.set_lora_aggregation(lora_aggregation)
    return strategy
