"""The strategy interface: pure functions of the global state and the client results.

A strategy never sees a model, a transport or a file. The in-process simulator and the
Flower apps both call exactly these methods:

1. :meth:`Strategy.configure_train` says what each selected client should do this round
   (proximal term, routing regulariser target, personalised starting point, ...);
2. clients train and return :class:`~fedalign.protocol.ClientResult` objects;
3. :meth:`Strategy.aggregate` turns the global parameters and the results into new global
   parameters, the strategy's carried state and a JSON-able decision record.

The carried state (``strategy_state``) is an explicit argument and return value, so a run
can be checkpointed and resumed, and the Flower wrapper can hold it between rounds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedalign.config import LORA_AGGREGATIONS
from fedalign.errors import OptionError, check_choice
from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult, TrainInstructions

Tensor = torch.Tensor
StrategyState = dict[str, Any]


@dataclass
class AggregationResult:
    """What :meth:`Strategy.aggregate` returns.

    Parameters
    ----------
    parameters : dict of str to Tensor
        The new global trainable parameters (same keys as the input global parameters).
    state : dict
        Strategy state to pass to the next round (tensors and plain values).
    record : dict
        JSON-serialisable decision record for this round (written to the run folder).
    client_parameters : dict of int to dict of str to Tensor, default empty
        Personalised starting values per client (only personalised strategies fill it).
    """

    parameters: dict[str, Tensor]
    state: StrategyState
    record: dict[str, Any]
    client_parameters: dict[int, dict[str, Tensor]] = field(default_factory=dict)


class Strategy(ABC):
    """Base class of every aggregation strategy.

    Parameters
    ----------
    layout : MoELayout
        Where routers and experts live among the trainable parameters.
    """

    name: str = "strategy"
    needs_routing_statistics: bool = False
    supports_lora_products: bool = True
    """Whether the strategy can aggregate LoRA pairs on their products
    (``lora_aggregation = "product-svd"``)."""
    lora_aggregation: str = "factors"
    """How LoRA pairs are aggregated: ``"factors"`` (FedIT) or ``"product-svd"``; set with
    :meth:`set_lora_aggregation`."""

    options_type: type | None = None
    """The dataclass of the strategy's options (config keys ``strategy.<field>``); it
    validates itself."""

    def __init__(self, layout: MoELayout) -> None:
        self.layout = layout

    @classmethod
    def from_options(cls, layout: MoELayout, options: Any) -> Strategy:
        """The strategy built from its validated :attr:`options_type` instance."""
        return cls(layout)

    @classmethod
    def run_label(cls, variant: str) -> str:
        """The label of this strategy's runs in tables, plots and folder names, for a
        variant (``strategy.ablation``): the strategy's name unless it has variants."""
        return cls.name

    def set_lora_aggregation(self, mode: str) -> None:
        """Choose ``"factors"`` or ``"product-svd"`` (``model.lora-aggregation``).

        Raises
        ------
        OptionError
            For another value, or ``"product-svd"`` on a strategy that cannot use it.
        """
        check_choice("lora_aggregation", mode, LORA_AGGREGATIONS)
        if mode != "factors" and not self.supports_lora_products:
            raise OptionError(
                "lora_aggregation",
                mode,
                f"must be 'factors' for strategy {self.name!r} (its server step works on "
                "the averaged tensors)",
            )
        self.lora_aggregation = mode

    def initial_state(self) -> StrategyState:
        """State before the first round."""
        return {}

    def configure_train(
        self, server_round: int, client_ids: Sequence[int], state: StrategyState
    ) -> dict[int, TrainInstructions]:
        """Instructions for each selected client. Default: plain local training."""
        return {
            cid: TrainInstructions(collect_statistics=self.needs_routing_statistics)
            for cid in client_ids
        }

    @abstractmethod
    def aggregate(
        self,
        server_round: int,
        global_parameters: Mapping[str, Tensor],
        results: Sequence[ClientResult],
        state: StrategyState,
    ) -> AggregationResult:
        """New global parameters from the client results."""
