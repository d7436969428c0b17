"""``fedalign benchmark``: the paper's grid of strategies x Dirichlet alphas x seeds.

A *suite* is a TOML file under ``benchmarks/``: an ordinary experiment config (the
``[model]``, ``[data]``, ... sections of :class:`~fedalign.config.ExperimentConfig`) plus

* a ``[suite]`` table: ``name``, ``description``, ``note``, ``strategies`` (``"fedavg"``,
  ``"fedalign:consistency"``, ...), ``alphas``, ``seeds`` (a count or a list),
  ``reference`` (the strategy whose mean final accuracy sets the target),
  ``target-fraction``, ``report`` (strategies that get a run report) and optional
  ``[suite.labels]`` (display names);
* an optional ``[quick]`` table with the same layout (``[quick.suite]``, ``[quick.data]``,
  ...) whose values replace the full-size ones under ``--quick``.

Every (alpha, seed, strategy) cell is one run folder ``runs/alpha<A>/seed<S>/<strategy>``
under the output folder. A run folder whose ``summary.json`` exists and whose
``config.toml`` equals the planned configuration (the ``[run]`` section aside) is reused;
one with the same configuration and a checkpoint but no summary (an interrupted run) is
resumed; anything else is run from scratch. Tokenisation and the frozen-prefix cache are
computed once per (alpha, seed) and shared by that cell's strategies.

The results folder receives ``results.md`` / ``results.csv`` / ``results.json`` (one row per
strategy and alpha: mean and sample standard deviation over seeds of the final global
accuracy, the worst-client and mean local accuracy, and the rounds to reach the target),
``runs.csv`` (one row per run), ``convergence.png`` and ``divergence.png`` (mean over seeds
with a min-max band, one panel per alpha), ``reports/`` (``fedalign report`` pages of the
suite's ``report`` strategies, first seed) and ``COMMAND.txt`` (the command that made them).
A finished run's checkpoint and final parameters are deleted unless ``--keep-states``.

Target accuracy, per alpha: ``target-fraction`` x the reference strategy's (FedAvg's)
mean final accuracy over seeds at that alpha. Rounds to target are averaged over the seeds
that reached it; the table says how many did.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import tomllib

from fedalign.cli import (
    OVERRIDES,
    add_experiment_options,
    config_from_args,
    parse_strategy_list,
)
from fedalign.compare import rounds_to_target, to_csv, to_markdown
from fedalign.config import ConfigError, ExperimentConfig
from fedalign.records import atomic_write_text, read_jsonl

SUITE_NAMES = ("main", "ablation")
"""Suites shipped under ``benchmarks/`` (``--suite`` also takes a path to a TOML file)."""

SUITE_KEYS = (
    "name",
    "description",
    "note",
    "strategies",
    "alphas",
    "seeds",
    "reference",
    "report",
)
"""Keys of the ``[suite]`` table besides ``target-fraction`` and ``labels``."""

BAND_CHOICES = ("minmax", "std")


# ------------------------------------------------------------------------ suites
@dataclass
class Suite:
    """A benchmark grid read from a suite file.

    Parameters
    ----------
    name : str
        Short name, used for the default output folder.
    path : Path
        The suite file.
    base : dict
        Experiment-config sections (hyphenated keys) shared by every run.
    strategies : list of (str, str)
        ``(strategy, ablation)`` pairs, in table order.
    alphas : list of float
        Dirichlet concentrations.
    seeds : list of int
        Seeds; each one seeds partitioning, initialisation and training of its runs.
    reference : str
        Label of the strategy whose mean final accuracy sets the target (e.g. ``"fedavg"``).
    target_fraction : float
        Target accuracy = ``target_fraction`` x the reference's mean final accuracy.
    labels : dict of str to str
        Display names of strategy labels (missing ones show the label itself).
    description : str
        One paragraph for the results page.
    note : str
        A second paragraph (the quick size says what it is good for).
    report : list of str
        Strategy labels whose first-seed run at every alpha gets a ``fedalign report`` page
        under ``reports/`` (default: the last listed strategy).
    quick : bool
        Whether the ``[quick]`` overrides were applied.
    """

    name: str
    path: Path
    base: dict[str, Any]
    strategies: list[tuple[str, str]]
    alphas: list[float]
    seeds: list[int]
    reference: str = "fedavg"
    target_fraction: float = 1.0
    labels: dict[str, str] = field(default_factory=dict)
    description: str = ""
    note: str = ""
    report: list[str] = field(default_factory=list)
    quick: bool = False

    @property
    def strategy_labels(self) -> list[str]:
        return [strategy_label(name, ablation) for name, ablation in self.strategies]

    def display(self, label: str) -> str:
        """The name a table shows for strategy ``label``."""
        return self.labels.get(label, label)


def strategy_label(name: str, ablation: str = "full") -> str:
    """The label a run's summary carries: ``fedalign:<row>`` for ablations, else the name."""
    if name == "fedalign" and ablation != "full":
        return f"fedalign:{ablation}"
    return name


