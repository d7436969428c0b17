"""``fedalign bench --suite parallel``: the simulator with a round's clients in 1 vs N worker
processes.

Runs ``fedalign run`` in a subprocess on the configuration (default: ``configs/demo.toml``
shortened to 3 rounds, one torch thread per process) with ``run.workers`` = each value of
``--workers``, interleaved, ``--repeats`` times. Per run: the median of the rounds' own
``seconds`` (``metrics.jsonl``: training, aggregation and evaluation) over rounds 2..R
(round 1 of a parallel run also starts the workers, each building the model and preparing
the data; it is reported separately), and the command's wall time. The last column says
whether ``final_state.safetensors`` is bitwise that of the first value of ``--workers``.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedalign.config import ExperimentConfig
from fedalign.experiments.bench.design import REPEATS
from fedalign.experiments.bench.output import interleaved_runs, write_results
from fedalign.experiments.bench.registry import (
    OUT_DIR,
    BenchRequest,
    BenchSuite,
    SuiteOption,
    comma_list,
    register,
)


def one_run(workers: int, config_file: Path, work: Path) -> dict[str, Any]:
    """``fedalign run`` of ``config_file`` with ``run.workers=workers`` into a folder of
    ``work``: round seconds, wall time, the final state's digest, the 1-min load before and
    after."""
    out = work / f"w{workers}"
    command = [sys.executable, "-m", "fedalign.cli", "run", "--config", str(config_file)]
    command += ["--set", f"run.workers={workers}", "--out", str(out), "--overwrite"]
    command += ["--no-progress"]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"workers={workers} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    seconds = [float(line["seconds"]) for line in lines]
    state = (out / "final_state.safetensors").read_bytes()
    return {
        "workers": workers,
        "round_seconds": seconds,
        "per_round": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
        "first_round": seconds[0],
        "wall": wall,
        "final_state": hashlib.sha256(state).hexdigest()[:16],
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def run_parallel(
    config: ExperimentConfig,
    workers: Sequence[int],
    repeats: int,
    log: Callable[[str], None] = lambda _line: None,
) -> list[dict[str, Any]]:
    """``repeats`` runs of :func:`one_run` per value of ``workers``, interleaved."""

    def describe(result: dict[str, Any]) -> str:
        rounds = [round(s, 1) for s in result["round_seconds"]]
        return (
            f"[workers={result['workers']} #{result['repeat']}] rounds {rounds}"
            f" wall {result['wall']:.0f} s, load {result['load_before']:.1f}"
            f"->{result['load_after']:.1f}"
        )

    return interleaved_runs(config, workers, repeats, one_run, describe, log)


def parallel_table(results: Sequence[dict[str, Any]], workers: Sequence[int]) -> str:
    """A row per worker count: median seconds a round, speed-up, round 1, wall, bitwise."""
    base = statistics.median(r["per_round"] for r in results if r["workers"] == workers[0])
    reference = next(r["final_state"] for r in results if r["workers"] == workers[0])
    lines = [
        "| run.workers | s/round, rounds 2..R (median of runs) | runs | speed-up | "
        "round 1 s | command wall s | final state = workers " + f"{workers[0]} |",
        "|---|---|---|---|---|---|---|",
    ]
    for count in workers:
        runs = [r for r in results if r["workers"] == count]
        median = statistics.median(r["per_round"] for r in runs)
        each = ", ".join(f"{r['per_round']:.1f}" for r in runs)
        same = all(r["final_state"] == reference for r in runs)
        lines.append(
            f"| {count} | {median:.2f} | {each} | {base / median:.2f}x | "
            f"{statistics.median(r['first_round'] for r in runs):.1f} | "
            f"{statistics.median(r['wall'] for r in runs):.0f} | {'yes' if same else 'no'} |"
        )
    return "\n".join(lines)


def parallel_page(
    text: str, command: str, results: Sequence[dict[str, Any]], workers: Sequence[int]
) -> str:
    """``speedup.md``: what ran, the load around each run, the table."""
    repeats = len({r["repeat"] for r in results})
    loads = [(round(r["load_before"], 1), round(r["load_after"], 1)) for r in results]
    return (
        f"# Simulator: a round's clients in worker processes\n\n`{command}`: `fedalign run` "
        f"on its configuration (`config` in speedup.json) with `run.workers` in {list(workers)}; "
        f"{repeats} interleaved repeats; {os.cpu_count()} cores shared with other jobs "
        f"(1-min load before/after each run: {loads}). See "
        f"`fedalign.experiments.bench.parallel`.\n\n{text}\n"
    )


WORKERS = SuiteOption(
    "workers", "parallel: values of run.workers, comma-separated", comma_list(int), "1,2"
)


def _run(request: BenchRequest) -> str:
    started = time.time()
    workers = request.options["workers"]
    results = run_parallel(request.config, workers, request.options["repeats"], request.log)
    text = parallel_table(results, workers)
    page = parallel_page(text, request.command, results, workers)
    data = {"command": request.command, "config": request.config.to_dict(), "results": results}
    write_results(request, "speedup", page, data, started)
    return text


register(
    BenchSuite(
        name="parallel",
        description="simulator rounds with clients in 1 vs N worker processes (run.workers)",
        run=_run,
        options=(WORKERS, REPEATS, OUT_DIR),
        config_file="configs/demo.toml",
        defaults=("federated.rounds=3", "run.threads=1"),
    )
)
