"""``fedalign bench --suite flower-overhead``: per-round wall time of a loopback Flower
deployment against the simulator.

For one configuration (default: ``configs/demo.toml`` with 3 clients and 4 rounds, one
torch thread per process), and for each of ``--client-counts`` (default: the
configuration's ``partition.num-clients``), runs each of ``--modes`` in turn, ``--repeats``
times:

``sim``
    ``fedalign run`` (the in-process simulator; clients train one after another).
``cold``
    SuperLink + one SuperNode per client on 127.0.0.1, Flower's default isolation: a fresh
    ``flwr-clientapp`` process per message, which builds the model and prepares its
    partition every time.
``warm``
    The same with ``fedalign flower-supernode --isolation process`` (Flower's SuperNode
    asking the SuperLink after 0.05-0.5 s instead of 3 s, :mod:`fedalign.flower.supernode`)
    and a ``fedalign flower-worker`` per SuperNode (:mod:`fedalign.flower.worker`): model and
    partition built once; the ServerApp with its defaults (replies polled every 0.1 s,
    round r's evaluation overlapping round r + 1).
``warm-flower-waits``
    As ``warm`` with Flower's own waits: plain ``flower-supernode`` (3 s), the ServerApp
    asking for replies every 3 s (``flower.poll-interval=3``) and evaluating before it sends
    the next round (``flower.overlap-evaluation=false``); the worker's shortened retry for
    message objects stays.
``warm-tls`` / ``cold-tls``
    As ``warm`` / ``cold`` with TLS (a self-signed CA, ``scripts/flower_certificates.sh``).
``cold-before``
    As ``cold``, but the SuperLink and SuperNodes import the fedalign of ``--before-repo``
    (its ``src/`` and its ``pyproject.toml``; run-config keys it lacks are left out).

What is counted: a watcher polls the run folder's ``metrics.jsonl`` every 0.05 s and notes
when each round's line appears; the **per-round time** of a run is the median interval
between consecutive lines from round 1 to round R (start-up, the server's preparation and
round 1 are excluded, as is the run's end). Both transports write the line after the
server's evaluation of the round. The table gives, per number of clients, the median over
repeats and its ratio to ``sim`` of the same number of clients, and whether each run's
``final_state.safetensors`` equals that simulator's. Each run also records the 1-minute
load average before it started and after it ended.

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

MODES = ("sim", "cold", "warm", "cold-tls", "warm-tls", "cold-before", "warm-flower-waits")

FLOWER_WAITS = {"flower.poll-interval": 3.0, "flower.overlap-evaluation": False}
"""Run-config overrides of mode ``warm-flower-waits``: the ServerApp as Flower's Grid waits."""


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
    flower_waits = mode == "warm-flower-waits"
    deployment = LoopbackDeployment(
        work / f"deploy-{mode}",
        config.partition.num_clients,
        warm=warm,
        tls=tls,
        fast_poll=False if flower_waits else None,
        env=env,
    )
    run_config = run_config_argument(config, out, app_dir)
    if flower_waits:
        run_config += " " + " ".join(
            f"{key}={str(value).lower()}" for key, value in FLOWER_WAITS.items()
        )
    with deployment:
        watcher.start()
        completed = deployment.run(app_dir, run_config, timeout=3600)
    return completed.returncode, completed.stdout + completed.stderr


def time_run(
    mode: str,
    config: ExperimentConfig,
    config_file: Path,
    work: Path,
    before_repo: Path | None = None,
) -> dict[str, Any]:
    """One run of ``mode``: per-round intervals, total seconds, final-state digest, the
    1-minute load average before and after."""
    load_before = os.getloadavg()[0]
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
        "load_before": load_before,
        "load": os.getloadavg()[0],
    }


