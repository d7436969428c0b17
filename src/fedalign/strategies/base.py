"""The strategy interface: pure functions of the global state and the client results.

A strategy never sees a model, a transport or a file. The in-process simulator and the
Flower apps both call exactly these methods:

1. :meth:`Strategy.configure_train` says what each selected client should do this round
   (proximal term, routing regulariser target, personalised starting point, ...);
2. clients train and return :class:`ClientResult` objects;
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

from fedalign.moe.layout import MoELayout

Tensor = torch.Tensor
StrategyState = dict[str, Any]


@dataclass
class LayerRoutingStatistics:
    """What a client reports about one MoE layer after local training.

    All tensors are float32 on CPU. ``E`` experts, hidden width ``H``.

    Parameters
    ----------
    routing_distribution : Tensor, shape (E,)
        Mean over tokens of the softmax routing probabilities ``pbar_i(e)``.
    usage : Tensor, shape (E,)
        Fraction of tokens that have ``e`` among their top-k ``u_i(e)``.
    margin : Tensor, shape (E,)
        Mean over tokens routed to ``e`` of ``p(x, e) - p(x, e_(k+1))``; 0 where no token.
    mean_hidden : Tensor, shape (E, H)
        Mean hidden state entering the layer over tokens routed to ``e``; 0 where none.
    token_count : Tensor, shape (E,)
        Tokens routed to ``e`` (top-k membership).
    num_tokens : int
        Tokens seen in the statistics pass.
    """

    routing_distribution: Tensor
    usage: Tensor
    margin: Tensor
    mean_hidden: Tensor
    token_count: Tensor
    num_tokens: int

    def to_tensors(self) -> dict[str, Tensor]:
        return {
            "routing_distribution": self.routing_distribution,
            "usage": self.usage,
            "margin": self.margin,
            "mean_hidden": self.mean_hidden,
            "token_count": self.token_count,
            "num_tokens": torch.tensor(self.num_tokens),
        }

    @classmethod
    def from_tensors(cls, data: Mapping[str, Tensor]) -> LayerRoutingStatistics:
        return cls(
            routing_distribution=data["routing_distribution"],
            usage=data["usage"],
            margin=data["margin"],
            mean_hidden=data["mean_hidden"],
            token_count=data["token_count"],
            num_tokens=int(data["num_tokens"]),
        )


RoutingStatistics = dict[str, LayerRoutingStatistics]
"""Per-layer statistics keyed by :attr:`MoELayerLayout.name`."""


@dataclass
class TrainInstructions:
    """What the server asks one client to do in one round.

    Parameters
    ----------
    proximal_mu : float, default 0.0
        FedProx proximal coefficient ``mu``; the client adds ``mu/2 * ||w - w_global||^2``.
    routing_lambda : float, default 0.0
        Weight ``lambda`` of the routing regulariser ``L_reg``; 0 disables it.
    global_routing : dict of str to Tensor, default empty
        Per layer, the global routing distribution ``p_g`` (shape ``(E,)``).
    expert_alpha : dict of str to Tensor, default empty
        Per layer, the per-expert regulariser strengths ``alpha_i(e)`` (shape ``(E,)``).
    routing_form : str, default "literal"
        Form of ``L_reg``: ``literal``, ``batch-kl`` or ``topk-kl`` (see
        :func:`fedalign.routing.routing_regularizer`).
    collect_statistics : bool, default False
        Whether the client computes :class:`LayerRoutingStatistics` after training.
    start_parameters : dict of str to Tensor or None, default None
        Personalised values that replace the global ones for these keys before training.
    """

    proximal_mu: float = 0.0
    routing_lambda: float = 0.0
    global_routing: dict[str, Tensor] = field(default_factory=dict)
    expert_alpha: dict[str, Tensor] = field(default_factory=dict)
    routing_form: str = "literal"
    collect_statistics: bool = False
    start_parameters: dict[str, Tensor] | None = None


@dataclass
class ClientResult:
    """One client's reply after local training.

    Parameters
    ----------
    client_id : int
        Index of the client in the partition.
    num_examples : int
        Local training examples ``n_i``.
    parameters : dict of str to Tensor
        The client's trainable parameters after local training (full values, not deltas).
    routing_statistics : dict of str to LayerRoutingStatistics, default empty
        Per MoE layer, present when the strategy asked for them.
    metrics : dict of str to float, default empty
        Training loss and the like, for records only.
    """

    client_id: int
    num_examples: int
    parameters: dict[str, Tensor]
    routing_statistics: RoutingStatistics = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


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

    def __init__(self, layout: MoELayout) -> None:
        self.layout = layout

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
