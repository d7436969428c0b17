"""Where a round's expert merges depart from the clients' data.

For each expert merge of a decision record (per-expert ``aggregation_weights`` of
FedAlign-MoE, ``weights`` of FedMoE), two figures against the round's clients:

* the total variation between the merge weights and the clients' data shares
  (``example_weights``): ``0.5 * sum_i |w_i - n_i / n|`` (0 for a FedAvg merge);
* the share of each class's training data that reached the merge: for class ``c``,
  ``sum_{i: w_i > 0} n_i(c) / sum_i n_i(c)`` over the round's clients (classes without data
  in the round left out), from the partition's client x class counts.

Strategies whose record holds no per-expert weights merged every tensor by data share: their
figures are 0 and 1 by construction and say so (``"source": "example-weights"``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

DIGITS = 6


def _expert_weights(decision: Mapping[str, Any]) -> Iterator[dict[str, float]]:
    """Each expert merge's weights ``{client id: w}`` in the record (merges only)."""
    layers = decision.get("layers")
    if not isinstance(layers, Mapping):
        return
    for layer in layers.values():
        for expert in layer.get("experts", []) if isinstance(layer, Mapping) else []:
            weights = expert.get("aggregation_weights", expert.get("weights"))
            if weights:
                yield {str(k): float(v) for k, v in weights.items()}


def merge_diagnostics(
    decision: Mapping[str, Any], class_counts: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """The total variation and class coverage of every expert merge of ``decision``.

    Parameters
    ----------
    decision : mapping
        A round's decision record (``clients``, ``example_weights`` and, for strategies that
        weigh experts themselves, ``layers -> experts -> (aggregation_)weights``).
    class_counts : sequence of sequence of int
        Training examples per client (row = client id) and class (the partition's counts).

    Returns
    -------
    dict
        ``source`` (``"expert-weights"`` or ``"example-weights"``), ``merges``,
        ``tv_mean``, ``tv_max``, ``class_coverage_mean`` (mean over merges and classes),
        ``class_coverage_min`` and ``class_coverage_by_class`` (mean over merges, per class
        id; None for a class without data in the round).
    """
    clients = [str(c) for c in decision.get("clients", [])]
    shares = {str(k): float(v) for k, v in (decision.get("example_weights") or {}).items()}
    counts = np.asarray(class_counts, dtype=float)
    if not clients or counts.ndim != 2:
        return {}
    present = counts[[int(c) for c in clients]]  # (C, K)
    totals = present.sum(axis=0)  # (K,)
    merges = list(_expert_weights(decision))
    source = "expert-weights" if merges else "example-weights"
    if not merges:
        merges = [shares]
    tv, coverage = [], []
    for weights in merges:
        tv.append(0.5 * sum(abs(weights.get(c, 0.0) - shares.get(c, 0.0)) for c in clients))
        reached = np.array([weights.get(c, 0.0) > 0 for c in clients])
        with np.errstate(invalid="ignore", divide="ignore"):
            coverage.append(present[reached].sum(axis=0) / totals)  # (K,), NaN: no data
    with np.errstate(invalid="ignore"):
        stacked = np.stack(coverage)  # (merges, K)
        seen = (~np.isnan(stacked)).sum(axis=0)
        by_class = np.where(seen > 0, np.nansum(stacked, axis=0) / np.maximum(seen, 1), np.nan)
    flat = np.concatenate(coverage)
    kept = flat[~np.isnan(flat)]
    return {
        "source": source,
        "merges": len(merges) if source == "expert-weights" else 0,
        "tv_mean": round(float(np.mean(tv)), DIGITS),
        "tv_max": round(float(np.max(tv)), DIGITS),
        "class_coverage_mean": round(float(kept.mean()), DIGITS) if kept.size else None,
        "class_coverage_min": round(float(kept.min()), DIGITS) if kept.size else None,
        "class_coverage_by_class": [
            None if np.isnan(v) else round(float(v), DIGITS) for v in by_class
        ],
    }
