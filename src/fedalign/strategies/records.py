"""Decision records shared by the strategies: rounding, per-client maps, the base record."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedalign.protocol import ClientResult
from fedalign.routing import routing_divergence, semantic_dispersion

Tensor = torch.Tensor


RECORD_DIGITS = 6
"""Decimal places kept for floats in decision records."""


# ---------------------------------------------------------------------------- records
def rounded(value: float, digits: int = RECORD_DIGITS) -> float:
    """``value`` as a plain float rounded for records."""
    return round(float(value), digits)


def rounded_list(values: Tensor, digits: int = RECORD_DIGITS) -> list[float]:
    """A 1-D tensor as a list of rounded floats."""
    return [round(float(v), digits) for v in values.reshape(-1).tolist()]


def per_client(client_ids: Sequence[int], values: Tensor) -> dict[str, float]:
    """``{str(client_id): rounded value}`` for a ``(C,)`` tensor (JSON keys are strings)."""
    return {str(cid): rounded(v) for cid, v in zip(client_ids, values.tolist(), strict=True)}


def routing_metrics(
    results: Sequence[ClientResult], global_routing: Mapping[str, Tensor] | None
) -> dict[str, Any]:
    """``routing_divergence`` and ``semantic_dispersion`` of the clients that sent statistics.

    Both are empty dictionaries when no client sent routing statistics.
    """
    statistics = [r.routing_statistics for r in results if r.routing_statistics]
    if not statistics:
        return {"routing_divergence": {}, "semantic_dispersion": {}}
    return {
        "routing_divergence": routing_divergence(statistics, global_routing),
        "semantic_dispersion": semantic_dispersion(statistics),
    }


def base_record(
    strategy_name: str, server_round: int, results: Sequence[ClientResult], weights: Tensor
) -> dict[str, Any]:
    """Fields every strategy's decision record starts with.

    ``{"strategy", "round", "clients": [ids], "num_examples": {id: n},
    "example_weights": {id: n_i / sum n}}``.
    """
    client_ids = [r.client_id for r in results]
    return {
        "strategy": strategy_name,
        "round": int(server_round),
        "clients": client_ids,
        "num_examples": {str(r.client_id): int(r.num_examples) for r in results},
        "example_weights": per_client(client_ids, weights),
    }
