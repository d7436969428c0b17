"""Kill ``fedalign run`` at random moments, resume it, and compare with an uninterrupted run.

Each trial starts ``fedalign run`` on a tiny configuration in a subprocess, SIGKILLs it at
a seeded random moment (after the line of a random round, plus a random delay, so kills
land in start-up, training, record appends, checkpoint writes and the final files), then
runs ``fedalign run --out DIR --resume`` to the end. A trial passes when the final state
is bitwise equal to the uninterrupted run's, the decision records are equal, every
JSON-lines file parses and the metrics hold rounds 1..R once each.

Usage::

    python scripts/kill_resume_trials.py --trials 20 --seed 0 --workdir /tmp/kill-trials

Prints one line per trial and ``passed P of N``; exit code 0 only when all passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROUNDS = 4
TINY = [
    "--model",
    "tiny-upcycled",
    "--max-train-examples",
    "200",
    "--max-test-examples",
    "80",
    "--clients",
    "3",
    "--alpha",
    "0.5",
    "--local-steps",
    "2",
    "--rounds",
    str(ROUNDS),
    "--strategy",
    "fedalign",
    "--threads",
    "1",
    "--no-progress",
    "--set",
    "model.max-length=24",
    "--set",
    "strategy.stats-max-examples=16",
    "--set",
    "partition.min-client-size=5",
]


@dataclass
class Trial:
    index: int
    after_round: int
    delay: float
    killed: bool
    rounds_before_kill: int
    passed: bool
    problem: str = ""


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = "1"
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env[key] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedalign.cli", "run", *TINY, "--out", str(out), *extra]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jsonl_rows(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, parsed (raises on any bad line)."""
    text = path.read_text()
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def reference_run(workdir: Path) -> Path:
    out = workdir / "reference"
    if (out / "summary.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(command(out), env=environment(), check=True, capture_output=True)
    return out


def run_and_kill(out: Path, after_round: int, delay: float) -> tuple[bool, int]:
    """Start a run, SIGKILL it ``delay`` s after its line of round ``after_round`` (0: after
    start); returns whether it was killed before finishing and the rounds it reported."""
    process = subprocess.Popen(
        command(out),
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    seen = 0
    if after_round > 0:
        for line in process.stdout:
            if f"] round {after_round}/" in line:
                seen = after_round
                break
    time.sleep(delay)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait()
    return killed, seen


def check(out: Path, reference: Path) -> str:
    """Empty when ``out`` equals the reference run, else what differs."""
    if digest(out / "final_state.safetensors") != digest(reference / "final_state.safetensors"):
        return "final state differs"
    try:
        rows = {
            name: jsonl_rows(out / name)
            for name in ("metrics.jsonl", "decisions.jsonl", "routing.jsonl")
        }
    except json.JSONDecodeError as error:
        return f"a JSON-lines file does not parse: {error}"
    if [r["round"] for r in rows["metrics.jsonl"]] != list(range(1, ROUNDS + 1)):
        return f"metrics rounds {[r['round'] for r in rows['metrics.jsonl']]}"
    if rows["decisions.jsonl"] != jsonl_rows(reference / "decisions.jsonl"):
        return "decision records differ"
    if [r["round"] for r in rows["routing.jsonl"]] != list(range(0, ROUNDS + 1)):
        return f"routing rounds {[r['round'] for r in rows['routing.jsonl']]}"
    accuracies = [r["global_accuracy"] for r in rows["metrics.jsonl"]]
    if accuracies != [r["global_accuracy"] for r in jsonl_rows(reference / "metrics.jsonl")]:
        return "accuracies differ"
    return ""


def run_trials(
    trials: int, seed: int, workdir: Path, log: Callable[[str], None] = print
) -> list[Trial]:
    """Run ``trials`` kill-and-resume trials; see the module docstring."""
    workdir.mkdir(parents=True, exist_ok=True)
    reference = reference_run(workdir)
    rng = random.Random(seed)
    results = []
    for index in range(trials):
        out = workdir / f"trial-{index}"
        shutil.rmtree(out, ignore_errors=True)
        after_round = rng.randint(0, ROUNDS)
        delay = rng.uniform(0.0, 8.0 if after_round == 0 else 0.6)
        killed, seen = run_and_kill(out, after_round, delay)
        resumed = subprocess.run(
            command(out, "--resume"), env=environment(), capture_output=True, text=True
        )
        if resumed.returncode != 0:
            problem = f"resume failed: {resumed.stderr.strip().splitlines()[-1:]}"
        else:
            problem = check(out, reference)
        trial = Trial(index, after_round, delay, killed, seen, not problem, problem)
        results.append(trial)
        log(
            f"trial {index}: kill {delay:.2f}s after "
            + (f"round {after_round}" if after_round else "start")
            + (" (killed)" if killed else " (had finished)")
            + f": {'pass' if trial.passed else 'FAIL ' + problem}"
        )
        shutil.rmtree(out, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedalign-kill-trials"))
    args = parser.parse_args(argv)
    results = run_trials(args.trials, args.seed, args.workdir)
    passed = sum(t.passed for t in results)
    killed = sum(t.killed for t in results)
    print(f"passed {passed} of {len(results)} ({killed} killed before finishing)")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