def suite_directories() -> list[Path]:
    """Where suite names are looked up: ``./benchmarks`` then the source tree's."""
    here = Path(__file__).resolve().parents[2] / "benchmarks"
    return [Path.cwd() / "benchmarks", here]


def find_suite_file(name_or_path: str) -> Path:
    """Resolve ``--suite``: a path to a TOML file or the name of one under ``benchmarks/``.

    Raises
    ------
    ConfigError
        When no such file exists.
    """
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    if candidate.suffix == ".toml" or len(candidate.parts) > 1:
        raise ConfigError(f"--suite {name_or_path!r}: no such file")
    for directory in suite_directories():
        path = directory / f"{name_or_path}.toml"
        if path.is_file():
            return path
    raise ConfigError(
        f"--suite {name_or_path!r}: no benchmarks/{name_or_path}.toml found; "
        f"shipped suites: {list(SUITE_NAMES)}, or pass a path to a suite TOML file"
    )


def merge_tables(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge of TOML tables: values of ``override`` win, sub-tables merge."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_tables(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _seed_list(value: Any, start: int) -> list[int]:
    if isinstance(value, bool):
        raise ConfigError(f"suite.seeds must be a count or a list of ints (got {value!r})")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"suite.seeds must be >= 1 (got {value})")
        return [start + i for i in range(value)]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [int(v) for v in value]
    raise ConfigError(f"suite.seeds must be a count or a non-empty list of ints (got {value!r})")


def load_suite(path: Path, quick: bool = False) -> Suite:
    """Read a suite file (see the module docstring), applying ``[quick]`` when asked.

    Raises
    ------
    ConfigError
        On invalid TOML, a missing ``[suite]`` table, unknown keys or bad values.
    """
    try:
        with Path(path).open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError as error:
        raise ConfigError(f"suite file {str(path)!r} not found") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"suite file {str(path)!r} is not valid TOML: {error}") from error
    quick_table = data.pop("quick", {})
    if quick:
        data = merge_tables(data, quick_table)
    table = data.pop("suite", None)
    if not isinstance(table, Mapping):
        raise ConfigError(f"suite file {str(path)!r} has no [suite] table")
    table = {key.replace("_", "-"): value for key, value in table.items()}
    accepted = {*SUITE_KEYS, "target-fraction", "labels"}
    unknown = sorted(set(table) - accepted)
    if unknown:
        raise ConfigError(f"unknown [suite] keys {unknown}; accepted: {sorted(accepted)}")
    base_config = ExperimentConfig.from_dict(data)  # validates section and key names
    strategies_value = table.get("strategies", ["fedavg", "fedprox", "fedmoe", "fedalign"])
    if not isinstance(strategies_value, list) or not strategies_value:
        raise ConfigError("suite.strategies must be a non-empty list of strings")
    strategies = parse_strategy_list(",".join(str(s) for s in strategies_value))
    alphas_value = table.get("alphas", [base_config.partition.alpha])
    if not isinstance(alphas_value, list) or not alphas_value:
        raise ConfigError("suite.alphas must be a non-empty list of numbers")
    alphas = [float(a) for a in alphas_value]
    fraction = float(table.get("target-fraction", 1.0))
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"suite.target-fraction must be in (0, 1] (got {fraction})")
    labels = table.get("labels", {})
    if not isinstance(labels, Mapping):
        raise ConfigError("suite.labels must be a table of label = display name")
    report = table.get("report", [strategy_label(*strategies[-1])])
    if not isinstance(report, list):
        raise ConfigError("suite.report must be a list of strategy labels")
    return Suite(
        name=str(table.get("name", Path(path).stem)),
        path=Path(path),
        base=data,
        strategies=strategies,
        alphas=alphas,
        seeds=_seed_list(table.get("seeds", 3), base_config.federated.seed),
        reference=str(table.get("reference", "fedavg")),
        target_fraction=fraction,
        labels={str(k): str(v) for k, v in labels.items()},
        description=str(table.get("description", "")).strip(),
        note=str(table.get("note", "")).strip(),
        report=[str(r) for r in report],
        quick=quick,
    )


