"""The strategy registry: a name, an options dataclass and a builder per strategy.

Adding a strategy is one module (the class and its options dataclass) plus one entry in
:data:`REGISTRY`. The composition root (``fedalign/__init__.py``) registers every entry's
options with the configuration, so the options reach TOML, ``--set``, the CLI help and the
Flower run config with no further edit.

This module knows no configuration file and no command line: :func:`build_strategy` takes
a name and a mapping of option values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedalign.errors import OptionError
from fedalign.moe.layout import MoELayout
from fedalign.strategies.base import Strategy
from fedalign.strategies.fedalign import FedAlignMoE
from fedalign.strategies.fedavg import FedAvg
from fedalign.strategies.fedmoe import FedMoE
from fedalign.strategies.fedopt import FedAdam, FedYogi
from fedalign.strategies.fedprox import FedProx


@dataclass(frozen=True)
class StrategyEntry:
    """One registered strategy: a :class:`Strategy` subclass and its options dataclass.

    Parameters
    ----------
    strategy : type
        The class; its ``name`` is the ``strategy.name`` value, its ``options_type`` the
        dataclass whose fields are the config keys (flat, shared across strategies only with
        equal type and default) and which validates itself, and ``from_options(layout,
        options)`` builds it.
    """

    strategy: type[Strategy]

    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def options(self) -> type:
        options = self.strategy.options_type
        if options is None:
            raise TypeError(f"strategy {self.strategy.__name__} has no options_type")
        return options

    def build(self, layout: MoELayout, options: Any) -> Strategy:
        return self.strategy.from_options(layout, options)


REGISTRY: dict[str, StrategyEntry] = {
    entry.name: entry
    for entry in [
        StrategyEntry(cls) for cls in (FedAvg, FedProx, FedMoE, FedAlignMoE, FedAdam, FedYogi)
    ]
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
