"""What one finished round produced, whatever transport ran it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedalign.config import ExperimentConfig
from fedalign.protocol import ClientResult
from fedalign.strategies import AggregationResult


def evaluation_due(config: ExperimentConfig, server_round: int) -> bool:
    """Every ``federated.eval-every`` rounds, and always after the last."""
    every = config.federated.eval_every
    return server_round % every == 0 or server_round == config.federated.rounds


@dataclass
class RoundOutcome:
    """One round, adopted by the server: the input of the run records.

    Parameters
    ----------
    server_round : int
    selected : list of int
        Clients asked to train.
    results : list of ClientResult
        Replies that arrived, in the order they were aggregated.
    aggregation : AggregationResult
        The strategy's aggregate (already adopted) and decision record.
    bytes_per_client : dict of int to dict of str to int
        ``{"sent": ..., "received": ...}`` per client.
    started : float
        ``time.perf_counter()`` when the round began.
    train_seconds, aggregation_seconds : float
    client_state_bytes : int
        Bytes kept per client between rounds, summed over clients.
    evaluation : dict or None
        :func:`~fedalign.federation.evaluation.evaluate_global` of the new global model,
        when it was due.
    extra : dict, default empty
        Further metrics (e.g. the Flower ServerApp's failed clients).
    """

    server_round: int
    selected: list[int]
    results: list[ClientResult]
    aggregation: AggregationResult
    bytes_per_client: dict[int, dict[str, int]]
    started: float
    train_seconds: float
    aggregation_seconds: float
    client_state_bytes: int
    evaluation: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)


def clipped_extra(clipped: Mapping[int, float]) -> dict[str, Any]:
    """``{"clipped_clients": {"id": norm before}}`` when some update was clipped, else ``{}``
    (the metrics line of both transports)."""
    if not clipped:
        return {}
    return {"clipped_clients": {str(k): round(v, 6) for k, v in sorted(clipped.items())}}