# -------------------------------------------------------------------------- plan
@dataclass
class PlannedRun:
    """One cell of the grid: a strategy at one alpha and seed, and its run folder."""

    label: str
    alpha: float
    seed: int
    config: ExperimentConfig
    folder: Path

    @property
    def group(self) -> tuple[float, int]:
        """Runs of one group share the partition and the prepared data."""
        return (self.alpha, self.seed)


def alpha_name(alpha: float) -> str:
    """``alpha0.1``, ``alpha1``: the folder name of one alpha."""
    return f"alpha{alpha:g}"


def plan_runs(suite: Suite, base: ExperimentConfig, out: Path) -> list[PlannedRun]:
    """Expand the grid; order: alpha, then seed, then strategy (as listed by the suite)."""
    runs = []
    for alpha in suite.alphas:
        for seed in suite.seeds:
            for name, ablation in suite.strategies:
                config = base.copy()
                config.strategy.name = name
                config.strategy.ablation = ablation
                config.partition.alpha = alpha
                config.federated.seed = seed
                label = strategy_label(name, ablation)
                folder = out / "runs" / alpha_name(alpha) / f"seed{seed}" / label.replace(":", "-")
                config.run.out = str(folder)
                config.validate()
                runs.append(PlannedRun(label, alpha, seed, config, folder))
    return runs


def same_experiment(a: ExperimentConfig, b: ExperimentConfig) -> bool:
    """Equal configurations, ignoring the ``[run]`` section (output folder, progress, threads)."""
    left, right = a.to_dict(), b.to_dict()
    left.pop("run", None)
    right.pop("run", None)
    return left == right


def run_status(run: PlannedRun) -> str:
    """``"finished"`` (reuse), ``"resume"`` (interrupted, same config) or ``"new"``."""
    config_path = run.folder / "config.toml"
    if not config_path.exists():
        return "new"
    try:
        saved = ExperimentConfig.from_toml(config_path)
    except ConfigError:
        return "new"
    if not same_experiment(saved, run.config):
        return "new"
    if (run.folder / "summary.json").exists():
        return "finished"
    if (run.folder / "checkpoint" / "state.pt").exists():
        return "resume"
    return "new"


# ------------------------------------------------------------------------ running
def prepare_shared_data(config: ExperimentConfig) -> Any:
    """Partition, tokenize and prefix-cache once for every run of one (alpha, seed)."""
    import torch

    from fedalign.client import prepare

    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    return prepare(config).data


def run_experiment(config: ExperimentConfig, out_dir: Path, **kwargs: Any) -> Any:
    """The simulator's :func:`~fedalign.simulation.run_experiment` (imported when needed)."""
    from fedalign.experiments.run import run_experiment as simulate

    return simulate(config, out_dir, **kwargs)


STATE_FILES = ("checkpoint", "final_state.safetensors")
"""What a finished run folder holds only for resuming or reloading the model (large)."""


def prune_states(folder: Path) -> None:
    """Delete a finished run's checkpoint and final parameters (tens of MiB each)."""
    for name in STATE_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def execute_plan(
    runs: Sequence[PlannedRun], log: Callable[[str], None] = print, keep_states: bool = False
) -> dict[str, int]:
    """Run what is not finished; returns how many runs were reused, resumed and run.

    Data is prepared lazily, once per (alpha, seed) group, and only when one of the
    group's runs has to compute. Unless ``keep_states``, a run's checkpoint and final
    parameters are deleted once it has finished (the table needs neither).
    """
    counts = {"finished": 0, "resume": 0, "new": 0}
    prepared: dict[tuple[float, int], Any] = {}
    total = len(runs)
    for index, run in enumerate(runs, start=1):
        status = run_status(run)
        counts[status] += 1
        where = f"[{index}/{total}] alpha={run.alpha:g} seed={run.seed} {run.label}"
        if status == "finished":
            log(f"{where}: finished earlier, reused ({run.folder})")
            continue
        if run.group not in prepared:
            prepared.clear()  # one group's data in memory at a time
            started = time.perf_counter()
            prepared[run.group] = prepare_shared_data(run.config)
            log(
                f"data for alpha={run.alpha:g} seed={run.seed} prepared in "
                f"{time.perf_counter() - started:.1f}s"
            )
        if status == "resume":
            log(f"{where}: resuming the interrupted run")
        else:
            stale = run.folder / "summary.json"
            if stale.exists():
                stale.unlink()  # a different configuration finished here before
            log(f"{where}: running")
        summary = run_experiment(
            run.config, run.folder, prepared=prepared[run.group], resume=status == "resume"
        )
        if not keep_states:
            prune_states(run.folder)
        log(
            f"{where}: final accuracy {summary.final_accuracy:.4f} "
            f"({summary.seconds:.1f}s, {summary.seconds_per_round:.1f}s/round)"
        )
    return counts


