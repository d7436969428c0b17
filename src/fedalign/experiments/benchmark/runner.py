"""``fedalign benchmark``: run the paper's grid of strategies x Dirichlet alphas x seeds.

:func:`run_benchmark` plans the grid (:mod:`.plan`), runs what has not finished, and writes
the results folder (:mod:`.page`). Tokenisation and the frozen-prefix cache are computed
once per (alpha, seed) and shared by that cell's strategies. A finished run's checkpoint
and final parameters are deleted unless ``keep_states``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedalign.config import ExperimentConfig
from fedalign.errors import RunFolderError
from fedalign.experiments.benchmark.page import write_command, write_results
from fedalign.experiments.benchmark.plan import (
    BenchmarkOptions,
    PlannedRun,
    command_text,
    plan_runs,
    resolve,
    run_status,
)
from fedalign.experiments.benchmark.results import display_rows
from fedalign.experiments.compare import prepare_shared_data
from fedalign.experiments.run import run_experiment as simulate
from fedalign.experiments.tables import to_markdown
from fedalign.records import RunSummary, atomic_write_text

STATE_FILES = ("checkpoint", "final_state.safetensors")
"""What a finished run folder holds only for resuming or reloading the model (large)."""


def run_experiment(config: ExperimentConfig, out_dir: Path, **kwargs: Any) -> RunSummary:
    """The simulator's :func:`~fedalign.experiments.run.run_experiment` (replaced in tests)."""
    return simulate(config, out_dir, **kwargs)


def prune_states(folder: Path) -> None:
    """Delete a finished run's checkpoint and final parameters (tens of MiB each)."""
    for name in STATE_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _run_one(
    run: PlannedRun, status: str, prepared: Any, log: Callable[[str], None], where: str
) -> None:
    if status == "resume":
        log(f"{where}: resuming the interrupted run")
    else:
        stale = run.folder / "summary.json"
        if stale.exists():
            stale.unlink()  # a different configuration finished here before
        log(f"{where}: running")
    # "new" may be a folder of the same config that never checkpointed, or (with
    # --overwrite, checked by run_benchmark) one of another config: replaced either way
    summary = run_experiment(
        run.config,
        run.folder,
        prepared=prepared,
        resume=status == "resume",
        overwrite=status != "resume",
    )
    log(
        f"{where}: final accuracy {summary.final_accuracy:.4f} "
        f"({summary.seconds:.1f}s, {summary.seconds_per_round:.1f}s/round)"
    )


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
    for index, run in enumerate(runs, start=1):
        status = run_status(run)
        status = "new" if status == "differs" else status  # run_benchmark allowed it
        counts[status] += 1
        where = f"[{index}/{len(runs)}] alpha={run.alpha:g} seed={run.seed} {run.label}"
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
        _run_one(run, status, prepared[run.group], log, where)
        if not keep_states:
            prune_states(run.folder)
    return counts


def run_benchmark(options: BenchmarkOptions, log: Callable[[str], None] = print) -> Path:
    """Plan, run what is missing, aggregate and write; returns the results folder."""
    started = time.perf_counter()
    suite, base, out = resolve(options)
    runs = plan_runs(suite, base, out)
    command = command_text(options)
    if options.dry_run:
        for run in runs:
            log(f"{run_status(run):>8}  {run.folder}")
        return out
    conflicts = [run.folder for run in runs if run_status(run) == "differs"]
    if conflicts and options.execute and not options.overwrite:
        raise RunFolderError(
            f"{len(conflicts)} run folder(s) of this benchmark hold runs of another "
            f"configuration, e.g. {str(conflicts[0])!r}; give --overwrite to replace them "
            "or --out for another results folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(suite.path, out / "suite.toml")
    atomic_write_text(out / "base_config.toml", base.to_toml())
    log(
        f"benchmark {suite.name}{' (quick)' if suite.quick else ''}: {len(suite.strategies)} "
        f"strategies x {len(suite.alphas)} alphas x {len(suite.seeds)} seeds = {len(runs)} runs "
        f"-> {out}"
    )
    counts = {"finished": 0, "resume": 0, "new": 0}
    if options.execute:
        counts = execute_plan(runs, log, keep_states=options.keep_states)
    rows = write_results(
        suite, base, runs, out, command, band=options.band, reports=options.reports
    )
    seconds = time.perf_counter() - started
    write_command(out, command, seconds, counts, redraw=not options.execute)
    log(to_markdown(display_rows(rows, suite.display(suite.reference_label))))
    log(f"results: {out / 'results.md'}  plots: {out / 'convergence.png'}")
    return out
