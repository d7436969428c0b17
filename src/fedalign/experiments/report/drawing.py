"""Drawing helpers and the curve figures of a run report (matplotlib, Agg backend).

* ``accuracy.png``: global test accuracy, mean local accuracy and the per-client figure
  (10th percentile of local accuracy, or the worst client for older runs) per round;
* ``divergence.png``: routing divergence and semantic dispersion per MoE layer and round;
* ``routing_<tag>.png``: the routing distribution over rounds, stacked by expert.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedalign.experiments.report.extract import short_layer_name
from fedalign.experiments.report.load import RunRecords

ANNOTATE_LIMIT = 160
"""Heatmaps with at most this many cells get their values written in the cells."""


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def integer_rounds(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def save(figure: Any, path: Path) -> Path:
    plt = pyplot()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def heatmap(
    axis: Any,
    matrix: np.ndarray,
    *,
    vmin: float,
    vmax: float,
    cmap: str = "viridis",
    annotate: bool | None = None,
    digits: int = 2,
    gamma: float = 1.0,
) -> Any:
    from matplotlib.colors import Normalize, PowerNorm

    colormap = pyplot().get_cmap(cmap).with_extremes(bad="#d9d9d9")
    norm = Normalize(vmin, vmax) if gamma == 1.0 else PowerNorm(gamma, vmin, vmax)
    image = axis.imshow(np.ma.masked_invalid(matrix), aspect="auto", norm=norm, cmap=colormap)
    if annotate is None:
        annotate = matrix.size <= ANNOTATE_LIMIT
    if annotate:
        for (row, column), value in np.ndenumerate(matrix):
            if math.isfinite(value):
                red, green, blue, _ = colormap(norm(value))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                axis.text(
                    column,
                    row,
                    f"{value:.{digits}f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
    return image


def plot_accuracy(records: RunRecords, path: Path) -> Path:
    """Global test accuracy, mean local accuracy and the per-client figure per round.

    The per-client curve is the 10th percentile of local accuracy (``local_accuracy_p10``)
    when the run recorded it, else the single worst client (older runs).
    """
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    has_p10 = any(r.get("local_accuracy_p10") is not None for r in records.metrics)
    client = (
        ("local_accuracy_p10", "p10 client accuracy (clients with >= 20 test examples)")
        if has_p10
        else ("worst_local_accuracy", "worst-client accuracy")
    )
    for key, label in (
        ("global_accuracy", "global test accuracy"),
        ("mean_local_accuracy", "mean local accuracy"),
        client,
    ):
        points = [(r["round"], r[key]) for r in records.metrics if r.get(key) is not None]
        if points:
            axis.plot(*zip(*points), marker="o", markersize=3, label=label)
    integer_rounds(axis)
    axis.set_xlabel("round")
    axis.set_ylabel("accuracy")
    axis.set_title(f"{records.strategy}: accuracy")
    axis.grid(alpha=0.3)
    axis.legend()
    return save(figure, path)


def plot_divergence(records: RunRecords, path: Path) -> Path:
    """Routing divergence and semantic dispersion per MoE layer and round."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for layer in records.layers:
        for axis, metric, key, style, suffix in (
            (left, "routing_divergence", "mean_js", "-", " softmax"),
            (left, "routing_divergence", "mean_usage_js", "--", " top-k usage"),
            (right, "semantic_dispersion", "mean_dispersion", "-", ""),
        ):
            points = [
                (r["round"], r[metric][layer][key])
                for r in records.metrics
                if isinstance(r.get(metric), Mapping)
                and isinstance(r[metric].get(layer), Mapping)
                and r[metric][layer].get(key) is not None
            ]
            if points:
                axis.plot(
                    *zip(*points),
                    marker="o",
                    markersize=3,
                    linestyle=style,
                    label=short_layer_name(layer) + suffix,
                )
    left.set_title("routing divergence (mean JS to the clients' mean)", fontsize=10, pad=14)
    right.set_title("semantic dispersion (mean 1 - cos over client pairs)", fontsize=10, pad=14)
    for axis in (left, right):
        integer_rounds(axis)
        axis.set_xlabel("round")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    return save(figure, path)


def _stacked(axis: Any, rounds: Sequence[int], shares: np.ndarray, title: str) -> None:
    experts = shares.shape[1]
    cmap = pyplot().get_cmap("tab10" if experts <= 10 else "tab20")
    axis.stackplot(
        rounds,
        shares.T,
        labels=[f"expert {e}" for e in range(experts)],
        colors=[cmap(e % cmap.N) for e in range(experts)],
        alpha=0.9,
    )
    axis.set_ylim(0, 1)
    integer_rounds(axis)
    axis.set_xlabel("round")
    axis.set_ylabel("share per expert")
    axis.set_title(title, fontsize=10)


def plot_routing(
    layer: str,
    rounds: Sequence[tuple[int, list[int], dict[str, Any]]],
    decisions: Sequence[Mapping[str, Any]],
    path: Path,
) -> Path | None:
    """Routing distribution over rounds, stacked by expert.

    From ``routing.jsonl`` (from round 0), means over the round's clients of: the routing
    distribution (softmax probabilities) and the usage (top-k assignments, normalised to
    shares). When the strategy aggregated one (FedAlign-MoE): the global routing
    distribution ``p_g^t`` of the decision records.
    """
    plt = pyplot()
    panels: list[tuple[list[int], np.ndarray, str]] = []
    if rounds:
        xs = [r for r, _, _ in rounds]
        for key, title in (
            ("routing_distribution", "routing probability, mean over clients"),
            ("usage", "top-k assignments, mean over clients"),
        ):
            means = [np.asarray(entry[key], dtype=float).mean(axis=0) for _, _, entry in rounds]
            panels.append((xs, np.stack(means), title))
    aggregated = [
        (int(d["round"]), d["layers"][layer]["global_routing"])
        for d in decisions
        if isinstance(d.get("layers", {}).get(layer), Mapping)
        and d["layers"][layer].get("global_routing")
    ]
    if aggregated:
        panels.append(
            (
                [r for r, _ in aggregated],
                np.asarray([g for _, g in aggregated], dtype=float),
                "aggregated global routing p_g (decisions)",
            )
        )
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    first = min(xs[0] for xs, _, _ in panels)
    last = max(xs[-1] for xs, _, _ in panels)
    for axis, (xs, shares, title) in zip(axes[0], panels):
        totals = shares.sum(axis=1, keepdims=True)
        _stacked(axis, xs, shares / np.where(totals > 0, totals, 1.0), title)
        axis.set_xlim(first, max(last, first + 1))
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.suptitle(f"routing distribution over rounds, {short_layer_name(layer)}")
    return save(figure, path)
