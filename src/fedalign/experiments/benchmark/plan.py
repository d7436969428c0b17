"""From typed options to the planned grid of runs, and the state of each run's folder.

Every (alpha, seed, strategy) cell is one run folder ``runs/alpha<A>/seed<S>/<label>``
under the output folder (``label`` from :func:`fedalign.config.run_label`); a row of
``[suite.tune]`` is one folder per candidate value instead (``<label>--<key>-<value>``,
:func:`~.suite.candidate_label`). A folder whose
``summary.json`` exists and whose ``config.toml`` equals the planned configuration (the
``[run]`` section aside) is reused; one with the same configuration and a checkpoint but
no summary (an interrupted run) is resumed; anything else is run from scratch. With
``rerun_other_machines``, a finished or interrupted run recorded on another machine than
this one (its ``provenance.json``; none counts as another) is run again from scratch.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedalign.config import ConfigError, ExperimentConfig, default_variant, run_label
from fedalign.experiments.benchmark.suite import (
    Chosen,
    Suite,
    Tune,
    Variant,
    apply_variant,
    candidate_label,
    find_suite_file,
    load_suite,
    merge_tables,
    read_toml,
    seed_list,
)
from fedalign.records.provenance import read_provenance, recorded_machine
from fedalign.records.run_folder import numeric_run_settings

BAND_CHOICES = ("minmax", "std")
"""Plot bands across seeds: min-max, or mean ± one sample standard deviation."""


@dataclass
class BenchmarkOptions:
    """What ``fedalign benchmark`` was asked to do (the command line's options, typed).

    Parameters
    ----------
    suite : str
        A shipped suite name (``main``, ``ablation``) or a path to a suite TOML file.
    quick : bool
        Apply the suite's ``[quick]`` size.
    seeds : int or None
        Number of seeds (None: the suite's).
    first_seed : int or None
        First seed of the grid (None: the suite's).
    alphas : list of float or None
        Dirichlet alphas (None: the suite's).
    strategies : list of (str, str) or None
        ``(strategy, ablation)`` pairs (None: the suite's).
    config_file : Path or None
        An experiment TOML layered over the suite's base config.
    settings : dict of str to object
        ``section.key`` -> value, applied after the config file (named options).
    overrides : list of str
        ``section.key=value`` strings, applied last (``--set``).
    out : Path or None
        Results folder (None: ``benchmarks/results/<suite>[-quick]``).
    progress : bool
        Progress bars in the runs.
    threads : int or None
        Torch threads of the runs (``[run]`` section: not part of the experiment).
    band : {"minmax", "std"}
        Plot band across seeds.
    execute : bool
        Run what has not finished (False: only aggregate the finished runs).
    reports : bool
        Write ``fedalign report`` pages of the suite's ``report`` strategies.
    keep_states : bool
        Keep each finished run's checkpoint and final parameters.
    dry_run : bool
        Only list the planned runs and their status.
    overwrite : bool, default False
        Replace run folders that hold a run of another configuration (status
        ``"differs"``); without it such a folder stops the benchmark before anything runs.
    rerun_other_machines : bool, default False
        Run again (replacing them) the finished or interrupted runs recorded on another
        machine than this one, or recorded before provenance (status ``"rerun"``), so that
        every run of the table comes from this machine.
    """

    suite: str = "main"
    quick: bool = False
    seeds: int | None = None
    first_seed: int | None = None
    alphas: list[float] | None = None
    strategies: list[tuple[str, str]] | None = None
    config_file: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    out: Path | None = None
    progress: bool = True
    threads: int | None = None
    band: str = "minmax"
    execute: bool = True
    reports: bool = True
    keep_states: bool = False
    dry_run: bool = False
    overwrite: bool = False
    rerun_other_machines: bool = False


@dataclass
class PlannedRun:
    """One cell of the grid: a strategy at one alpha and seed, and its run folder.

    A candidate of a ``[suite.tune]`` row has ``row`` (the row's label) and ``value`` (its
    candidate value); ``label`` is then :func:`~.suite.candidate_label`.
    """

    label: str
    alpha: float
    seed: int
    config: ExperimentConfig
    folder: Path
    row: str | None = None
    value: Any = None

    @property
    def group(self) -> tuple[float, int]:
        """Runs of one group share the partition and the prepared data."""
        return (self.alpha, self.seed)


def base_config(suite: Suite, options: BenchmarkOptions) -> ExperimentConfig:
    """The suite's base config, then the config file, the settings, ``--set`` and ``[run]``."""
    layered = suite.base
    if options.config_file is not None:
        layered = merge_tables(layered, read_toml(options.config_file, "config file"))
    config = ExperimentConfig.from_dict(layered)
    for key, value in options.settings.items():
        config.set(key, value)
    config.apply_overrides(options.overrides)
    if not options.progress:
        config.run.progress = False
    if options.threads:
        config.run.threads = options.threads
    config.validate()
    return config


def narrow_grid(suite: Suite, options: BenchmarkOptions) -> Suite:
    """The suite with the options' alphas, strategies and seeds in place of its own."""
    if options.alphas is not None:
        if not options.alphas:
            raise ConfigError("the alpha list must name at least one alpha")
        suite.alphas = [float(a) for a in options.alphas]
    if options.strategies is not None:
        if not options.strategies:
            raise ConfigError("the strategy list must name at least one strategy")
        suite.strategies = list(options.strategies)
    if options.seeds is not None or options.first_seed is not None:
        start = options.first_seed if options.first_seed is not None else suite.seeds[0]
        count = options.seeds if options.seeds is not None else len(suite.seeds)
        suite.seeds = seed_list(count, start)
    return suite


def resolve(options: BenchmarkOptions) -> tuple[Suite, ExperimentConfig, Path]:
    """The suite (with the options' grid), the base config and the results folder."""
    suite = load_suite(find_suite_file(options.suite), quick=options.quick)
    base = base_config(suite, options)
    suite = narrow_grid(suite, options)
    default = Path("benchmarks/results") / (f"{suite.name}-quick" if suite.quick else suite.name)
    return suite, base, Path(options.out) if options.out is not None else default


def alpha_name(alpha: float) -> str:
    """``alpha0.1``, ``alpha1``: the folder name of one alpha."""
    return f"alpha{alpha:g}"


def _candidates(label: str, tune: Tune | None) -> list[tuple[str, str | None, Any]]:
    """(run label, tuned row, value) of a suite row: itself, or one per candidate value."""
    if tune is None:
        return [(label, None, None)]
    return [(candidate_label(label, tune, value), label, value) for value in tune.values]


def chosen_value(label: str, chosen: Chosen, alpha: float) -> Any:
    """The value that ``chosen.results`` chose for ``chosen.row``'s ``chosen.tuned_key`` at
    ``alpha`` (to be set as ``chosen.key``).

    Raises
    ------
    ConfigError
        When that results folder has no ``results.json``, or it holds no choice of that key
        for that row at that alpha (the tuning suite has not been run there, or not to the
        end).
    """
    where = f"suite.chosen.{label}"
    path = chosen.results / "results.json"
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ConfigError(
            f"{where}: {str(path)!r} not found; run the suite that tunes {chosen.tuned_key} "
            f"(results folder {str(chosen.results)!r}) first"
        ) from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where}: {str(path)!r} is not valid JSON: {error}") from error
    found = [
        c
        for c in payload.get("tuning", [])
        if c.get("label") == chosen.row
        and c.get("key") == chosen.tuned_key
        and c.get("alpha") == alpha
    ]
    if not found or found[0].get("chosen_value") is None:
        tuned = sorted(
            f"{c.get('label')} {c.get('key')} alpha {c.get('alpha'):g}"
            for c in payload.get("tuning", [])
            if c.get("chosen_value") is not None
        )
        raise ConfigError(
            f"{where}: {str(path)!r} holds no choice of {chosen.tuned_key} for row "
            f"{chosen.row!r} at alpha {alpha:g} (choices there: {tuned or 'none'})"
        )
    if not found[0].get("complete", False):
        raise ConfigError(
            f"{where}: the choice of {chosen.tuned_key} for row {chosen.row!r} at alpha "
            f"{alpha:g} in {str(path)!r} is provisional (made on seeds {found[0].get('seeds')} of "
            f"{found[0].get('planned_seeds')}); finish that suite's runs first"
        )
    return found[0]["chosen_value"]


def plan_runs(suite: Suite, base: ExperimentConfig, out: Path) -> list[PlannedRun]:
    """Expand the grid; order: alpha, then seed, then strategy (as listed by the suite),
    a tuned row's candidates in their listed order.

    Raises
    ------
    ConfigError
        When a ``[suite.tune]`` row would run without a validation set, or a
        ``[suite.chosen]`` value is not there (:func:`chosen_value`).
    """
    runs = []
    for alpha in suite.alphas:
        chosen_values = {  # one read of each tuning suite's results per alpha
            label: chosen_value(label, chosen, alpha)
            for label, chosen in suite.chosen.items()
            if label in suite.strategy_labels
        }
        for seed in suite.seeds:
            for name, ablation in suite.strategies:
                row_label = run_label(name, ablation)
                variant = suite.variants.get(row_label, Variant(name, ablation))
                tune = suite.tune.get(row_label)
                for label, row, value in _candidates(row_label, tune):
                    config = apply_variant(base.copy(), variant)
                    if row_label in chosen_values:
                        config.set(suite.chosen[row_label].key, chosen_values[row_label])
                    if tune is not None:
                        config.set(tune.key, value)
                        if config.data.validation_examples < 1:
                            raise ConfigError(
                                f"suite.tune.{row_label} chooses {tune.key} on validation "
                                "accuracy: data.validation-examples must be > 0 (got "
                                f"{config.data.validation_examples})"
                            )
                    config.partition.alpha = alpha
                    config.federated.seed = seed
                    folder = out / "runs" / alpha_name(alpha) / f"seed{seed}" / label
                    config.run.out = str(folder)
                    config.validate()
                    runs.append(PlannedRun(label, alpha, seed, config, folder, row, value))
    return runs


def same_experiment(a: ExperimentConfig, b: ExperimentConfig) -> bool:
    """Equal configurations, ignoring the ``[run]`` section (output folder, progress, threads,
    device) except what changes the numbers (``run.precision``, ``run.frozen-dtype``:
    :func:`~fedalign.records.run_folder.numeric_run_settings`)."""
    left, right = a.to_dict(), b.to_dict()
    left.pop("run", None)
    right.pop("run", None)
    return left == right and numeric_run_settings(a) == numeric_run_settings(b)


def run_status(run: PlannedRun, machine: str | None = None) -> str:
    """``"finished"`` (reuse), ``"resume"`` (interrupted, same config), ``"new"`` (nothing
    there, or the same config that never checkpointed) or ``"differs"`` (the folder holds a
    run of another or an unreadable configuration: replaced only with ``overwrite``).

    Given ``machine`` (this machine's id, :func:`~fedalign.records.current_machine`), a
    run that would be reused or resumed but was recorded on another machine, partly or
    wholly, or before provenance, is ``"rerun"`` (run again from scratch).
    """
    config_path = run.folder / "config.toml"
    if not config_path.exists():
        return "differs" if (run.folder / "metrics.jsonl").exists() else "new"
    try:
        saved = ExperimentConfig.from_toml(config_path)
    except ConfigError:
        return "differs"
    if not same_experiment(saved, run.config):
        return "differs"
    if (run.folder / "summary.json").exists():
        status = "finished"
    elif (run.folder / "checkpoint" / "state.pt").exists():
        status = "resume"
    else:
        return "new"
    if machine is not None and recorded_machine(read_provenance(run.folder))[0] != machine:
        return "rerun"
    return status


def _grid_flags(options: BenchmarkOptions) -> list[str]:
    parts = ["--suite", str(options.suite)]
    if options.quick:
        parts.append("--quick")
    if options.seeds is not None:
        parts += ["--seeds", str(options.seeds)]
    if options.first_seed is not None:
        parts += ["--seed", str(options.first_seed)]
    if options.alphas is not None:
        parts += ["--alphas", ",".join(f"{a:g}" for a in options.alphas)]
    if options.strategies is not None:
        items = [
            name if ablation == default_variant(name) else f"{name}:{ablation}"
            for name, ablation in options.strategies
        ]
        parts += ["--strategies", ",".join(items)]
    return parts


def command_text(options: BenchmarkOptions) -> str:
    """A command line that reproduces this benchmark (settings written as ``--set``)."""
    parts = ["fedalign", "benchmark", *_grid_flags(options)]
    if options.band != "minmax":
        parts += ["--band", options.band]
    flags = (
        (not options.reports, "--no-report"),
        (options.keep_states, "--keep-states"),
        (not options.progress, "--no-progress"),
    )
    parts += [flag for wanted, flag in flags if wanted]
    if options.config_file is not None:
        parts += ["--config", str(options.config_file)]
    for key, value in options.settings.items():
        if key == "federated.seed" and options.first_seed is not None:
            continue  # --seed says it
        parts += ["--set", f"{key}={value}"]
    for item in options.overrides:
        parts += ["--set", item]
    if options.out is not None:
        parts += ["--out", str(options.out)]
    if options.threads:
        parts += ["--threads", str(options.threads)]
    return shlex.join(parts)