# -------------------------------------------------------------------- aggregation
@dataclass
class FinishedRun:
    """The records of one finished run folder."""

    run: PlannedRun
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]


def load_finished(runs: Sequence[PlannedRun]) -> list[FinishedRun]:
    """The planned runs whose folders are finished with the planned configuration."""
    finished = []
    for run in runs:
        if run_status(run) != "finished":
            continue
        summary = json.loads((run.folder / "summary.json").read_text())
        finished.append(FinishedRun(run, summary, read_jsonl(run.folder / "metrics.jsonl")))
    return finished


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) of the finite values.

    Returns ``(None, None)`` when no value is finite.
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return None, None
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return mean, math.sqrt(variance)


def target_accuracies(finished: Sequence[FinishedRun], suite: Suite) -> dict[float, float | None]:
    """Per alpha: ``target_fraction`` x the reference strategy's mean final accuracy.

    When the reference strategy is not in the grid, the first listed strategy is used.
    """
    labels = suite.strategy_labels
    reference = suite.reference if suite.reference in labels else labels[0]
    targets: dict[float, float | None] = {}
    for alpha in suite.alphas:
        mean, _ = mean_std(
            [
                f.summary.get("final_accuracy")
                for f in finished
                if f.run.alpha == alpha and f.run.label == reference
            ]
        )
        targets[alpha] = None if mean is None else suite.target_fraction * mean
    return targets


def median_round_seconds(finished: FinishedRun) -> float | None:
    """Median wall seconds of a run's rounds (robust to a slow first round on a busy machine).

    Falls back to the summary's mean when ``metrics.jsonl`` has no ``seconds``.
    """
    seconds = [
        float(row["seconds"])
        for row in finished.metrics
        if isinstance(row.get("seconds"), int | float)
    ]
    if not seconds:
        return _number(finished.summary.get("seconds_per_round"))
    return statistics.median(seconds)


def _relative(path: Path, start: Path | None) -> str:
    if start is not None:
        try:
            return path.relative_to(start).as_posix()
        except ValueError:
            pass
    return str(path)


def run_rows(
    finished: Sequence[FinishedRun],
    targets: Mapping[float, float | None],
    out: Path | None = None,
) -> list[dict[str, object]]:
    """One row per finished run (``runs.csv``; folders relative to ``out`` when inside it)."""
    rows: list[dict[str, object]] = []
    for f in finished:
        target = targets.get(f.run.alpha)
        rounds = max(int(f.summary.get("rounds", 0)), 1)
        rows.append(
            {
                "strategy": f.run.label,
                "alpha": f.run.alpha,
                "seed": f.run.seed,
                "final_accuracy": f.summary.get("final_accuracy"),
                "best_accuracy": f.summary.get("best_accuracy"),
                "mean_local_accuracy": f.summary.get("mean_local_accuracy"),
                "worst_local_accuracy": f.summary.get("worst_local_accuracy"),
                "target_accuracy": target,
                "rounds_to_target": (
                    None if target is None else rounds_to_target(f.metrics, target)
                ),
                "rounds": f.summary.get("rounds"),
                "seconds": f.summary.get("seconds"),
                "seconds_per_round": median_round_seconds(f),
                "mib_up_per_round": float(f.summary.get("bytes_received", 0)) / 2**20 / rounds,
                "folder": _relative(f.run.folder, out),
            }
        )
    return rows


