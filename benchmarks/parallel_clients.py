"""Issue 14: speed-up of the simulator with a round's clients in 1 vs N worker processes.

Runs ``fedalign run`` on one configuration (default: ``configs/demo.toml`` shortened to 3
rounds, 10 clients, one torch thread per process) with ``run.workers`` = each value of
``--workers``, interleaved, ``--repeats`` times. Per run: the median of the rounds' own
``seconds`` (``metrics.jsonl``: training, aggregation and evaluation) over rounds 2..R
(round 1 of a parallel run also starts the workers, each building the model and preparing
the data; it is reported separately), and the command's wall time. ``bitwise`` compares
``final_state.safetensors`` with the first value of ``--workers``.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/parallel_clients.py \
        --workers 1,2 --repeats 2 --out benchmarks/results/parallel

Writes ``speedup.md`` / ``speedup.json`` under ``--out`` and appends to ``COMMAND.txt``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def one_run(workers: int, config: str, settings: list[str], out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "fedalign.cli", "run", "--config", config]
    for item in [*settings, f"run.workers={workers}"]:
        command += ["--set", item]
    command += ["--out", str(out), "--overwrite", "--no-progress"]
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


def table(results: list[dict[str, Any]], workers: list[int]) -> str:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--set", action="append", default=None, help="section.key=value")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/parallel")
    args = parser.parse_args()
    settings = args.set or ["federated.rounds=3", "run.threads=1"]
    workers = [int(w) for w in args.workers.split(",")]
    started = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedalign-parallel-") as folder:
        for repeat in range(args.repeats):
            for count in workers:
                result = one_run(count, args.config, settings, Path(folder) / f"w{count}-{repeat}")
                result["repeat"] = repeat
                rounds = [round(s, 1) for s in result["round_seconds"]]
                print(
                    f"[workers={count} #{repeat}] rounds {rounds}"
                    f" wall {result['wall']:.0f} s, load {result['load_before']:.1f}"
                    f"->{result['load_after']:.1f}",
                    flush=True,
                )
                results.append(result)
    text = table(results, workers)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speedup.json").write_text(
        json.dumps({"settings": settings, "results": results}, indent=1)
    )
    loads = [(round(r["load_before"], 1), round(r["load_after"], 1)) for r in results]
    (out / "speedup.md").write_text(
        f"# Simulator: a round's clients in worker processes\n\n`fedalign run --config "
        f"{args.config}` with {settings} and `run.workers` in {workers}; {args.repeats} "
        f"interleaved repeats; {os.cpu_count()} cores shared with other jobs (1-min load "
        f"before/after each run: {loads})."
        f" See `benchmarks/parallel_clients.py`.\n\n{text}\n"
    )
    command = "OMP_NUM_THREADS=1 PYTHONPATH=src python " + " ".join(sys.argv)
    finished = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with (out / "COMMAND.txt").open("a", encoding="utf-8") as handle:
        handle.write(
            f"{command}\nfinished {finished}"
            f" after {time.time() - started:.0f} s; {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}\n\n"
        )


if __name__ == "__main__":
    main()
