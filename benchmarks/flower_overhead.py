"""Issue 14: per-round wall time of a loopback Flower deployment against the simulator.

For one configuration (default: ``configs/demo.toml`` with 3 clients and 4 rounds, one
torch thread per process), runs, in turn and ``--repeats`` times:

``sim``
    ``fedalign run`` (the in-process simulator; clients train one after another).
``cold``
    SuperLink + one SuperNode per client on 127.0.0.1, Flower's default isolation: a fresh
    ``flwr-clientapp`` process per message, which builds the model and prepares its
    partition every time.
``warm``
    The same with ``flower-supernode --isolation process`` and a ``fedalign flower-worker``
    per SuperNode (:mod:`fedalign.flower.worker`): model and partition built once.
``warm-tls`` / ``cold-tls``
    As ``warm`` / ``cold`` with TLS (a self-signed CA, ``scripts/flower_certificates.sh``).
``cold-before``
    As ``cold``, but the SuperLink and SuperNodes import the fedalign of ``--before-repo``
    (its ``src/`` and its ``pyproject.toml``; run-config keys it lacks are left out): the
    numbers before this branch's changes.

What is counted: a watcher polls the run folder's ``metrics.jsonl`` every 0.05 s and notes
when each round's line appears; the **per-round time** of a run is the median interval
between consecutive lines from round 1 to round R (R - 1 intervals: start-up, the server's
preparation and round 1 are excluded, as is the run's end). Both transports write the line
after the server's evaluation of the round. The table gives the median over repeats and its
ratio to ``sim``; ``bitwise`` says whether the run's ``final_state.safetensors`` equals the
simulator's.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/flower_overhead.py \
        --modes sim,cold,warm,warm-tls --repeats 2 --out benchmarks/results/flower

Writes ``overhead.md`` and ``overhead.json`` under ``--out`` and appends the command to
``COMMAND.txt``. Every process it starts is stopped by process group id, also on failure.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedalign.config import ExperimentConfig
from fedalign.flower.loopback import LoopbackDeployment, run_config_argument

REPO = Path(__file__).resolve().parents[1]
MODES = ("sim", "cold", "warm", "cold-tls", "warm-tls", "cold-before")


class LineWatcher(threading.Thread):
    """Notes the time each new line of a file appears (polling)."""

    def __init__(self, path: Path, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.interval = interval
        self.times: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self._look()
            self.done.wait(self.interval)
        self._look()

    def _look(self) -> None:
        if not self.path.exists():
            return
        count = sum(1 for line in self.path.read_text().splitlines() if line.strip())
        now = time.perf_counter()
        while len(self.times) < count:
            self.times.append(now)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else ""


def one_run(
    mode: str,
    config: ExperimentConfig,
    config_args: list[str],
    work: Path,
    before_repo: Path | None = None,
) -> dict:
    """One run of ``mode``: per-round intervals, total seconds, final-state digest."""
    out = work / f"run-{mode}"
    watcher = LineWatcher(out / "metrics.jsonl")
    started = time.perf_counter()
    env = dict(os.environ)
    app_dir = REPO
    if mode == "cold-before":
        if before_repo is None:
            raise ValueError("mode cold-before needs --before-repo")
        app_dir = before_repo
        env["PYTHONPATH"] = f"{before_repo / 'src'}{os.pathsep}{REPO / 'src'}"
    if mode == "sim":
        watcher.start()
        command = [
            sys.executable,
            "-m",
            "fedalign.cli",
            "run",
            *config_args,
            "--out",
            str(out),
            "--overwrite",
            "--no-progress",
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
        log = done.stdout + done.stderr
        code = done.returncode
    else:
        warm = mode.startswith("warm")
        tls = mode.endswith("tls")
        deployment = LoopbackDeployment(
            work / f"deploy-{mode}", config.partition.num_clients, warm=warm, tls=tls, env=env
        )
        with deployment:
            watcher.start()
            completed = deployment.run(
                app_dir, run_config_argument(config, out, app_dir), timeout=3600
            )
        log = completed.stdout + completed.stderr
        code = completed.returncode
    total = time.perf_counter() - started
    watcher.done.set()
    watcher.join()
    if code != 0 or len(watcher.times) < config.federated.rounds:
        raise RuntimeError(
            f"{mode} failed (exit {code}, {len(watcher.times)} rounds):\n{log[-4000:]}"
        )
    times = watcher.times
    intervals = [b - a for a, b in itertools.pairwise(times)]
    return {
        "mode": mode,
        "intervals": intervals,
        "per_round": statistics.median(intervals) if intervals else float("nan"),
        "total": total,
        "final_state": digest(out / "final_state.safetensors"),
        "load": os.getloadavg()[0],
    }


def table(results: list[dict], modes: list[str]) -> str:
    by_mode = {m: [r for r in results if r["mode"] == m] for m in modes}
    sim = statistics.median(r["per_round"] for r in by_mode["sim"]) if by_mode.get("sim") else None
    reference = by_mode["sim"][0]["final_state"] if by_mode.get("sim") else ""
    lines = [
        "| transport | per-round s (median of runs) | runs' per-round s | x sim | "
        "command wall s (median) | final state = sim's |",
        "|---|---|---|---|---|---|",
    ]
    for mode in modes:
        runs = by_mode[mode]
        median = statistics.median(r["per_round"] for r in runs)
        ratio = f"{median / sim:.2f}" if sim else "-"
        same = all(r["final_state"] == reference for r in runs) if reference else None
        each = ", ".join(f"{r['per_round']:.1f}" for r in runs)
        lines.append(
            f"| {mode} | {median:.1f} | {each} | "
            f"{ratio} | {statistics.median(r['total'] for r in runs):.0f} | "
            f"{'yes' if same else 'no' if same is not None else '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument(
        "--set",
        action="append",
        default=None,
        help="section.key=value (default: 3 clients, 4 rounds, one thread)",
    )
    parser.add_argument("--modes", default="sim,cold,warm,warm-tls")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/flower")
    parser.add_argument("--name", default="overhead")
    parser.add_argument(
        "--before-repo", type=Path, help="a checkout without this branch (mode cold-before)"
    )
    args = parser.parse_args()
    settings = args.set or [
        "partition.num-clients=3",
        "federated.rounds=4",
        "run.threads=1",
    ]
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; accepted: {list(MODES)}")
    config = ExperimentConfig.from_toml(args.config)
    for item in settings:
        key, _, value = item.partition("=")
        config.set(key, value)
    config.validate()
    config_args = ["--config", args.config]
    for item in settings:
        config_args += ["--set", item]
    started = time.time()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedalign-overhead-") as folder:
        for repeat in range(args.repeats):
            for mode in modes:  # interleaved: each repeat sees the machine's load in turn
                result = one_run(
                    mode, config, config_args, Path(folder) / f"r{repeat}", args.before_repo
                )
                result["repeat"] = repeat
                print(
                    f"[{mode} #{repeat}] per-round {result['per_round']:.2f} s "
                    f"(intervals {[round(i, 2) for i in result['intervals']]}), "
                    f"total {result['total']:.0f} s, load {result['load']:.1f}",
                    flush=True,
                )
                results.append(result)
    text = table(results, modes)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(
        json.dumps({"settings": settings, "config": args.config, "results": results}, indent=1)
    )
    (out / f"{args.name}.md").write_text(
        f"# Per-round wall time: loopback Flower deployment vs the simulator\n\n"
        f"Config `{args.config}` with {settings}; {config.partition.num_clients} SuperNodes "
        f"on 127.0.0.1; {args.repeats} interleaved repeats. Per-round = median interval "
        f"between consecutive `metrics.jsonl` lines (rounds 1 -> {config.federated.rounds}; "
        f"start-up and round 1 excluded). See `benchmarks/flower_overhead.py`.\n\n{text}\n"
    )
    command = "OMP_NUM_THREADS=1 PYTHONPATH=src python " + " ".join(sys.argv)
    with (out / "COMMAND.txt").open("a", encoding="utf-8") as handle:
        handle.write(
            f"{command}\n"
            f"finished {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')} "
            f"after {time.time() - started:.0f} s; {platform.machine()}, {os.cpu_count()} cores "
            f"shared with other jobs (1-min load average at the end of each run: "
            f"{[round(r['load'], 1) for r in results]}), Python {platform.python_version()}\n\n"
        )


if __name__ == "__main__":
    main()