def aggregate_rows(
    suite: Suite, per_run: Sequence[Mapping[str, object]]
) -> list[dict[str, object]]:
    """One row per (strategy, alpha), numeric: ``<metric>_mean`` / ``<metric>_std`` columns.

    ``rounds_to_target_*`` is over the seeds that reached the target (``reached`` of
    ``seeds``); ``None`` where no seed did or nothing finished.
    """
    rows: list[dict[str, object]] = []
    for alpha in suite.alphas:
        for label in suite.strategy_labels:
            cell = [r for r in per_run if r["strategy"] == label and r["alpha"] == alpha]
            row: dict[str, object] = {
                "strategy": label,
                "name": suite.display(label),
                "alpha": alpha,
                "seeds": len(cell),
            }
            for metric in ("final_accuracy", "worst_local_accuracy", "mean_local_accuracy"):
                mean, std = mean_std([_number(r[metric]) for r in cell])
                row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
            row["target_accuracy"] = cell[0]["target_accuracy"] if cell else None
            reached = [_number(r["rounds_to_target"]) for r in cell]
            reached = [r for r in reached if r is not None]
            row["rounds_to_target_mean"], row["rounds_to_target_std"] = mean_std(reached)
            row["reached"] = len(reached)
            row["seconds_per_round_mean"] = mean_std(
                [_number(r["seconds_per_round"]) for r in cell]
            )[0]
            row["mib_up_per_round_mean"] = mean_std([_number(r["mib_up_per_round"]) for r in cell])[
                0
            ]
            rows.append(row)
    return rows


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _pm(mean: object, std: object, digits: int = 4) -> str:
    if not isinstance(mean, int | float):
        return "-"
    if not isinstance(std, int | float):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(row: Mapping[str, object], metric: str, spread: bool) -> str:
    return _pm(row[f"{metric}_mean"], row[f"{metric}_std"] if spread else None)


