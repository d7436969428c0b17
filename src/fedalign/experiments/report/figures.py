"""``fedalign report RUN_DIR``: pictures of what the routers and experts did in one run.

Reads a run folder (``metrics.jsonl``, ``decisions.jsonl``, ``routing.jsonl``,
``summary.json``, ``config.toml``) and writes ``RUN_DIR/report/`` with PNGs (matplotlib,
Agg backend) and one page, ``index.html`` (also as ``report.md``):

* ``accuracy.png``: global test accuracy, mean and worst local accuracy per round;
* ``divergence.png``: routing divergence (Jensen-Shannon to the mean routing) and semantic
  dispersion per MoE layer and round;
* per MoE layer ``<tag>`` (``moe0``, ``moe1``, ... in layer order):

  - ``usage_<tag>.png``: client x expert usage (fraction of a client's tokens that have the
    expert in their top-k) before training (round 0) and after the last round;
  - ``routing_<tag>.png``: the routing distribution over rounds, one band per expert
    (mean over clients from ``routing.jsonl``; FedAlign-MoE's aggregated ``p_g`` beside it);
  - ``similarity_<tag>.png``: client x client cosine similarity of the mean hidden state
    routed to the chosen expert, round 0 and last round (grey where a client routed no
    token to it);
  - ``similarity_all_<tag>.png``: the same for every expert, last round;
  - ``merges_<tag>.png``: for every expert, rounds x clients: the weight with which each
    client's update of that expert entered the aggregate (0: selected but left out;
    grey: not selected that round). FedAlign-MoE: the semantically aligned clients,
    FedMoE-style: the qualified clients, FedAvg and the rest: every selected client.

The chosen expert (``--expert``) defaults, per layer, to the one whose clients agree least
(lowest mean similarity over pairs of clients that routed tokens to it, last round). A
folder that holds several run folders (a ``fedalign compare`` or ``fedalign benchmark``
output) gets one report per run and an index page linking them.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from fedalign.config import ConfigError
from fedalign.records import atomic_write_text, read_jsonl

REPORT_FOLDER = "report"
"""Sub-folder of the run folder that receives the report."""

ANNOTATE_LIMIT = 160
"""Heatmaps with at most this many cells get their values written in the cells."""


# ------------------------------------------------------------------------- loading
@dataclass
class RunRecords:
    """Everything the report reads from one run folder."""

    folder: Path
    metrics: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    routing: list[dict[str, Any]]
    summary: dict[str, Any] | None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def strategy(self) -> str:
        if self.summary and self.summary.get("strategy"):
            return str(self.summary["strategy"])
        strategy = self.config.get("strategy", {})
        name = str(strategy.get("name", "?"))
        ablation = strategy.get("ablation", "full")
        return f"{name}:{ablation}" if name == "fedalign" and ablation != "full" else name

    @property
    def layers(self) -> list[str]:
        """MoE layer names, in the order the records list them."""
        for rows, key in (
            (self.routing, "layers"),
            (self.decisions, "layers"),
            (self.metrics, "routing_divergence"),
        ):
            for row in rows:
                layers = row.get(key)
                if isinstance(layers, Mapping) and layers:
                    return list(layers)
        return []


def is_run_folder(folder: Path) -> bool:
    """A run folder has ``metrics.jsonl`` (and usually ``config.toml``)."""
    return (folder / "metrics.jsonl").is_file()


def load_run(folder: Path) -> RunRecords:
    """Read a run folder.

    Raises
    ------
    ConfigError
        When ``folder`` does not exist, is not a run folder or has no recorded round.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"report: {str(folder)!r} is not a folder")
    if not is_run_folder(folder):
        raise ConfigError(
            f"report: {str(folder)!r} is not a run folder (no metrics.jsonl); "
            "give the --out folder of 'fedalign run', 'compare' or 'benchmark'"
        )
    try:
        metrics = read_jsonl(folder / "metrics.jsonl")
        decisions = read_jsonl(folder / "decisions.jsonl")
        routing = read_jsonl(folder / "routing.jsonl")
    except json.JSONDecodeError as error:
        raise ConfigError(f"report: unreadable records in {str(folder)!r}: {error}") from error
    if not metrics:
        raise ConfigError(f"report: {str(folder)!r} has no finished round yet")
    summary = None
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
    config: dict[str, Any] = {}
    if (folder / "config.toml").is_file():
        try:
            with (folder / "config.toml").open("rb") as handle:
                config = tomllib.load(handle)
        except tomllib.TOMLDecodeError:
            config = {}
    return RunRecords(folder, metrics, decisions, routing, summary, config)


