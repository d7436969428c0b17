#!/usr/bin/env python
"""Validation accuracy and final-round diagnostics of a benchmark's finished runs.

    python scripts/validation_table.py benchmarks/results/screen-merge [--alpha 0.1]

One row per run label: seeds, mean final validation accuracy, its mean paired difference to
FedAvg on the same seeds, mean test accuracy (shown, never chosen on), and the final round's
merge diagnostics (total variation from the data shares, class coverage mean / min) and
own-router gain. Screening choices are read off the validation column.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def mean(values: list[Any]) -> float:
    kept = [v for v in values if v is not None]
    return statistics.mean(kept) if kept else float("nan")


def read_runs(root: Path) -> dict[str, dict[str, tuple[Any, ...]]]:
    rows: dict[str, dict[str, tuple[Any, ...]]] = {}
    for seed_dir in sorted(root.glob("seed*")):
        for run in sorted(p for p in seed_dir.iterdir() if (p / "summary.json").exists()):
            summary = json.loads((run / "summary.json").read_text())
            lines = (run / "metrics.jsonl").read_text().splitlines()
            last = json.loads(lines[-1]) if lines else {}
            merges = last.get("merge_diagnostics") or {}
            rows.setdefault(run.name, {})[seed_dir.name] = (
                summary.get("final_validation_accuracy"),
                summary.get("final_accuracy"),
                merges.get("tv_mean"),
                merges.get("class_coverage_mean"),
                merges.get("class_coverage_min"),
                last.get("own_router_gain_mean"),
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--alpha", default="0.1")
    args = parser.parse_args()
    rows = read_runs(args.results / "runs" / f"alpha{args.alpha}")
    reference = rows.get("fedavg", {})
    print(
        f"{'row':24} {'seeds':>5} {'val acc':>8} {'val-FedAvg':>10} {'test acc':>8} "
        f"{'TV':>6} {'cov':>6} {'covmin':>6} {'router gain':>11}"
    )
    for name, by_seed in rows.items():
        seeds = sorted(by_seed)

        def column(i: int, seeds: list[str] = seeds, by_seed: Any = by_seed) -> float:
            return mean([by_seed[s][i] for s in seeds])

        paired = [by_seed[s][0] - reference[s][0] for s in seeds if s in reference]
        per_seed = [round(by_seed[s][0], 4) for s in seeds]
        print(
            f"{name:24} {len(seeds):5d} {column(0):8.4f} {mean(paired):+10.4f} "
            f"{column(1):8.4f} {column(2):6.3f} {column(3):6.3f} {column(4):6.3f} "
            f"{column(5):+11.4f}  per seed val: {per_seed}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
