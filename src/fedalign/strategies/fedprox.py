"""FedProx (Li et al., 2020): FedAvg aggregation plus a proximal term in the client loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedalign.errors import check_option
from fedalign.moe.layout import MoELayout
from fedalign.protocol import LossTermSpec, TrainInstructions
from fedalign.strategies.base import StrategyState
from fedalign.strategies.fedavg import FedAvg


@dataclass
class FedProxOptions:
    """Options of :class:`FedProx` (config keys ``strategy.<name>``).

    Parameters
    ----------
    proximal_mu : float, default 0.01
        Proximal coefficient ``mu`` (>= 0).
    """

    proximal_mu: float = 0.01

    def __post_init__(self) -> None:
        check_option("proximal_mu", self.proximal_mu, minimum=0.0)


class FedProx(FedAvg):
    """FedAvg whose clients minimise ``L_task + mu/2 * ||w - w_global||^2``.

    The server side is exactly :class:`FedAvg`; only the instructions differ.

    Parameters
    ----------
    layout : MoELayout
        Where routers and experts live.
    proximal_mu : float, default 0.01
        Proximal coefficient ``mu`` sent to every client (must be >= 0).
    """

    name = "fedprox"
    options_type = FedProxOptions

    @classmethod
    def from_options(cls, layout: MoELayout, options: Any) -> FedProx:
        return cls(layout, options.proximal_mu)

    def __init__(self, layout: MoELayout, proximal_mu: float = 0.01) -> None:
        super().__init__(layout)
        self.proximal_mu = float(FedProxOptions(proximal_mu).proximal_mu)

    def configure_train(
        self, server_round: int, client_ids: Sequence[int], state: StrategyState
    ) -> dict[int, TrainInstructions]:
        """Every client gets the proximal term with coefficient ``mu / 2``."""
        terms = []
        if self.proximal_mu > 0:
            terms = [LossTermSpec("proximal", coefficient=0.5 * self.proximal_mu)]
        return {
            cid: TrainInstructions(
                loss_terms=list(terms), collect_statistics=self.needs_routing_statistics
            )
            for cid in client_ids
        }
