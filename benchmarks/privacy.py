"""Private semantic statistics on a small demo configuration (docs/privacy.md).

FedAlign-MoE (hard selection) with ``strategy.semantic-privacy`` = none / clip-noise (noise
multipliers from ``--noise``) / public-probe, paired over the same seeds: final accuracy,
per-round epsilon, server seconds a round and bytes up. Runs of ``configs/demo.toml``
(shortened by ``--rounds`` and ``--train-examples``) one after another on one torch thread,
reused when finished (``benchmarks/demo_runs.py``).

    python benchmarks/privacy.py --out benchmarks/results --seeds 0,1 --rounds 5 \\
        --train-examples 600
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from demo_runs import LazyData, base_config, mean_sd, run_one, slug

from fedalign.routing import gaussian_dp_mu, gaussian_epsilon


def privacy(args: argparse.Namespace, seeds: list[int], runs: Path) -> dict[str, Any]:
    modes: list[tuple[str, dict[str, Any]]] = [("none", {})]
    for sigma in args.noise:
        modes.append(
            (
                f"clip-noise sigma={sigma:g}",
                {
                    "strategy.semantic-privacy": "clip-noise",
                    "strategy.semantic-clip": 1.0,
                    "strategy.semantic-noise-multiplier": sigma,
                },
            )
        )
    modes.append(("public-probe", {"strategy.semantic-privacy": "public-probe"}))
    results: dict[str, Any] = {"runs": {}}
    for seed in seeds:
        config = base_config(seed, args.rounds, args.train_examples, args.probe_examples)
        probe_config = config.copy()
        probe_config.strategy.semantic_privacy = "public-probe"  # prepares the probe set too
        data = LazyData(probe_config)
        for mode, overrides in modes:
            run_config = config.copy()
            run_config.set("strategy.name", "fedalign")
            for key, value in overrides.items():
                run_config.set(key, value)
            name = f"seed{seed}-fedalign-{slug(mode)}"
            summary = run_one(run_config, runs / name, data)
            lines = [
                json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().split("\n") if x
            ]
            results["runs"][name] = {
                "seed": seed,
                "mode": mode,
                "final_accuracy": summary["final_accuracy"],
                "aggregation_seconds": statistics.mean(x["aggregation_seconds"] for x in lines),
                "bytes_received": summary["bytes_received"],
            }
    return results


def privacy_table(results: dict[str, Any], seeds: list[int], args: argparse.Namespace) -> str:
    config = base_config(seeds[0], args.rounds, args.train_examples, args.probe_examples)
    layers = config.model.upcycle_layers
    rows = layers * config.model.num_experts
    modes = list(dict.fromkeys(row["mode"] for row in results["runs"].values()))
    by_mode = {
        mode: {r["seed"]: r for r in results["runs"].values() if r["mode"] == mode}
        for mode in modes
    }
    lines = [
        "| mode | per-round epsilon (delta 1e-5) | final accuracy | minus none (paired) | "
        "server s/round | MiB up per client-round |",
        "|---|---|---|---|---|---|",
    ]
    for mode in modes:
        epsilon = "-"
        if mode.startswith("clip-noise"):
            sigma = float(mode.split("=")[1])
            epsilon = f"{gaussian_epsilon(gaussian_dp_mu(rows, sigma), 1e-5):.3g}"
        accuracy = [by_mode[mode][s]["final_accuracy"] for s in seeds]
        diffs = [
            by_mode[mode][s]["final_accuracy"] - by_mode["none"][s]["final_accuracy"] for s in seeds
        ]
        seconds = statistics.mean(by_mode[mode][s]["aggregation_seconds"] for s in seeds)
        mib = statistics.mean(
            by_mode[mode][s]["bytes_received"]
            / 2**20
            / config.federated.rounds
            / config.partition.num_clients
            for s in seeds
        )
        lines.append(
            f"| {mode} | {epsilon} | {mean_sd(accuracy)} | {mean_sd(diffs)} | {seconds:.1f} | "
            f"{mib:.3f} |"
        )
    lines.append("")
    lines.append(
        f"FedAlign-MoE (hard selection), seeds {seeds}; epsilon: client-level, one round, "
        f"{rows} clipped rows of H values (clip C = 1), Gaussian-DP mu = 2 sqrt({rows}) / sigma "
        "(docs/privacy.md). Server s/round: the aggregation step (with the probe measurement "
        "under public-probe), wall clock on a shared machine, mean over rounds and seeds. MiB up "
        "counts what the clients sent (parameters and statistics)."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--runs", default="runs/privacy", help="run folders (not committed)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rounds", type=int, default=None, help="default: configs/demo.toml's")
    parser.add_argument("--train-examples", type=int, default=None, help="default: demo.toml's")
    parser.add_argument("--probe-examples", type=int, default=256)
    parser.add_argument("--noise", default="0.05,4", help="clip-noise multipliers sigma")
    args = parser.parse_args()
    args.noise = [float(v) for v in args.noise.split(",") if v]
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    started = time.perf_counter()
    for done in range(1, len(seeds) + 1):  # seed by seed: the table after each seed
        finished = seeds[:done]
        results = privacy(args, finished, Path(args.runs))
        folder = Path(args.out) / "privacy"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(results, indent=1))
        (folder / "table.md").write_text(privacy_table(results, finished, args) + "\n")
        print(privacy_table(results, finished, args), flush=True)
        print(f"seeds {finished}: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
