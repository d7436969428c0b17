"""Curves over rounds across seeds: one panel per quantity and alpha, mean with a band."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Metrics = Sequence[Mapping[str, Any]]
"""The metrics lines of one run."""

Reader = Callable[[Mapping[str, Any]], Any]
"""Reads one quantity from a metrics line (None when undefined)."""


@dataclass
class GridFigure:
    """What :func:`plot_grid` draws.

    Parameters
    ----------
    alphas : sequence of float
        One column each.
    labels : sequence of str
        Run labels, one line each, in legend order.
    runs : mapping of (alpha, label) to list of metrics
        The metrics lines of every seed of a cell.
    display : callable
        Display name of a run label.
    """

    alphas: Sequence[float]
    labels: Sequence[str]
    runs: Mapping[tuple[float, str], Sequence[Metrics]]
    display: Callable[[str], str] = str


def series(metrics: Sequence[Metrics], value: Reader) -> tuple[list[int], list[list[float]]]:
    """Rounds where every seed has a value, and the values per seed on those rounds."""
    per_seed: list[dict[int, float]] = []
    for rows in metrics:
        points: dict[int, float] = {}
        for row in rows:
            result = value(row)
            if isinstance(result, int | float) and math.isfinite(float(result)):
                points[int(row["round"])] = float(result)
        per_seed.append(points)
    if not per_seed:
        return [], []
    common = sorted(set.intersection(*(set(p) for p in per_seed)))
    return common, [[p[r] for r in common] for p in per_seed]


def layer_mean(row: Mapping[str, Any], metric: str, key: str) -> float | None:
    """Mean over MoE layers of ``row[metric][layer][key]`` (None when nothing is defined)."""
    layers = row.get(metric)
    if not isinstance(layers, Mapping):
        return None
    values = [
        float(v[key])
        for v in layers.values()
        if isinstance(v, Mapping) and isinstance(v.get(key), int | float)
    ]
    return sum(values) / len(values) if values else None


def _draw_cell(axis: Any, grid: GridFigure, alpha: float, value: Reader, band: str) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, label in enumerate(grid.labels):
        rounds, values = series(grid.runs.get((alpha, label), []), value)
        if not rounds:
            continue
        data = np.asarray(values)  # (seeds, rounds)
        mean = data.mean(axis=0)
        if band == "std" and len(data) > 1:
            std = data.std(axis=0, ddof=1)
            low, high = mean - std, mean + std
        else:
            low, high = data.min(axis=0), data.max(axis=0)
        color = colors[index % len(colors)]
        name = f"{grid.display(label)} (n={len(data)})"
        axis.plot(rounds, mean, color=color, marker="o", markersize=3, label=name)
        axis.fill_between(rounds, low, high, color=color, alpha=0.18, linewidth=0)


def _legend_below(figure: Any, axis: Any, columns: int) -> None:
    handles, names = axis.get_legend_handles_labels()
    if handles:  # below the panels, so that it never hides a curve
        figure.legend(
            handles,
            names,
            fontsize=8,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=max(1, min(len(handles), 2 if columns == 1 else 3)),
        )


def plot_grid(
    grid: GridFigure,
    panels: Sequence[tuple[str, Reader]],
    path: Path,
    targets: Mapping[float, float | None] | None = None,
    band: str = "minmax",
    title: str = "",
) -> None:
    """One row per quantity, one column per alpha; mean over seeds with a band.

    Parameters
    ----------
    panels : sequence of (str, callable)
        Y-axis label and the function that reads the quantity from a metrics line.
    targets : dict of float to float, optional
        Drawn as a dashed line on the first row (the accuracy row).
    band : {"minmax", "std"}
        Shaded band: min-max over seeds, or mean ± sample standard deviation.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    columns = len(grid.alphas)
    figure, axes = plt.subplots(
        len(panels), columns, figsize=(5.2 * columns, 3.6 * len(panels)), squeeze=False
    )
    for column, alpha in enumerate(grid.alphas):
        for row_index, (ylabel, value) in enumerate(panels):
            axis = axes[row_index][column]
            _draw_cell(axis, grid, alpha, value, band)
            target = (targets or {}).get(alpha)
            if row_index == 0 and target is not None:
                axis.axhline(target, color="black", linestyle="--", linewidth=0.8, label="target")
            if row_index == 0:
                axis.set_title(f"Dirichlet alpha = {alpha:g}")
            axis.set_xlabel("round")
            axis.set_ylabel(ylabel)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
    band_text = "min-max over seeds" if band == "minmax" else "± 1 std over seeds"
    figure.suptitle(f"{title} (line: mean, band: {band_text})" if title else band_text)
    figure.tight_layout()
    _legend_below(figure, axes[0][0], columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
