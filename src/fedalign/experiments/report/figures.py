"""Heatmap figures of a run report: usage, client similarity per expert, merges.

* ``usage_<tag>.png``: client x expert usage (fraction of a client's tokens that have the
  expert in their top-k) before training (round 0), after the last round, and the change;
* ``similarity_<tag>.png``: client x client cosine similarity of the mean hidden state
  routed to the chosen expert, round 0 and last round (grey where a client routed no
  token to it); ``similarity_all_<tag>.png``: the same for every expert, last round;
* ``merges_<tag>.png``: for every expert, rounds x clients: the weight with which each
  client's update of that expert entered the aggregate (0: selected but left out; grey:
  not selected that round).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedalign.experiments.report.drawing import heatmap, pyplot
from fedalign.experiments.report.extract import (
    masked_inactive,
    mean_offdiagonal,
    merge_matrix,
    short_layer_name,
    similarity_floor,
    similarity_of,
)


def plot_usage(
    layer: str, rounds: Sequence[tuple[int, list[int], dict[str, Any]]], path: Path
) -> Path:
    """Client x expert usage: first recorded round (before training), last round, change.

    The change panel (last minus first, for the clients of the last round) is drawn when
    both rounds are recorded.
    """
    plt = pyplot()
    shown = [rounds[0], rounds[-1]] if len(rounds) > 1 else [rounds[0]]
    matrices = [np.asarray(entry["usage"], dtype=float) for _, _, entry in shown]
    vmax = max(float(np.nanmax(m)) for m in matrices if m.size)
    change = None
    if len(shown) == 2:
        first_row = {c: i for i, c in enumerate(shown[0][1])}
        last_clients = shown[1][1]
        if all(c in first_row for c in last_clients):
            before = matrices[0][[first_row[c] for c in last_clients]]
            change = matrices[1] - before
    panels = len(shown) + (change is not None)
    figure, axes = plt.subplots(
        1,
        panels,
        figsize=(5.0 * panels, 0.45 * max(len(m) for m in matrices) + 2.2),
        layout="constrained",
    )
    axes = np.atleast_1d(axes)
    image = None
    for axis, (round_number, clients, _), matrix in zip(axes, shown, matrices):
        image = heatmap(axis, matrix, vmin=0.0, vmax=max(vmax, 1e-9))
        when = " (before training)" if round_number == 0 else ""
        axis.set_title(f"round {round_number}{when}")
        axis.set_xlabel("expert")
        axis.set_ylabel("client")
        axis.set_xticks(range(matrix.shape[1]))
        axis.set_yticks(range(len(clients)), [str(c) for c in clients])
    if image is not None:
        figure.colorbar(image, ax=list(axes[: len(shown)]), shrink=0.8, label="usage u_i(e)")
    if change is not None:
        axis = axes[-1]
        limit = max(float(np.nanmax(np.abs(change))), 1e-6)
        delta = heatmap(axis, change, vmin=-limit, vmax=limit, cmap="RdBu_r", digits=2)
        axis.set_title(f"change, round {shown[1][0]} - round {shown[0][0]}")
        axis.set_xlabel("expert")
        axis.set_xticks(range(change.shape[1]))
        axis.set_yticks(range(len(shown[1][1])), [str(c) for c in shown[1][1]])
        figure.colorbar(delta, ax=axis, shrink=0.8, label="usage change")
    figure.suptitle(f"expert usage, {short_layer_name(layer)}")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_similarity(
    layer: str,
    rounds: Sequence[tuple[int, list[int], dict[str, Any]]],
    expert: int,
    path: Path,
) -> Path:
    """Client x client similarity of one expert's routed hidden states, first and last round."""
    plt = pyplot()
    shown = [rounds[0], rounds[-1]] if len(rounds) > 1 else [rounds[0]]
    matrices = [similarity_of(entry)[expert] for _, _, entry in shown]
    vmin = similarity_floor(*matrices)
    figure, axes = plt.subplots(
        1,
        len(shown),
        figsize=(5.2 * len(shown), 0.42 * max(len(m) for m in matrices) + 2.4),
        layout="constrained",
    )
    axes = np.atleast_1d(axes)
    image = None
    for axis, (round_number, clients, _), matrix in zip(axes, shown, matrices):
        image = heatmap(axis, masked_inactive(matrix), vmin=vmin, vmax=1.0, cmap="magma")
        labels = [str(c) for c in clients]
        axis.set_xticks(range(len(clients)), labels)
        axis.set_yticks(range(len(clients)), labels)
        axis.set_xlabel("client")
        axis.set_ylabel("client")
        axis.set_title(
            f"round {round_number}: mean over client pairs {mean_offdiagonal(matrix):.3f}",
            fontsize=10,
        )
    if image is not None:
        figure.colorbar(image, ax=list(axes), shrink=0.8, label="cosine of mean hidden states")
    figure.suptitle(
        f"semantic similarity of clients for expert {expert}, {short_layer_name(layer)}"
    )
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_similarity_all(
    layer: str, round_number: int, clients: Sequence[int], similarity: np.ndarray, path: Path
) -> Path:
    """Small multiples: the client x client similarity of every expert in one round."""
    plt = pyplot()
    experts = similarity.shape[0]
    columns = min(4, experts)
    rows = math.ceil(experts / columns)
    vmin = similarity_floor(similarity)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.0 * columns, 3.0 * rows), squeeze=False, layout="constrained"
    )
    image = None
    for expert in range(rows * columns):
        axis = axes[expert // columns][expert % columns]
        if expert >= experts:
            axis.axis("off")
            continue
        image = heatmap(
            axis,
            masked_inactive(similarity[expert]),
            vmin=vmin,
            vmax=1.0,
            cmap="magma",
            annotate=False,
        )
        axis.set_title(
            f"expert {expert} (mean {mean_offdiagonal(similarity[expert]):.2f})", fontsize=9
        )
        axis.set_xticks([])
        axis.set_yticks([])
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7)
    figure.suptitle(
        f"semantic similarity per expert, round {round_number}, {short_layer_name(layer)} "
        f"(clients {', '.join(str(c) for c in clients)})"
    )
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_merges(
    layer: str,
    num_experts: int,
    decisions: Sequence[Mapping[str, Any]],
    clients: Sequence[int],
    path: Path,
) -> tuple[Path, set[str]]:
    """For every expert: rounds x clients, the weight each client's update was merged with."""
    plt = pyplot()
    columns = min(4, num_experts)
    rows = math.ceil(num_experts / columns)
    height = max(2.6, 0.18 * len(decisions) + 1.4)
    figure, axes = plt.subplots(
        rows,
        columns,
        figsize=(max(2.8, 0.32 * len(clients) + 1.2) * columns, height * rows),
        squeeze=False,
        layout="constrained",
    )
    all_rules: set[str] = set()
    image = None
    for expert in range(rows * columns):
        axis = axes[expert // columns][expert % columns]
        if expert >= num_experts:
            axis.axis("off")
            continue
        round_numbers, matrix, rules = merge_matrix(decisions, layer, expert, clients)
        all_rules |= rules
        image = heatmap(axis, matrix, vmin=0.0, vmax=1.0, cmap="Blues", annotate=False, gamma=0.5)
        left_out = np.argwhere(matrix == 0.0)
        if len(left_out) and matrix.size <= 600:
            axis.scatter(left_out[:, 1], left_out[:, 0], marker="x", s=14, color="#c0392b")
        merged = int(np.sum(matrix > 0))
        selected = int(np.sum(np.isfinite(matrix)))
        axis.set_title(f"expert {expert}: {merged}/{selected} merged", fontsize=9)
        axis.set_xticks(range(len(clients)), [str(c) for c in clients], fontsize=7)
        step = max(1, len(round_numbers) // 10)
        axis.set_yticks(
            range(0, len(round_numbers), step), [str(r) for r in round_numbers[::step]], fontsize=7
        )
        axis.set_xlabel("client", fontsize=8)
        axis.set_ylabel("round", fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7, label="aggregation weight")
    figure.suptitle(
        f"who was merged into each expert, {short_layer_name(layer)}\n"
        "(colour: aggregation weight; x: selected but left out; grey: not selected)",
        fontsize=10,
    )
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path, all_rules
