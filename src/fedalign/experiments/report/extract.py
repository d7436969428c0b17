"""What the report reads out of the records: layers, routing rows, similarity, merge weights.

Pure functions of the records (NumPy arrays in, numbers out); nothing is drawn here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedalign.config import ConfigError
from fedalign.experiments.report.load import RunRecords


def layer_tag(index: int) -> str:
    """``moe0``, ``moe1``, ...: file-name tag of the ``index``-th MoE layer."""
    return f"moe{index}"


def short_layer_name(name: str) -> str:
    """``encoder.encoder.layer.2.intermediate`` -> ``layer.2.intermediate``."""
    match = re.search(r"(layers?\.\d+.*)$", name)
    return match.group(1) if match else name


def select_layers(layers: Sequence[str], wanted: str | None) -> list[tuple[int, str]]:
    """``(index, name)`` of the layers to draw: all, or the one ``--layer`` names.

    ``wanted`` may be the full name, a unique suffix of it, or the layer's index.

    Raises
    ------
    ConfigError
        When ``wanted`` matches no layer or several.
    """
    indexed = list(enumerate(layers))
    if wanted is None:
        return indexed
    if wanted.isdigit() and int(wanted) < len(layers):
        return [indexed[int(wanted)]]
    exact = [(i, n) for i, n in indexed if n == wanted]
    if exact:
        return exact
    matches = [(i, n) for i, n in indexed if n.endswith(wanted) or wanted in n]
    if len(matches) == 1:
        return matches
    raise ConfigError(
        f"--layer {wanted!r} matches {len(matches)} MoE layers; choose one of {list(layers)} "
        "(or its index)"
    )


def routing_rows(records: RunRecords, layer: str) -> list[tuple[int, list[int], dict[str, Any]]]:
    """``(round, clients, layer entry)`` of ``routing.jsonl`` for one layer, by round."""
    rows = []
    for row in records.routing:
        entry = row.get("layers", {}).get(layer)
        if isinstance(entry, Mapping):
            rows.append((int(row["round"]), [int(c) for c in row.get("clients", [])], dict(entry)))
    return sorted(rows, key=lambda item: item[0])


def active_clients(similarity: np.ndarray) -> np.ndarray:
    """Clients that routed tokens to the expert: their self-similarity is 1, not 0.

    Parameters
    ----------
    similarity : ndarray, shape (C, C)

    Returns
    -------
    ndarray of bool, shape (C,)
    """
    return np.diagonal(similarity) > 0.5


def mean_offdiagonal(similarity: np.ndarray) -> float:
    """Mean similarity over pairs of distinct active clients (NaN when there is no pair)."""
    active = active_clients(similarity)
    pairs = np.outer(active, active) & ~np.eye(len(active), dtype=bool)
    return float(similarity[pairs].mean()) if pairs.any() else math.nan


def masked_inactive(similarity: np.ndarray) -> np.ndarray:
    """The matrix with the rows and columns of inactive clients set to NaN (drawn grey)."""
    shown = similarity.astype(float).copy()
    inactive = ~active_clients(similarity)
    shown[inactive, :] = np.nan
    shown[:, inactive] = np.nan
    return shown


def default_expert(similarity: np.ndarray) -> int:
    """The expert whose clients agree least: lowest mean similarity of active-client pairs.

    Parameters
    ----------
    similarity : ndarray, shape (E, C, C)
    """
    scores = [mean_offdiagonal(s) for s in similarity]
    finite = [(score, e) for e, score in enumerate(scores) if math.isfinite(score)]
    return min(finite)[1] if finite else 0


def merge_weights(
    decision: Mapping[str, Any], layer: str, expert: int
) -> tuple[dict[int, float], str]:
    """How each selected client's update of ``expert`` entered the aggregate in one round.

    Returns
    -------
    weights : dict of int to float
        Every client selected that round; 0 for a client that was left out.
    rule : str
        Which rule decided: ``"semantic"``, ``"qualified"``, ``"kept"`` (previous global
        value kept, no client merged) or ``"fedavg"`` (example-weighted, every client).
    """
    selected = [int(c) for c in decision.get("clients", [])]
    fedavg = {int(k): float(v) for k, v in decision.get("example_weights", {}).items()}
    if not fedavg and selected:
        fedavg = {c: 1.0 / len(selected) for c in selected}
    weights = dict.fromkeys(selected, 0.0)
    layer_record = decision.get("layers", {}).get(layer)
    experts = layer_record.get("experts") if isinstance(layer_record, Mapping) else None
    if not experts or expert >= len(experts):
        weights.update(fedavg)
        return weights, "fedavg"
    record = experts[expert]
    fallback = record.get("fallback")
    if fallback in ("no-active-client", "no-qualified-client"):
        return weights, "kept"
    if isinstance(record.get("aggregation_weights"), Mapping):
        weights.update({int(k): float(v) for k, v in record["aggregation_weights"].items()})
        return weights, "semantic"
    if "qualified" in record:
        weights.update({int(k): float(v) for k, v in record.get("weights", {}).items()})
        return weights, "qualified"
    weights.update(fedavg)
    return weights, "fedavg"


def merge_matrix(
    decisions: Sequence[Mapping[str, Any]], layer: str, expert: int, clients: Sequence[int]
) -> tuple[list[int], np.ndarray, set[str]]:
    """Rounds x clients weights of one expert (NaN where the client was not selected)."""
    rounds = [int(d["round"]) for d in decisions]
    matrix = np.full((len(decisions), len(clients)), np.nan)
    column = {c: i for i, c in enumerate(clients)}
    rules: set[str] = set()
    for row, decision in enumerate(decisions):
        weights, rule = merge_weights(decision, layer, expert)
        rules.add(rule)
        for client, weight in weights.items():
            if client in column:
                matrix[row, column[client]] = weight
    return rounds, matrix, rules


RULE_TEXT = {
    "semantic": "FedAlign-MoE: semantically aligned clients, weight n_i u_i(e)",
    "qualified": "FedMoE-style: clients with usage >= u_min, weight n_i u_i(e)",
    "fedavg": "every selected client, weight n_i / n",
    "kept": "no client merged, previous expert kept",
}


def similarity_of(entry: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(entry["semantic_similarity"], dtype=float)  # (E, C, C)


def similarity_floor(*matrices: np.ndarray) -> float:
    """Lower end of a similarity colour scale: the smallest value rounded down to 0.1.

    Cosines of mean hidden states are often all above 0.9; a 0..1 scale would show one
    flat colour.
    """
    low = min(float(np.nanmin(m)) for m in matrices if m.size)
    return max(-1.0, math.floor(min(low, 0.99) * 10) / 10)


def num_experts(records: RunRecords, layer: str) -> int:
    rounds = routing_rows(records, layer)
    if rounds:
        return int(np.asarray(rounds[0][2]["usage"]).shape[1])
    for decision in records.decisions:
        experts = decision.get("layers", {}).get(layer, {}).get("experts")
        if experts:
            return len(experts)
    for row in records.metrics:
        per_expert = row.get("semantic_dispersion", {}).get(layer, {}).get("per_expert")
        if per_expert:
            return len(per_expert)
    return 0


def all_clients(records: RunRecords) -> list[int]:
    clients: set[int] = set()
    for row in (*records.metrics, *records.decisions, *records.routing):
        clients.update(int(c) for c in row.get("clients", []))
    return sorted(clients)
