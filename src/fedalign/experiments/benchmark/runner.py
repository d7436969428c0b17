"""``fedalign benchmark``: run the paper's grid of strategies x Dirichlet alphas x seeds.

:func:`run_benchmark` plans the grid (:mod:`.plan`), runs what has not finished, and writes
the results folder (:mod:`.page`). While a run computes, its lock file
(``runs/alpha<A>/seed<S>/.<label>.lock``, an OS advisory lock released when the process
ends, however it ends) tells every other invocation on the same results folder to leave the
run alone: two invocations of one suite share its runs instead of both running (and
overwriting) one. Tokenisation and the frozen-prefix cache are computed
once per (alpha, seed) and shared by that cell's strategies. A finished run's checkpoint
and final parameters are deleted unless ``keep_states``. With ``rerun_other_machines``
the runs recorded on another machine are run again here (:func:`~.plan.run_status`).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
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
from fedalign.records import RunSummary, atomic_write_text, current_machine

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


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not shared
    fcntl = None  # type: ignore[assignment]


def lock_path(folder: Path) -> Path:
    """The lock file of a run folder: a sibling, so replacing the folder keeps it."""
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[bool]:
    """Hold the run folder's lock while the block runs; yields False when another process
    (or another open of the file in this one) holds it, True otherwise.

    Without ``fcntl`` (Windows) it always yields True: runs are not shared there.
    """
    if fcntl is None:  # pragma: no cover
        yield True
        return
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_busy(folder: Path) -> bool:
    """Whether another process is computing this run now (its lock is held)."""
    if not lock_path(folder).exists():
        return False
    with run_lock(folder) as acquired:
        return not acquired


def _run_one(
    run: PlannedRun, status: str, prepared: Any, log: Callable[[str], None], where: str
) -> None:
    if status == "resume":
        log(f"{where}: resuming the interrupted run")
    elif status == "rerun":
        log(f"{where}: recorded on another machine (or before provenance), running it here")
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
    runs: Sequence[PlannedRun],
    log: Callable[[str], None] = print,
    keep_states: bool = False,
    machine: str | None = None,
) -> dict[str, int]:
    """Run what is not finished; returns how many runs were reused, resumed, run, run again
    because another machine recorded them (``"rerun"``, only given ``machine``: this
    machine's id) and left to another process (``"busy"``: its lock was held, see
    :func:`run_lock`).

    Data is prepared lazily, once per (alpha, seed) group, and only when one of the
    group's runs has to compute. Unless ``keep_states``, a run's checkpoint and final
    parameters are deleted once it has finished (the table needs neither).
    """
    counts = {"finished": 0, "resume": 0, "new": 0, "rerun": 0, "busy": 0}
    prepared: dict[tuple[float, int], Any] = {}
    for index, run in enumerate(runs, start=1):
        where = f"[{index}/{len(runs)}] alpha={run.alpha:g} seed={run.seed} {run.label}"
        with run_lock(run.folder) as acquired:
            if not acquired:
                counts["busy"] += 1
                log(f"{where}: another process is running it, left to that one")
                continue
            status = run_status(run, machine)  # under the lock: another process may have ended it
            status = "new" if status == "differs" else status  # run_benchmark allowed it
            counts[status] += 1
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
    machine = None
    if options.rerun_other_machines:
        machine, label = current_machine(base.run.device)
        log(f"this machine: {machine} ({label}); runs recorded on others are run again")
    if options.dry_run:
        for run in runs:
            status = "busy" if is_busy(run.folder) else run_status(run, machine)
            log(f"{status:>8}  {run.folder}")
        return out
    conflicts = [
        run.folder for run in runs if run_status(run) == "differs" and not is_busy(run.folder)
    ]
    if conflicts and options.execute and not options.overwrite:
        raise RunFolderError(
            f"{len(conflicts)} run folder(s) of this benchmark hold runs of another "
            f"configuration, e.g. {str(conflicts[0])!r}; give --overwrite to replace them "
            "or --out for another results folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(suite.path, out / "suite.toml")
    atomic_write_text(out / "base_config.toml", base.to_toml())
    candidates = sum(run.row is not None for run in runs)
    tuned = f" (of which {candidates} tuning candidates)" if candidates else ""
    log(
        f"benchmark {suite.name}{' (quick)' if suite.quick else ''}: {len(suite.strategies)} "
        f"strategies x {len(suite.alphas)} alphas x {len(suite.seeds)} seeds = {len(runs)} runs"
        f"{tuned} -> {out}"
    )
    counts = {"finished": 0, "resume": 0, "new": 0, "rerun": 0, "busy": 0}
    if options.execute:
        counts = execute_plan(runs, log, keep_states=options.keep_states, machine=machine)
    rows = write_results(
        suite, base, runs, out, command, band=options.band, reports=options.reports
    )
    seconds = time.perf_counter() - started
    write_command(out, command, seconds, counts, redraw=not options.execute)
    log(to_markdown(display_rows(rows, suite.display(suite.reference_label))))
    if counts["busy"]:
        log(
            f"{counts['busy']} run(s) were running in another process: this page lacks them; "
            "the invocation that finishes last writes the complete page (or redraw it with "
            "--no-run)"
        )
    log(f"results: {out / 'results.md'}  plots: {out / 'convergence.png'}")
    return out
