"""Stage 'claim' of the GPU check: ``benchmarks/claim-gpu.toml`` until a deadline.

Several ``fedalign benchmark`` processes run the suite side by side on one results folder;
each run's lock (``fedalign.experiments.benchmark.runner.run_lock``) gives every run to
exactly one of them, in the suite's order (seed by seed), so the runs that finish first
form whole seeds. At the deadline the processes still running are stopped (their runs are
lost, the finished ones kept), and one more invocation with ``--no-run`` writes the pages
from the finished runs. What comes back: the pages, and the small files of every run
folder in a tarball (enough for ``--no-run`` to redraw the pages elsewhere, and for a later
session to add the missing runs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUITE = "benchmarks/claim-gpu.toml"
CLI = "import sys; from fedalign.cli import main; sys.exit(main())"
RUN_FILES = ("config.toml", "summary.json", "metrics.jsonl", "provenance.json", "partition.json")
"""What the tarball keeps of a run folder (the pages need no more)."""
PAGES = {
    "results.md": "claim-results.md",
    "versus-fedprox.md": "claim-versus-fedprox.md",
    "results.json": "claim-results.json",
}
"""Pages copied back, and their names there."""


@dataclass
class ClaimRun:
    """The benchmark processes of the stage and where they write."""

    folder: Path
    device: str
    quick: bool
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    started: float = 0.0
    monitor: subprocess.Popen[bytes] | None = None

    def command(self, *extra: str) -> list[str]:
        """A ``fedalign benchmark`` command line on this stage's suite and folder."""
        argv = [sys.executable, "-c", CLI, "benchmark", "--suite", SUITE, "--out"]
        argv += [str(self.folder), "--device", self.device, "--threads", "1"]
        argv += ["--no-progress", "--no-report", *(["--quick"] if self.quick else [])]
        return argv + list(extra)


def start(folder: Path, device: str, quick: bool, workers: int) -> ClaimRun:
    """Start ``workers`` benchmark processes, a second apart (each in its own session)."""
    claim = ClaimRun(folder, device, quick, started=time.perf_counter())
    folder.mkdir(parents=True, exist_ok=True)
    if device.startswith("cuda") and shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader"]
        with (folder.parent / "claim-gpu-use.csv").open("wb") as handle:
            claim.monitor = subprocess.Popen([*query, "-l", "5"], stdout=handle)
    for index in range(workers):
        log = folder.parent / f"claim-worker{index}.log"
        with log.open("wb") as handle:
            claim.processes.append(
                subprocess.Popen(
                    claim.command(),
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        claim.logs.append(log)
        if index + 1 < workers:
            time.sleep(1.0)
    return claim


def wait(claim: ClaimRun, deadline: float) -> dict[str, Any]:
    """Wait for the processes until ``deadline`` (``time.perf_counter`` seconds), then stop
    the ones still running; returns how they ended."""
    while time.perf_counter() < deadline and any(p.poll() is None for p in claim.processes):
        time.sleep(1.0)
    stopped = 0
    for process in claim.processes:
        if process.poll() is None:
            stopped += 1
            os.killpg(process.pid, signal.SIGTERM)
    for process in claim.processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if claim.monitor is not None:
        claim.monitor.terminate()
        claim.monitor.wait()
    return {
        "workers": len(claim.processes),
        "stopped_at_deadline": stopped,
        "exit_codes": [p.returncode for p in claim.processes],
        "seconds": time.perf_counter() - claim.started,
        "gpu_use": gpu_use(claim.folder.parent / "claim-gpu-use.csv"),
    }


def gpu_use(samples: Path) -> dict[str, float] | None:
    """Mean and peak GPU utilisation (%) and peak memory used (MiB) of ``nvidia-smi``'s
    samples (every 5 s while the stage ran; the pytest and tiny stages overlap it)."""
    if not samples.exists():
        return None
    rows = []
    for line in samples.read_text().splitlines():
        try:
            use, memory = (float(part.split()[0]) for part in line.split(","))
        except (ValueError, IndexError):
            continue
        rows.append((use, memory))
    if not rows:
        return None
    return {
        "samples": len(rows),
        "mean_utilisation": sum(r[0] for r in rows) / len(rows),
        "max_utilisation": max(r[0] for r in rows),
        "max_memory_mib": max(r[1] for r in rows),
    }


def progress(folder: Path) -> list[dict[str, Any]]:
    """Every run folder: finished or not, rounds recorded, seconds and final accuracy."""
    rows = []
    for config in sorted(folder.glob("runs/*/*/*/config.toml")):
        run = config.parent
        summary = run / "summary.json"
        metrics = run / "metrics.jsonl"
        rounds = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        row: dict[str, Any] = {"run": str(run.relative_to(folder / "runs")), "rounds": rounds}
        if summary.exists():
            data = json.loads(summary.read_text())
            row.update(
                finished=True,
                final_accuracy=data.get("final_accuracy"),
                seconds=data.get("seconds"),
            )
        else:
            row["finished"] = False
        rows.append(row)
    return rows


def finish(claim: ClaimRun, out: Path, timeout: float) -> dict[str, Any]:
    """Write the pages from the finished runs (``--no-run``), copy them to ``out`` and pack
    the run folders' small files into ``out/claim-runs.tar.gz``."""
    runs = progress(claim.folder)
    result: dict[str, Any] = {"runs": runs, "finished": sum(r["finished"] for r in runs)}
    if result["finished"]:
        with (claim.folder.parent / "claim-page.log").open("wb") as log:
            page = subprocess.run(
                claim.command("--no-run"),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        result["page_exit_code"] = page.returncode
        for name, target in PAGES.items():
            if (claim.folder / name).exists():
                shutil.copyfile(claim.folder / name, out / target)
    with tarfile.open(out / "claim-runs.tar.gz", "w:gz") as tar:
        for path in sorted(claim.folder.glob("runs/*/*/*/*")):
            if path.name in RUN_FILES:
                tar.add(path, arcname=str(path.relative_to(claim.folder)))
        for name in ("suite.toml", "base_config.toml", "COMMAND.txt"):
            if (claim.folder / name).exists():
                tar.add(claim.folder / name, arcname=name)
    return result


def log_tails(claim: ClaimRun, lines: int = 15) -> str:
    """The last ``lines`` lines of every worker's log."""
    parts = []
    for log in [*claim.logs, claim.folder.parent / "claim-page.log"]:
        if log.exists():
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(parts)