def find_run_folders(folder: Path) -> list[Path]:
    """Run folders at or below ``folder`` (sorted), skipping ``report`` folders."""
    if is_run_folder(folder):
        return [folder]
    return sorted(
        path.parent
        for path in folder.rglob("metrics.jsonl")
        if REPORT_FOLDER not in path.parent.relative_to(folder).parts
    )


# ------------------------------------------------------------------------ extracting
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


# --------------------------------------------------------------------------- drawing
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_rounds(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(figure: Any, path: Path) -> Path:
    plt = _pyplot()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _heatmap(
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

    colormap = _pyplot().get_cmap(cmap).with_extremes(bad="#d9d9d9")
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
    """Global test accuracy, mean local and worst local accuracy per round."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, label in (
        ("global_accuracy", "global test accuracy"),
        ("mean_local_accuracy", "mean local accuracy"),
        ("worst_local_accuracy", "worst-client accuracy"),
    ):
        points = [(r["round"], r[key]) for r in records.metrics if r.get(key) is not None]
        if points:
            axis.plot(*zip(*points), marker="o", markersize=3, label=label)
    _integer_rounds(axis)
    axis.set_xlabel("round")
    axis.set_ylabel("accuracy")
    axis.set_title(f"{records.strategy}: accuracy")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, path)


def plot_divergence(records: RunRecords, path: Path) -> Path:
    """Routing divergence and semantic dispersion per MoE layer and round."""
    plt = _pyplot()
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
        _integer_rounds(axis)
        axis.set_xlabel("round")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    return _save(figure, path)


def plot_usage(
    layer: str, rounds: Sequence[tuple[int, list[int], dict[str, Any]]], path: Path
) -> Path:
    """Client x expert usage: first recorded round (before training), last round, change.

    The change panel (last minus first, for the clients of the last round) is drawn when
    both rounds are recorded.
    """
    plt = _pyplot()
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
        image = _heatmap(axis, matrix, vmin=0.0, vmax=max(vmax, 1e-9))
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
        delta = _heatmap(axis, change, vmin=-limit, vmax=limit, cmap="RdBu_r", digits=2)
        axis.set_title(f"change, round {shown[1][0]} - round {shown[0][0]}")
        axis.set_xlabel("expert")
        axis.set_xticks(range(change.shape[1]))
        axis.set_yticks(range(len(shown[1][1])), [str(c) for c in shown[1][1]])
        figure.colorbar(delta, ax=axis, shrink=0.8, label="usage change")
    figure.suptitle(f"expert usage, {short_layer_name(layer)}")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _stacked(axis: Any, rounds: Sequence[int], shares: np.ndarray, title: str) -> None:
    experts = shares.shape[1]
    cmap = _pyplot().get_cmap("tab10" if experts <= 10 else "tab20")
    axis.stackplot(
        rounds,
        shares.T,
        labels=[f"expert {e}" for e in range(experts)],
        colors=[cmap(e % cmap.N) for e in range(experts)],
        alpha=0.9,
    )
    axis.set_ylim(0, 1)
    _integer_rounds(axis)
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
    plt = _pyplot()
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
    return _save(figure, path)


def _similarity(entry: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(entry["semantic_similarity"], dtype=float)  # (E, C, C)


def similarity_floor(*matrices: np.ndarray) -> float:
    """Lower end of a similarity colour scale: the smallest value rounded down to 0.1.

    Cosines of mean hidden states are often all above 0.9; a 0..1 scale would show one
    flat colour.
    """
    low = min(float(np.nanmin(m)) for m in matrices if m.size)
    return max(-1.0, math.floor(min(low, 0.99) * 10) / 10)


def plot_similarity(
    layer: str,
    rounds: Sequence[tuple[int, list[int], dict[str, Any]]],
    expert: int,
    path: Path,
) -> Path:
    """Client x client similarity of one expert's routed hidden states, first and last round."""
    plt = _pyplot()
    shown = [rounds[0], rounds[-1]] if len(rounds) > 1 else [rounds[0]]
    matrices = [_similarity(entry)[expert] for _, _, entry in shown]
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
        image = _heatmap(axis, masked_inactive(matrix), vmin=vmin, vmax=1.0, cmap="magma")
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
    plt = _pyplot()
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
        image = _heatmap(
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
    plt = _pyplot()
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
        image = _heatmap(axis, matrix, vmin=0.0, vmax=1.0, cmap="Blues", annotate=False, gamma=0.5)
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


# ----------------------------------------------------------------------------- page
@dataclass
class Section:
    """One block of the report page: a heading, a sentence and images."""

    title: str
    text: str
    images: list[Path] = field(default_factory=list)


def _num_experts(records: RunRecords, layer: str) -> int:
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


def _all_clients(records: RunRecords) -> list[int]:
    clients: set[int] = set()
    for row in (*records.metrics, *records.decisions, *records.routing):
        clients.update(int(c) for c in row.get("clients", []))
    return sorted(clients)


def summary_rows(records: RunRecords) -> list[tuple[str, str]]:
    """Headline numbers and the key settings, as (name, value) pairs."""
    rows: list[tuple[str, str]] = [("strategy", records.strategy)]
    summary = records.summary or {}
    for key in (
        "rounds",
        "final_accuracy",
        "best_accuracy",
        "mean_local_accuracy",
        "worst_local_accuracy",
        "seconds_per_round",
    ):
        value = summary.get(key)
        if isinstance(value, float):
            rows.append((key.replace("_", " "), f"{value:.4f}"))
        elif value is not None:
            rows.append((key.replace("_", " "), str(value)))
    if not summary:
        rows.append(("status", f"unfinished: {len(records.metrics)} round(s) recorded"))
    config = records.config
    for section, key in (
        ("model", "name"),
        ("data", "dataset"),
        ("partition", "num-clients"),
        ("partition", "method"),
        ("partition", "alpha"),
        ("federated", "seed"),
    ):
        value = config.get(section, {}).get(key)
        if value is not None:
            rows.append((f"{section}.{key}", str(value)))
    return rows


def build_report(
    folder: Path,
    *,
    expert: int | None = None,
    layer: str | None = None,
    out: Path | None = None,
) -> Path:
    """Draw every figure of one run folder and write the page.

    Parameters
    ----------
    folder : Path
        A run folder.
    expert : int or None, default None
        Expert of the similarity figure; None picks, per layer, the least-agreeing one.
    layer : str or None, default None
        Only this MoE layer (full name, unique part of it, or index); None draws all.
    out : Path or None, default None
        Where to write; None is ``folder / "report"``.

    Returns
    -------
    Path
        The ``index.html`` written.

    Raises
    ------
    ConfigError
        On a folder that is not a run folder, an unknown layer or an expert out of range.
    """
    records = load_run(folder)
    out = Path(out) if out is not None else records.folder / REPORT_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    layers = records.layers
    chosen = select_layers(layers, layer) if layers else []
    clients = _all_clients(records)
    sections: list[Section] = [
        Section(
            "Accuracy",
            "Global test accuracy of the aggregated model, and its accuracy on each client's "
            "local test split (mean and worst client), per round.",
            [plot_accuracy(records, out / "accuracy.png")],
        ),
        Section(
            "Divergence",
            "Routing divergence: mean Jensen-Shannon divergence between each client's "
            "routing distribution and the clients' mean. Semantic dispersion: mean over "
            "experts and client pairs of 1 - cosine of the hidden states the clients route "
            "to the same expert (high: one expert index means different things to clients).",
            [plot_divergence(records, out / "divergence.png")],
        ),
    ]
    if not records.routing:
        sections.append(
            Section(
                "Routing snapshots",
                "This run folder has no routing.jsonl (written by newer versions of the "
                "simulator), so usage heatmaps and similarity matrices are not available.",
            )
        )
    for index, name in chosen:
        tag = layer_tag(index)
        rounds = routing_rows(records, name)
        num_experts = _num_experts(records, name)
        short = short_layer_name(name)
        if rounds:
            first, last = rounds[0][0], rounds[-1][0]
            before = " (initial global model, before training)" if first == 0 else ""
            sections.append(
                Section(
                    f"Expert usage, {short}",
                    "Fraction of each client's tokens that have the expert among their top-k, "
                    f"round {first}{before} and round {last}, and the change between them "
                    f"(red: used more). Layer `{name}`.",
                    [plot_usage(name, rounds, out / f"usage_{tag}.png")],
                )
            )
        routing_image = plot_routing(name, rounds, records.decisions, out / f"routing_{tag}.png")
        if routing_image is not None:
            sections.append(
                Section(
                    f"Routing distribution over rounds, {short}",
                    "Share per expert, round by round: of the routing probability (softmax) "
                    "and of the top-k assignments (usage), mean over the round's clients; "
                    "for FedAlign-MoE also the aggregated global routing distribution p_g.",
                    [routing_image],
                )
            )
        has_similarity = bool(rounds) and all("semantic_similarity" in e for _, _, e in rounds)
        if has_similarity:
            last_similarity = _similarity(rounds[-1][2])
            if expert is not None and not 0 <= expert < last_similarity.shape[0]:
                raise ConfigError(
                    f"--expert {expert} out of range: {short} has {last_similarity.shape[0]} "
                    "experts"
                )
            pick = expert if expert is not None else default_expert(last_similarity)
            how = "chosen with --expert" if expert is not None else "the least-agreeing expert"
            sections.append(
                Section(
                    f"Semantic similarity of clients, expert {pick}, {short}",
                    f"Cosine similarity between clients' mean hidden states routed to expert "
                    f"{pick} ({how}); grey where a client routed no token to it. Then every "
                    "expert in the last round.",
                    [
                        plot_similarity(name, rounds, pick, out / f"similarity_{tag}.png"),
                        plot_similarity_all(
                            name,
                            rounds[-1][0],
                            rounds[-1][1],
                            last_similarity,
                            out / f"similarity_all_{tag}.png",
                        ),
                    ],
                )
            )
        if records.decisions and num_experts:
            image, rules = plot_merges(
                name, num_experts, records.decisions, clients, out / f"merges_{tag}.png"
            )
            sections.append(
                Section(
                    f"Which clients each expert was merged from, {short}",
                    "Rows are rounds, columns clients; the colour is the weight of the "
                    "client's update in the expert's aggregate. Rule: "
                    + "; ".join(RULE_TEXT[r] for r in sorted(rules))
                    + ".",
                    [image],
                )
            )
    title = f"Run report: {records.strategy} ({records.folder.name})"
    page = render_html(title, records, sections, out)
    atomic_write_text(out / "index.html", page)
    atomic_write_text(out / "report.md", render_markdown(title, records, sections, out))
    return out / "index.html"


def render_html(title: str, records: RunRecords, sections: Sequence[Section], out: Path) -> str:
    """A self-contained page (images referenced relative to ``out``)."""
    escape = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
        "color:#222}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;"
        "text-align:left}nav a{margin-right:1em}</style>",
        "</head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>Run folder: <code>{escape(str(records.folder))}</code></p>",
        "<table>",
        *(
            f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>"
            for name, value in summary_rows(records)
        ),
        "</table>",
        "<nav>",
        *(f'<a href="#s{i}">{escape(section.title)}</a>' for i, section in enumerate(sections)),
        "</nav>",
    ]
    for i, section in enumerate(sections):
        parts.append(f'<h2 id="s{i}">{escape(section.title)}</h2>')
        parts.append(f"<p>{escape(section.text)}</p>")
        for image in section.images:
            relative = image.relative_to(out).as_posix()
            parts.append(
                f'<a href="{escape(relative)}"><img src="{escape(relative)}" '
                f'alt="{escape(section.title)}"></a>'
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(title: str, records: RunRecords, sections: Sequence[Section], out: Path) -> str:
    """The same page as Markdown."""
    lines = [f"# {title}", "", f"Run folder: `{records.folder}`", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in summary_rows(records)]
    for section in sections:
        lines += ["", f"## {section.title}", "", section.text, ""]
        lines += [
            f"![{section.title}]({image.relative_to(out).as_posix()})" for image in section.images
        ]
    return "\n".join(lines) + "\n"


def build_reports(
    folder: Path,
    *,
    expert: int | None = None,
    layer: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Report one run folder, or every run folder below ``folder`` plus an index page.

    Raises
    ------
    ConfigError
        When ``folder`` does not exist or holds no run folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"report: {str(folder)!r} is not a folder")
    runs = find_run_folders(folder)
    if not runs:
        raise ConfigError(
            f"report: {str(folder)!r} is not a run folder (no metrics.jsonl) and holds none; "
            "give the --out folder of 'fedalign run', 'compare' or 'benchmark'"
        )
    if runs == [folder]:
        page = build_report(folder, expert=expert, layer=layer)
        log(f"report: {page}")
        return page
    pages = []
    for run in runs:
        page = build_report(run, expert=expert, layer=layer)
        log(f"report: {page}")
        pages.append(page)
    out = folder / REPORT_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    items = "\n".join(
        f'<li><a href="{html.escape(Path("..", p.relative_to(folder)).as_posix())}">'
        f"{html.escape(p.parent.parent.relative_to(folder).as_posix())}</a></li>"
        for p in pages
    )
    index = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Reports: {html.escape(folder.name)}</title></head><body>"
        f"<h1>Run reports in {html.escape(str(folder))}</h1><ul>\n{items}\n</ul></body></html>\n"
    )
    atomic_write_text(out / "index.html", index)
    log(f"index: {out / 'index.html'}")
    return out / "index.html"


# ------------------------------------------------------------------------------ cli
def _cmd_report(args: argparse.Namespace) -> int:
    build_reports(args.run_dir, expert=args.expert, layer=args.layer)
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``fedalign report`` to the command line."""
    parser = subparsers.add_parser(
        "report",
        help="figures of routers and experts for a run folder (HTML page with PNGs)",
        description=(
            "Draw a run folder's routing and expert records: usage heatmaps before and after "
            "training, routing distribution over rounds, semantic similarity of clients per "
            "expert, who was merged into each expert, accuracy and divergence curves. "
            "Writes RUN_DIR/report/index.html (and report.md). A folder of runs (compare "
            "or benchmark output) gets one report per run and an index."
        ),
    )
    parser.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a run folder, or a folder of run folders"
    )
    parser.add_argument(
        "--expert", type=int, help="expert of the similarity figure (default: least-agreeing)"
    )
    parser.add_argument(
        "--layer", help="only this MoE layer: full name, unique part of it, or index"
    )
    parser.set_defaults(handler=_cmd_report)
