"""``fedalign bench --suite flower-overhead``: per-round wall time of a loopback Flower
deployment against the simulator.

For one configuration (default: ``configs/demo.toml`` with 3 clients and 4 rounds, one
torch thread per process), runs each of ``--modes`` in turn, ``--repeats`` times:

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
    (its ``src/`` and its ``pyproject.toml``; run-config keys it lacks are left out).

What is counted: a watcher polls the run folder's ``metrics.jsonl`` every 0.05 s and notes
when each round's line appears; the **per-round time** of a run is the median interval
between consecutive lines from round 1 to round R (start-up, the server's preparation and
round 1 are excluded, as is the run's end). Both transports write the line after the
server's evaluation of the round. The table gives the median over repeats and its ratio to
``sim``, and whether each run's ``final_state.safetensors`` equals the simulator's.

Transport timing (:func:`time_run`, :func:`run_overhead`) is separate from the table and
page (:func:`overhead_table`, :func:`overhead_page`). The Flower app is the current
folder's (its ``pyproject.toml``): run from the repository root. Flower is optional: the
deployment modes import :mod:`fedalign.flower.loopback` when they run. Every process a
deployment starts is stopped by process group id, also on failure.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedalign.config import ConfigError, ExperimentConfig
from fedalign.errors import FedAlignError
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
    """First 16 hex digits of the file's SHA-256 ("" when it is missing)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else ""


def simulate(
    config_file: Path, out: Path, env: dict[str, str], watcher: LineWatcher
) -> tuple[int, str]:
    """Mode ``sim``: ``fedalign run`` in a subprocess; its exit code and output."""
    command = [sys.executable, "-m", "fedalign.cli", "run", "--config", str(config_file)]
    command += ["--out", str(out), "--overwrite", "--no-progress"]
    watcher.start()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    return done.returncode, done.stdout + done.stderr


def deploy(
    mode: str,
    config: ExperimentConfig,
    out: Path,
    work: Path,
    env: dict[str, str],
    app_dir: Path,
    watcher: LineWatcher,
) -> tuple[int, str]:
    """A deployment mode: a loopback SuperLink and SuperNodes, ``flwr run`` of ``app_dir``;
    its exit code and output."""
    try:
        from fedalign.flower.loopback import LoopbackDeployment, run_config_argument
    except ImportError as error:  # Flower is an optional dependency
        raise FedAlignError(
            f"mode {mode} needs Flower: pip install 'fedalign[flower]' ({error})"
        ) from None
    warm, tls = mode.startswith("warm"), mode.endswith("tls")
    deployment = LoopbackDeployment(
        work / f"deploy-{mode}", config.partition.num_clients, warm=warm, tls=tls, env=env
    )
    with deployment:
        watcher.start()
        completed = deployment.run(app_dir, run_config_argument(config, out, app_dir), timeout=3600)
    return completed.returncode, completed.stdout + completed.stderr


def time_run(
    mode: str,
    config: ExperimentConfig,
    config_file: Path,
    work: Path,
    before_repo: Path | None = None,
) -> dict[str, Any]:
    """One run of ``mode``: per-round intervals, total seconds, final-state digest, load."""
    out = work / f"run-{mode}"
    watcher = LineWatcher(out / "metrics.jsonl")
    env, app_dir = dict(os.environ), Path.cwd()
    if mode == "cold-before":
        if before_repo is None:
            raise ConfigError("mode cold-before needs --before-repo")
        app_dir = before_repo
        env["PYTHONPATH"] = f"{before_repo / 'src'}{os.pathsep}{Path.cwd() / 'src'}"
    started = time.perf_counter()
    if mode == "sim":
        code, log = simulate(config_file, out, env, watcher)
    else:
        code, log = deploy(mode, config, out, work, env, app_dir, watcher)
    total = time.perf_counter() - started
    watcher.done.set()
    watcher.join()
    if code != 0 or len(watcher.times) < config.federated.rounds:
        raise RuntimeError(
            f"{mode} failed (exit {code}, {len(watcher.times)} rounds):\n{log[-4000:]}"
        )
    intervals = [b - a for a, b in itertools.pairwise(watcher.times)]
    return {
        "mode": mode,
        "intervals": intervals,
        "per_round": statistics.median(intervals) if intervals else float("nan"),
        "total": total,
        "final_state": digest(out / "final_state.safetensors"),
        "load": os.getloadavg()[0],
    }


def run_overhead(
    config: ExperimentConfig,
    modes: Sequence[str],
    repeats: int,
    before_repo: Path | None = None,
    log: Callable[[str], None] = lambda _line: None,
) -> list[dict[str, Any]]:
    """:func:`time_run` of every mode, ``repeats`` times, interleaved (each repeat sees the
    machine's load in turn)."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ConfigError(f"--modes: unknown {unknown}; accepted: {list(MODES)}")

    def run(mode: str, config_file: Path, work: Path) -> dict[str, Any]:
        return time_run(mode, config, config_file, work, before_repo)

    def describe(result: dict[str, Any]) -> str:
        return (
            f"[{result['mode']} #{result['repeat']}] per-round {result['per_round']:.2f} s "
            f"(intervals {[round(i, 2) for i in result['intervals']]}), "
            f"total {result['total']:.0f} s, load {result['load']:.1f}"
        )

    return interleaved_runs(config, modes, repeats, run, describe, log)


def overhead_table(results: Sequence[dict[str, Any]], modes: Sequence[str]) -> str:
    """A row per mode: median per-round seconds, each run's, ratio to ``sim``, bitwise."""
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


def overhead_page(text: str, command: str, config: ExperimentConfig, repeats: int) -> str:
    """``overhead.md``: what ran, how the per-round time is counted, the table."""
    return (
        f"# Per-round wall time: loopback Flower deployment vs the simulator\n\n"
        f"`{command}` (configuration: `config` in overhead.json); "
        f"{config.partition.num_clients} SuperNodes on 127.0.0.1; {repeats} interleaved "
        f"repeats. Per-round = median interval between consecutive `metrics.jsonl` lines "
        f"(rounds 1 -> {config.federated.rounds}; start-up and round 1 excluded). See "
        f"`fedalign.experiments.bench.flower_overhead`.\n\n{text}\n"
    )


MODES_OPTION = SuiteOption(
    "modes",
    f"flower-overhead: transports, comma-separated, of {', '.join(MODES)}",
    comma_list(str),
    "sim,cold,warm,warm-tls",
)
BEFORE_REPO = SuiteOption(
    "before-repo", "flower-overhead: a checkout of an earlier fedalign (mode cold-before)", Path
)


def _run(request: BenchRequest) -> str:
    started = time.time()
    options = request.options
    modes, repeats = options["modes"], options["repeats"]
    results = run_overhead(request.config, modes, repeats, options["before_repo"], request.log)
    text = overhead_table(results, modes)
    page = overhead_page(text, request.command, request.config, repeats)
    data = {"command": request.command, "config": request.config.to_dict(), "results": results}
    note = f"1-min load average at the end of each run: {[round(r['load'], 1) for r in results]}"
    write_results(request, "overhead", page, data, started, note)
    return text


register(
    BenchSuite(
        name="flower-overhead",
        description="per-round wall time of loopback Flower deployments vs the simulator",
        run=_run,
        options=(MODES_OPTION, REPEATS, BEFORE_REPO, OUT_DIR),
        config_file="configs/demo.toml",
        defaults=("partition.num-clients=3", "federated.rounds=4", "run.threads=1"),
    )
)