def display_rows(rows: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """The numeric rows formatted for Markdown (``mean ± std`` cells)."""
    out: list[dict[str, object]] = []
    for row in rows:
        seeds = row["seeds"]
        spread = isinstance(seeds, int) and seeds > 1  # no std of a single seed
        if row["rounds_to_target_mean"] is None:
            rounds = f"- (0/{seeds})"
        else:
            reached = row["reached"]
            std = row["rounds_to_target_std"] if isinstance(reached, int) and reached > 1 else None
            rounds = f"{_pm(row['rounds_to_target_mean'], std, 1)} ({reached}/{seeds})"
        out.append(
            {
                "strategy": row["name"],
                "alpha": f"{row['alpha']:g}",
                "seeds": seeds,
                "final accuracy": _cell(row, "final_accuracy", spread),
                "worst-client accuracy": _cell(row, "worst_local_accuracy", spread),
                "mean local accuracy": _cell(row, "mean_local_accuracy", spread),
                "target": _pm(row["target_accuracy"], None),
                "rounds to target (reached)": rounds,
                "s/round": _pm(row["seconds_per_round_mean"], None, 1),
            }
        )
    return out


# -------------------------------------------------------------------------- plots
def _series(
    metrics: Sequence[Sequence[Mapping[str, Any]]], value: Callable[[Mapping[str, Any]], Any]
) -> tuple[list[int], list[list[float]]]:
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


def plot_grid(
    suite: Suite,
    finished: Sequence[FinishedRun],
    panels: Sequence[tuple[str, Callable[[Mapping[str, Any]], Any]]],
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
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    columns = len(suite.alphas)
    figure, axes = plt.subplots(
        len(panels), columns, figsize=(5.2 * columns, 3.6 * len(panels)), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column, alpha in enumerate(suite.alphas):
        for row_index, (ylabel, value) in enumerate(panels):
            axis = axes[row_index][column]
            for index, label in enumerate(suite.strategy_labels):
                metrics = [
                    f.metrics for f in finished if f.run.alpha == alpha and f.run.label == label
                ]
                rounds, values = _series(metrics, value)
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
                axis.plot(
                    rounds,
                    mean,
                    color=color,
                    marker="o",
                    markersize=3,
                    label=f"{suite.display(label)} (n={len(data)})",
                )
                axis.fill_between(rounds, low, high, color=color, alpha=0.18, linewidth=0)
            if row_index == 0 and targets and targets.get(alpha) is not None:
                axis.axhline(
                    float(targets[alpha] or 0.0),
                    color="black",
                    linestyle="--",
                    linewidth=0.8,
                    label="target",
                )
            if row_index == 0:
                axis.set_title(f"Dirichlet alpha = {alpha:g}")
            axis.set_xlabel("round")
            axis.set_ylabel(ylabel)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
    band_text = "min-max over seeds" if band == "minmax" else "± 1 std over seeds"
    figure.suptitle(f"{title} (line: mean, band: {band_text})" if title else band_text)
    figure.tight_layout()
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:  # below the panels, so that it never hides a curve
        figure.legend(
            handles,
            names,
            fontsize=8,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=max(1, min(len(handles), 2 if columns == 1 else 3)),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


# ------------------------------------------------------------------------ writing
def setup_text(suite: Suite, base: ExperimentConfig) -> str:
    """One sentence describing the shared configuration."""
    m, d, p, t, f = base.model, base.data, base.partition, base.train, base.federated
    examples = (
        f"{d.max_train_examples} train / {d.max_test_examples or 'all'} test examples"
        if d.max_train_examples
        else "all examples"
    )
    steps = f"local steps {t.local_steps}" if t.local_steps else f"local epochs {t.local_epochs}"
    return (
        f"model `{m.name}` ({m.num_experts} experts, top-{m.top_k}, {m.upcycle_layers} MoE "
        f"layers, trainable `{m.trainable}`), dataset `{d.dataset}` ({examples}), "
        f"{p.num_clients} clients, {p.method} partition with alpha in "
        f"{{{', '.join(f'{a:g}' for a in suite.alphas)}}}, {f.rounds} rounds, "
        f"fraction {f.fraction:g}, {steps}, batch {t.batch_size}, lr {t.lr:g}, "
        f"routing lambda {base.strategy.routing_lambda:g}, seeds {suite.seeds}"
    )


def results_markdown(
    suite: Suite,
    base: ExperimentConfig,
    table: str,
    command: str,
    missing: int,
    compute_seconds: float,
    band: str,
    reports: Sequence[tuple[str, Path]] = (),
) -> str:
    """The ``results.md`` page: setup, table, how to read it, plots, command."""
    reference = suite.display(
        suite.reference if suite.reference in suite.strategy_labels else suite.strategy_labels[0]
    )
    band_text = "min-max over seeds" if band == "minmax" else "± one standard deviation"
    lines = [
        f"# Benchmark `{suite.name}`{' (quick size)' if suite.quick else ''}",
        "",
    ]
    for paragraph in (suite.description, suite.note):
        if paragraph:
            lines += [paragraph, ""]
    lines += [
        f"Setup: {setup_text(suite, base)}.",
        "",
        table,
        "",
        "Each cell is the mean ± sample standard deviation (ddof=1) over seeds of the value "
        "after the last round. *worst-client accuracy* is the lowest local test accuracy "
        f"among clients. *target* = {suite.target_fraction:g} × {reference}'s mean final "
        "accuracy at the same alpha; *rounds to target* is the first round whose global "
        "accuracy reaches it, averaged over the seeds that reached it (how many did is in "
        "brackets). *s/round* is the median wall time of a round on the machine that ran it "
        "(mean over seeds).",
        "",
    ]
    if missing:
        lines += [f"**{missing} planned run(s) have not finished and are not in the table.**", ""]
    lines += [
        f"Total compute over the runs in the table: {compute_seconds / 60:.1f} min.",
        "",
        f"![convergence](convergence.png)  (line: mean over seeds, band: {band_text})",
        "",
        "![divergence](divergence.png)",
        "",
    ]
    if reports:
        lines += ["Routing and expert pictures of single runs (`fedalign report`):", ""]
        lines += [f"- [{title}]({path.as_posix()})" for title, path in reports]
        lines.append("")
    lines += [
        "Reproduce (finished runs under `runs/` are reused):",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


def write_results(
    suite: Suite,
    base: ExperimentConfig,
    runs: Sequence[PlannedRun],
    out: Path,
    command: str,
    band: str = "minmax",
    reports: bool = True,
) -> list[dict[str, object]]:
    """Aggregate the finished runs and write tables, plots and run reports into ``out``.

    Returns
    -------
    list of dict
        The aggregated numeric rows (as in ``results.csv``).
    """
    finished = load_finished(runs)
    targets = target_accuracies(finished, suite)
    per_run = run_rows(finished, targets, out)
    rows = aggregate_rows(suite, per_run)
    table = to_markdown(display_rows(rows))
    compute = sum(_number(r["seconds"]) or 0.0 for r in per_run)
    out.mkdir(parents=True, exist_ok=True)
    pages = write_run_reports(suite, finished, out) if reports else []
    markdown = results_markdown(
        suite, base, table, command, len(runs) - len(finished), compute, band, pages
    )
    atomic_write_text(out / "results.md", markdown)
    atomic_write_text(out / "results.csv", to_csv(rows))
    atomic_write_text(out / "runs.csv", to_csv(per_run))
    atomic_write_text(
        out / "results.json",
        json.dumps({"suite": suite.name, "quick": suite.quick, "rows": rows}, indent=2) + "\n",
    )
    title = f"{suite.name}{' (quick)' if suite.quick else ''}"
    plot_grid(
        suite,
        finished,
        [
            ("global test accuracy", lambda r: r.get("global_accuracy")),
            ("worst-client accuracy", lambda r: r.get("worst_local_accuracy")),
        ],
        out / "convergence.png",
        targets=targets,
        band=band,
        title=title,
    )
    plot_grid(
        suite,
        finished,
        [
            (
                "routing divergence (JS, mean over layers)",
                lambda r: layer_mean(r, "routing_divergence", "mean_js"),
            ),
            (
                "semantic dispersion (mean over layers)",
                lambda r: layer_mean(r, "semantic_dispersion", "mean_dispersion"),
            ),
        ],
        out / "divergence.png",
        band=band,
        title=title,
    )
    return rows


def write_run_reports(
    suite: Suite, finished: Sequence[FinishedRun], out: Path
) -> list[tuple[str, Path]]:
    """``fedalign report`` of the suite's ``report`` strategies, first seed, every alpha.

    Pages go to ``out/reports/<alpha>-seed<S>-<strategy>/index.html`` (outside ``runs/``,
    so that they travel with the tables). Returns (title, page path relative to ``out``).
    """
    from fedalign.report import build_report

    pages = []
    first_seed = suite.seeds[0]
    for f in finished:
        if f.run.label not in suite.report or f.run.seed != first_seed:
            continue
        name = f"{alpha_name(f.run.alpha)}-seed{f.run.seed}-{f.run.label.replace(':', '-')}"
        page = build_report(f.run.folder, out=out / "reports" / name)
        title = f"{suite.display(f.run.label)}, alpha = {f.run.alpha:g}, seed {f.run.seed}"
        pages.append((title, page.relative_to(out)))
    return pages


def command_text(args: argparse.Namespace) -> str:
    """A command line that reproduces this benchmark from its parsed arguments."""
    parts = ["fedalign", "benchmark", "--suite", str(args.suite)]
    if args.quick:
        parts.append("--quick")
    if args.seeds is not None:
        parts += ["--seeds", str(args.seeds)]
    if args.alphas:
        parts += ["--alphas", args.alphas]
    if args.strategies:
        parts += ["--strategies", args.strategies]
    if args.band != "minmax":
        parts += ["--band", args.band]
    if args.no_report:
        parts.append("--no-report")
    if args.keep_states:
        parts.append("--keep-states")
    if args.config:
        parts += ["--config", str(args.config)]
    for option in OVERRIDES:
        value = getattr(args, option.replace("-", "_"), None)
        if value is not None:
            parts += [f"--{option}", str(value)]
    for item in args.overrides:
        parts += ["--set", item]
    if args.out:
        parts += ["--out", str(args.out)]
    if args.no_progress:
        parts.append("--no-progress")
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)


def _git_commit() -> str:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return completed.stdout.strip() or "unknown"


def write_command(
    out: Path, command: str, seconds: float, counts: Mapping[str, int], redraw: bool = False
) -> None:
    """``COMMAND.txt``: the command, where and when it ran, and what it computed.

    With ``redraw`` (``--no-run``) an existing file keeps the command that made the runs and
    gets one line saying when the tables were redrawn.
    """
    path = out / "COMMAND.txt"
    if redraw and path.exists():
        note = (
            f"# tables and plots redrawn from finished runs (--no-run): "
            f"{datetime.now().isoformat(timespec='seconds')}\n"
        )
        atomic_write_text(path, path.read_text() + note)
        return
    invoked = shlex.join(["fedalign", *sys.argv[1:]]) if "fedalign" in sys.argv[0] else ""
    lines = [
        command,
        "",
        f"# invoked as: {invoked or command}",
        f"# directory: {os.getcwd()}",
        f"# finished: {datetime.now().isoformat(timespec='seconds')}",
        f"# wall time of this invocation: {seconds:.1f}s "
        f"(runs reused {counts.get('finished', 0)}, resumed {counts.get('resume', 0)}, "
        f"run {counts.get('new', 0)})",
        f"# git commit: {_git_commit()}; python {platform.python_version()}; "
        f"{os.cpu_count()} CPUs visible",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


# -------------------------------------------------------------------------- cli
def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise ConfigError(f"--alphas expects comma-separated numbers (got {text!r})") from error
    if not values:
        raise ConfigError("--alphas must name at least one alpha")
    return values


def resolve(args: argparse.Namespace) -> tuple[Suite, ExperimentConfig, Path]:
    """The suite (with command-line grid overrides), the base config and the output folder."""
    suite = load_suite(find_suite_file(args.suite), quick=args.quick)
    # suite base config, then --config, then the options and --set (cli.config_from_args)
    layered = suite.base
    if args.config:
        ExperimentConfig.from_toml(args.config)  # clear errors for a bad file
        with Path(args.config).open("rb") as handle:
            layered = merge_tables(layered, tomllib.load(handle))
    with tempfile.TemporaryDirectory() as directory:
        merged_path = Path(directory) / "suite-base.toml"
        ExperimentConfig.from_dict(layered).save(merged_path)
        config_args = copy.copy(args)
        config_args.config = merged_path
        base = config_from_args(config_args)
    if args.alpha is not None and args.alphas:
        raise ConfigError("give --alpha or --alphas, not both")
    if args.alphas:
        suite.alphas = _float_list(args.alphas)
    elif args.alpha is not None:
        suite.alphas = [args.alpha]
    if args.strategy and args.strategies:
        raise ConfigError("give --strategy or --strategies, not both")
    if args.strategies:
        suite.strategies = parse_strategy_list(args.strategies)
    elif args.strategy:
        suite.strategies = [(args.strategy, args.ablation or "full")]
    elif args.ablation:
        suite.strategies = [("fedalign", args.ablation)]
    if args.seeds is not None or args.seed is not None:
        start = args.seed if args.seed is not None else suite.seeds[0]
        count = args.seeds if args.seeds is not None else len(suite.seeds)
        suite.seeds = _seed_list(count, start)
    out = (
        Path(args.out)
        if args.out
        else Path("benchmarks/results") / (f"{suite.name}-quick" if suite.quick else suite.name)
    )
    return suite, base, out


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None] = print) -> Path:
    """Plan, run what is missing, aggregate and write; returns the results folder."""
    started = time.perf_counter()
    suite, base, out = resolve(args)
    runs = plan_runs(suite, base, out)
    command = command_text(args)
    if args.dry_run:
        for run in runs:
            log(f"{run_status(run):>8}  {run.folder}")
        return out
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(suite.path, out / "suite.toml")
    atomic_write_text(out / "base_config.toml", base.to_toml())
    log(
        f"benchmark {suite.name}{' (quick)' if suite.quick else ''}: {len(suite.strategies)} "
        f"strategies x {len(suite.alphas)} alphas x {len(suite.seeds)} seeds = {len(runs)} runs "
        f"-> {out}"
    )
    counts = {"finished": 0, "resume": 0, "new": 0}
    if not args.no_run:
        counts = execute_plan(runs, log, keep_states=args.keep_states)
    rows = write_results(
        suite, base, runs, out, command, band=args.band, reports=not args.no_report
    )
    write_command(out, command, time.perf_counter() - started, counts, redraw=args.no_run)
    log(to_markdown(display_rows(rows)))
    log(f"results: {out / 'results.md'}  plots: {out / 'convergence.png'}")
    return out


def _cmd_benchmark(args: argparse.Namespace) -> int:
    run_benchmark(args)
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``fedalign benchmark`` to the command line."""
    parser = subparsers.add_parser(
        "benchmark",
        help="the paper's grid: strategies x alphas x seeds, with tables and plots",
        description=(
            "Run a benchmark suite (benchmarks/<suite>.toml): every strategy at every "
            "Dirichlet alpha and seed. Finished runs are reused. Writes results.md/.csv "
            "(mean ± std over seeds), convergence.png, divergence.png and COMMAND.txt. "
            "Experiment options override the suite's base config; --alpha, --strategy, "
            "--ablation and --seed narrow the grid to one value."
        ),
    )
    parser.add_argument(
        "--suite",
        default="main",
        help=f"{' or '.join(SUITE_NAMES)} (benchmarks/<name>.toml) or a suite TOML path "
        "(default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="apply the suite's [quick] size")
    parser.add_argument("--seeds", type=int, help="number of seeds (overrides the suite)")
    parser.add_argument("--alphas", help="comma-separated Dirichlet alphas (overrides the suite)")
    parser.add_argument(
        "--strategies", help="comma-separated, 'fedalign:ROW' for ablations (overrides the suite)"
    )
    parser.add_argument(
        "--band",
        choices=BAND_CHOICES,
        default="minmax",
        help="plot band across seeds: min-max or ± std (default: %(default)s)",
    )
    parser.add_argument(
        "--no-run", action="store_true", help="only aggregate the runs that already finished"
    )
    parser.add_argument(
        "--no-report", action="store_true", help="no per-run report pages under reports/"
    )
    parser.add_argument(
        "--keep-states",
        action="store_true",
        help="keep each finished run's checkpoint/ and final_state.safetensors (large)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the planned runs and their status"
    )
    add_experiment_options(parser)
    for action in parser._actions:
        if "--out" in action.option_strings:
            action.help = "results folder (default: benchmarks/results/<suite>[-quick])"
    parser.set_defaults(handler=_cmd_benchmark)