def run_overhead(
    config: ExperimentConfig,
    modes: Sequence[str],
    repeats: int,
    before_repo: Path | None = None,
    log: Callable[[str], None] = lambda _line: None,
    client_counts: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """:func:`time_run` of every mode at every number of clients (``client_counts``;
    empty: ``config``'s), ``repeats`` times, interleaved (each repeat sees the machine's
    load in turn). Each result has ``clients``."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ConfigError(f"--modes: unknown {unknown}; accepted: {list(MODES)}")
    counts = list(client_counts) or [config.partition.num_clients]
    settings = [(count, mode) for count in counts for mode in modes]

    def run(setting: tuple[int, str], config_file: Path, work: Path) -> dict[str, Any]:
        count, mode = setting
        if count != config.partition.num_clients:
            sized = config.copy()
            sized.partition.num_clients = count
            sized.validate()
            config_file = work / f"config-{count}.toml"
            work.mkdir(parents=True, exist_ok=True)
            sized.save(config_file)
        else:
            sized = config
        result = time_run(mode, sized, config_file, work / f"clients-{count}", before_repo)
        result["clients"] = count
        return result

    def describe(result: dict[str, Any]) -> str:
        return (
            f"[{result['clients']} clients, {result['mode']} #{result['repeat']}] per-round "
            f"{result['per_round']:.2f} s "
            f"(intervals {[round(i, 2) for i in result['intervals']]}), "
            f"total {result['total']:.0f} s, load {result['load_before']:.1f} -> "
            f"{result['load']:.1f}"
        )

    return interleaved_runs(config, settings, repeats, run, describe, log)


def overhead_table(results: Sequence[dict[str, Any]], modes: Sequence[str]) -> str:
    """A row per number of clients and mode: median per-round seconds, each run's, ratio to
    ``sim`` at the same number of clients, bitwise equality with that ``sim``."""
    lines = [
        "| clients | transport | per-round s (median of runs) | runs' per-round s | x sim | "
        "command wall s (median) | final state = sim's |",
        "|---|---|---|---|---|---|---|",
    ]
    counts = sorted({r.get("clients", 0) for r in results})
    for count in counts:
        here = [r for r in results if r.get("clients", 0) == count]
        by_mode = {m: [r for r in here if r["mode"] == m] for m in modes}
        sims = by_mode.get("sim") or []
        sim = statistics.median(r["per_round"] for r in sims) if sims else None
        reference = sims[0]["final_state"] if sims else ""
        for mode in modes:
            runs = by_mode[mode]
            if not runs:
                continue
            median = statistics.median(r["per_round"] for r in runs)
            ratio = f"{median / sim:.2f}" if sim else "-"
            same = all(r["final_state"] == reference for r in runs) if reference else None
            each = ", ".join(f"{r['per_round']:.1f}" for r in runs)
            lines.append(
                f"| {count or '-'} | {mode} | {median:.1f} | {each} | "
                f"{ratio} | {statistics.median(r['total'] for r in runs):.0f} | "
                f"{'yes' if same else 'no' if same is not None else '-'} |"
            )
    return "\n".join(lines)


def overhead_page(text: str, command: str, config: ExperimentConfig, repeats: int) -> str:
    """``overhead.md``: what ran, how the per-round time is counted, the table."""
    return (
        f"# Per-round wall time: loopback Flower deployment vs the simulator\n\n"
        f"`{command}` (configuration: `config` in overhead.json); "
        f"one SuperNode per client on 127.0.0.1; {repeats} interleaved "
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
CLIENT_COUNTS = SuiteOption(
    "client-counts",
    "flower-overhead: numbers of clients, comma-separated, each timed with every mode "
    "(default: partition.num-clients)",
    comma_list(int),
)
BEFORE_REPO = SuiteOption(
    "before-repo", "flower-overhead: a checkout of an earlier fedalign (mode cold-before)", Path
)


def _run(request: BenchRequest) -> str:
    started = time.time()
    options = request.options
    modes, repeats = options["modes"], options["repeats"]
    results = run_overhead(
        request.config,
        modes,
        repeats,
        options["before_repo"],
        request.log,
        options.get("client_counts") or (),
    )
    text = overhead_table(results, modes)
    page = overhead_page(text, request.command, request.config, repeats)
    commit = _commit()
    data = {
        "command": request.command,
        "commit": commit,
        "config": request.config.to_dict(),
        "results": results,
    }
    loads = [(round(r["load_before"], 2), round(r["load"], 2)) for r in results]
    note = (
        f"commit {commit or '?'}; 1-min load average before -> after each run, in run order: "
        f"{', '.join(f'{a} -> {b}' for a, b in loads)}"
    )
    write_results(request, "overhead", page, data, started, note)
    return text


def _commit() -> str:
    """``git rev-parse HEAD`` of the current folder ("" outside a checkout)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


register(
    BenchSuite(
        name="flower-overhead",
        description="per-round wall time of loopback Flower deployments vs the simulator",
        run=_run,
        options=(MODES_OPTION, REPEATS, CLIENT_COUNTS, BEFORE_REPO, OUT_DIR),
        config_file="configs/demo.toml",
        defaults=("partition.num-clients=3", "federated.rounds=4", "run.threads=1"),
    )
)
