"""FedProx (Li et al., 2020): FedAvg aggregation plus a proximal term in the client loss."""

from __future__ import annotations

from collections.abc import Sequence

from fedalign.moe.layout import MoELayout
from fedalign.strategies.base import StrategyState, TrainInstructions
from fedalign.strategies.fedavg import FedAvg


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

    def __init__(self, layout: MoELayout, proximal_mu: float = 0.01) -> None:
        super().__init__(layout)
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0 (got {proximal_mu})")
        self.proximal_mu = float(proximal_mu)

    def configure_train(
        self, server_round: int, client_ids: Sequence[int], state: StrategyState
    ) -> dict[int, TrainInstructions]:
        """Every client gets ``proximal_mu``."""
        return {
            cid: TrainInstructions(
                proximal_mu=self.proximal_mu, collect_statistics=self.needs_routing_statistics
            )
            for cid in client_ids
        }
