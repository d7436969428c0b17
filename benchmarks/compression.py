"""Accuracy cost of upload compression on the default benchmark's short form.

The ``main`` suite at its quick size (upcycled MiniLM MoE, 10 clients, 600 training
examples, 5 rounds, test set 300), Dirichlet alpha 0.1, FedAvg and FedAlign-MoE, once per
``federated.upload-compression`` (error feedback on, top-k fraction 0.1), paired by seed
against no compression. Usage (one torch thread, runs one after another)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/compression.py \\
        --runs /tmp/compress-bench --out benchmarks/results/compression --seeds 5 \\
        --compressions none,int4,int3,int2

Each compression's runs land in ``<runs>/<compression>/runs/alpha0.1/seed<S>/<strategy>/``
(``fedalign benchmark`` folders: finished runs are reused, so a second call only redraws
the table). Writes ``results.md`` and ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from fedalign import experiments
from fedalign.experiments.stats import mean_std, paired_difference

COMPRESSIONS = ("none", "bf16", "int8", "int4", "int3", "int2", "topk")
"""Every upload the table knows, in its order (``--compressions`` picks which to run)."""
TARGET_RATIO = 0.10
TARGET_COST = 0.005
"""An upload of at most 0.10x of full at a paired cost of at most 0.5 point."""
STRATEGIES = ("fedavg", "fedalign")
LABELS = {"fedavg": "FedAvg", "fedalign": "FedAlign-MoE"}


HEADER = """# Accuracy cost of upload compression

The `main` suite's quick size (upcycled MiniLM MoE, 8 experts top-2, 10 clients, 600
training examples, 5 rounds of about 2 local steps, global test set of 300), Dirichlet
alpha 0.1, FedAvg and FedAlign-MoE, each with a `federated.upload-compression`: bf16, int8
(one float32 scale per row), int4 / int3 / int2 (that many bits a value, one bfloat16 scale
per row) or topk (fraction 0.1), error feedback on. Final-round global accuracy (%), mean ±
std over seeds; paired Δ: per seed, minus the same strategy without compression (same
partition, initial model and sampling), mean and 95% Student-t interval. Upload = what each
client sent per round, counted on the real payload (parameters or compressed delta, plus
routing statistics for FedAlign-MoE). Target: at most 0.10x of the uncompressed upload at a
paired cost of at most 0.5 point: `met` when the mean paired Δ and the low end of its
interval are both at least -0.5 point, `met on the mean` when only the mean is.
"""


def run_all(runs: Path, seeds: int, first_seed: int, compressions: list[str]) -> None:
    for compression in compressions:
        experiments.run_benchmark(
            experiments.BenchmarkOptions(
                suite="main",
                quick=True,
                seeds=seeds,
                first_seed=first_seed,
                alphas=[0.1],
                strategies=[(s, "full") for s in STRATEGIES],
                overrides=[f"federated.upload-compression={compression}"],
                out=runs / compression,
                progress=False,
                threads=1,
                reports=False,
            )
        )


def collect(runs: Path) -> dict[tuple[str, str], dict[int, dict[str, Any]]]:
    """``(compression, strategy) -> seed -> {accuracy, upload MiB/client/round, seconds}``."""
    found: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for compression in COMPRESSIONS:
        for summary_path in sorted(
            (runs / compression / "runs").glob("alpha*/seed*/*/summary.json")
        ):
            folder = summary_path.parent
            summary = json.loads(summary_path.read_text())
            config = tomllib.loads((folder / "config.toml").read_text())
            clients = int(config["partition"]["num-clients"])
            seed = int(folder.parent.name.removeprefix("seed"))
            found.setdefault((compression, folder.name), {})[seed] = {
                "final_accuracy": summary["final_accuracy"],
                "upload_mib": summary["bytes_received"] / summary["rounds"] / clients / 2**20,
                "seconds_per_round": summary["seconds_per_round"],
            }
    return found


def table(
    found: dict[tuple[str, str], dict[int, dict[str, Any]]],
) -> tuple[str, list[dict[str, Any]]]:
    lines = [
        "| strategy | upload | seeds | final accuracy | paired Δ vs none [95% CI] | wins | "
        "upload MiB/client/round | vs none | ≤ 0.10x at ≤ 0.5 point |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for strategy in STRATEGIES:
        reference = found.get(("none", strategy), {})
        for compression in COMPRESSIONS:
            runs = found.get((compression, strategy), {})
            if not runs:
                continue
            accuracy = {s: r["final_accuracy"] for s, r in runs.items()}
            mean, std = mean_std(list(accuracy.values()))
            paired = paired_difference(
                accuracy, {s: r["final_accuracy"] for s, r in reference.items()}
            )
            upload = sum(r["upload_mib"] for r in runs.values()) / len(runs)
            base = sum(r["upload_mib"] for r in reference.values()) / max(len(reference), 1)
            ci = (
                f"{100 * paired.mean:+.1f} [{100 * paired.low:+.1f}, {100 * paired.high:+.1f}]"
                if paired.mean is not None and paired.low is not None and paired.high is not None
                else ("-" if paired.mean is None else f"{100 * paired.mean:+.1f}")
            )
            label = compression if compression != "topk" else "topk 0.1"
            std_text = "" if std is None or len(runs) < 2 else f" ± {100 * std:.1f}"
            accuracy_text = f"{100 * (mean or 0):.1f}{std_text}"
            target = "-"
            if compression != "none" and paired.mean is not None:
                met = upload / base <= TARGET_RATIO and paired.mean >= -TARGET_COST
                target = "met" if met else "missed"
                if met and paired.low is not None and paired.low < -TARGET_COST:
                    target = "met on the mean"
            lines.append(
                f"| {LABELS[strategy]} | {label} | {len(runs)} | {accuracy_text} | "
                f"{ci} | {paired.wins}/{paired.pairs} | {upload:.2f} | {upload / base:.3f} | "
                f"{target} |"
            )
            rows.append(
                {
                    "strategy": strategy,
                    "compression": compression,
                    "seeds": sorted(runs),
                    "final_accuracy": accuracy,
                    "paired_mean": paired.mean,
                    "paired_low": paired.low,
                    "paired_high": paired.high,
                    "upload_mib_per_client_round": upload,
                    "upload_vs_none": upload / base,
                }
            )
    return "\n".join(lines) + "\n", rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/compression"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compression"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument(
        "--compressions",
        default=",".join(COMPRESSIONS),
        help=f"uploads to run, comma-separated, among {','.join(COMPRESSIONS)}",
    )
    parser.add_argument("--no-run", action="store_true", help="only redraw the table")
    args = parser.parse_args()
    compressions = [c for c in args.compressions.split(",") if c]
    unknown = sorted(set(compressions) - set(COMPRESSIONS))
    if unknown:
        parser.error(f"--compressions: unknown {unknown}; accepted: {list(COMPRESSIONS)}")
    if not args.no_run:
        run_all(args.runs, args.seeds, args.seed, compressions)
    text, rows = table(collect(args.runs))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(HEADER + "\n" + text)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
