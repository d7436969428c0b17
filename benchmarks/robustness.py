"""Malicious clients and private semantic statistics on a small demo configuration.

Two tables (docs/privacy.md):

* ``robustness``: final global accuracy of FedAvg, FedMoE and FedAlign-MoE (semantic
  selection, hard and soft) x {no attack, one client scaling its update by
  ``federated.attack-scale``, one client flipping its update's sign} x {no clipping,
  ``federated.clip-update-norm`` = the median L2 norm of the clean client updates of the
  clean FedAvg run of the same seed (every client, every round; measured before any attacked
  run, never from test accuracy)};
* ``privacy``: FedAlign-MoE with ``strategy.semantic-privacy`` = none / clip-noise (noise
  multipliers from ``--noise``) / public-probe, paired over the same seeds.

Every run shares its seed's partition, tokenization and prefix cache; runs go one after
another on one torch thread. Finished runs (a ``summary.json``) are reused, so the script
can be stopped and restarted.

    python benchmarks/robustness.py --out benchmarks/results --seeds 0,1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fedalign.client import load_model
from fedalign.config import ExperimentConfig
from fedalign.experiments.compare import prepare_shared_data
from fedalign.experiments.run import Simulation
from fedalign.models import MoEModel
from fedalign.routing import gaussian_dp_mu, gaussian_epsilon
from fedalign.strategies.screening import update_norm

ROOT = Path(__file__).resolve().parent.parent

STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy.name": "fedavg"},
    "fedmoe": {"strategy.name": "fedmoe"},
    "fedalign (hard)": {"strategy.name": "fedalign", "strategy.selection": "hard"},
}
SOFT = {"fedalign (soft)": {"strategy.name": "fedalign", "strategy.selection": "soft"}}
"""Added with ``--soft`` (more runs than the shared 2-core machine allowed here)."""
ATTACKS = ("none", "scale", "sign-flip")


class CachedModels:
    """A :data:`~fedalign.client.ModelLoader` that builds each initial model once and hands
    out copies (loading is deterministic in the configuration and seed; the MoEfication fit
    costs about 7 CPU seconds a run). Keeps the two most recent models."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.models: dict[str, MoEModel] = {}

    def __call__(self, config: ExperimentConfig, num_labels: int) -> MoEModel:
        key = json.dumps(
            [
                dataclasses.asdict(config.model),
                config.model_head(),
                config.federated.seed,
                config.run.device,
                config.run.precision,
                config.run.frozen_dtype,
                config.run.deterministic,
                num_labels,
            ],
            sort_keys=True,
            default=str,
        )
        if key not in self.models:  # load_model's inputs: the key above
            self.models[key] = load_model(config, num_labels)
            while len(self.models) > self.size:
                self.models.pop(next(iter(self.models)))
        return copy.deepcopy(self.models[key])


CACHED_MODELS = CachedModels()
"""The loader every run of this script uses."""


def strategies(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {**STRATEGIES, **(SOFT if args.soft else {})}


def base_config(args: argparse.Namespace, seed: int) -> ExperimentConfig:
    config = ExperimentConfig.from_toml(ROOT / "configs" / "demo.toml")
    config.data.max_train_examples = args.train_examples
    config.federated.rounds = args.rounds
    config.federated.seed = seed
    config.federated.eval_every = args.rounds  # only the final accuracy is reported
    config.strategy.probe_examples = args.probe_examples
    config.run.progress = False
    config.run.threads = 1
    return config


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


class LazyData:
    """The seed's shared prepared data, built on first use (reused runs need none)."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.data: Any = None

    def get(self) -> Any:
        if self.data is None:
            self.data = prepare_shared_data(self.config)
        return self.data


def run_one(
    config: ExperimentConfig, folder: Path, data: LazyData, norms: list[float] | None = None
) -> dict[str, Any]:
    """Run (or reuse) one configuration; ``norms`` collects clean update norms."""
    summary_path = folder / "summary.json"
    norms_path = folder / "update_norms.json"
    if summary_path.exists() and (norms is None or norms_path.exists()):
        if norms is not None:
            norms.extend(json.loads(norms_path.read_text()))
        return dict(json.loads(summary_path.read_text()))
    started = time.perf_counter()
    simulation = Simulation(
        config,
        folder,
        prepared=data.get(),
        overwrite=True,
        log=None,
        model_loader=CACHED_MODELS,
    )
    seen: list[float] = []
    for server_round in range(1, config.federated.rounds + 1):
        before = dict(simulation.global_parameters)
        outcome = simulation.simulator.run_round(server_round)
        seen.extend(update_norm(before, r.parameters) for r in outcome.results)
        simulation.folder.record_round(outcome, simulation.simulator.server.strategy.name)
    summary = simulation.finish()
    if norms is not None:
        norms_path.write_text(json.dumps(seen))
        norms.extend(seen)
    print(
        f"{folder.name}: final accuracy {summary.final_accuracy:.4f} "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return dict(json.loads(summary_path.read_text()))


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def robustness(args: argparse.Namespace, seeds: list[int], runs: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"clip": {}, "runs": {}}
    for seed in seeds:
        config = base_config(args, seed)
        data = LazyData(config)
        clean_norms: list[float] = []
        for label, overrides in strategies(args).items():
            for attack in ATTACKS:
                for clipping in (False, True):
                    if clipping and str(seed) not in results["clip"]:
                        results["clip"][str(seed)] = statistics.median(clean_norms)
                    run_config = config.copy()
                    for key, value in overrides.items():
                        run_config.set(key, value)
                    run_config.federated.attack = attack
                    run_config.federated.attack_clients = [] if attack == "none" else [0]
                    run_config.federated.attack_scale = args.attack_scale
                    run_config.federated.clip_update_norm = (
                        results["clip"][str(seed)] if clipping else 0.0
                    )
                    name = f"seed{seed}-{slug(label)}-{attack}-{'clip' if clipping else 'noclip'}"
                    collect = clean_norms if (label == "fedavg" and attack == "none") else None
                    if clipping:
                        collect = None
                    summary = run_one(run_config, runs / name, data, collect)
                    results["runs"][name] = {
                        "seed": seed,
                        "strategy": label,
                        "attack": attack,
                        "clip": clipping,
                        "final_accuracy": summary["final_accuracy"],
                    }
    return results


def robustness_table(results: dict[str, Any], seeds: list[int], args: argparse.Namespace) -> str:
    lines = [
        "| strategy | attack | no clipping | clip-update-norm |",
        "|---|---|---|---|",
    ]
    for label in strategies(args):
        for attack in ATTACKS:
            cells = []
            for clipping in (False, True):
                values = [
                    row["final_accuracy"]
                    for row in results["runs"].values()
                    if (row["strategy"], row["attack"], row["clip"]) == (label, attack, clipping)
                ]
                cells.append(mean_sd(values))
            attack_name = {
                "none": "none",
                "scale": f"scale x{args.attack_scale:g}",
                "sign-flip": "sign flip",
            }[attack]
            lines.append(f"| {label} | {attack_name} | {cells[0]} | {cells[1]} |")
    clips = ", ".join(f"seed {s}: {results['clip'][str(s)]:.4f}" for s in seeds)
    lines.append("")
    lines.append(
        f"Final global accuracy, mean ± sd over seeds {seeds}. Clipping bound (median clean "
        f"FedAvg update norm of the seed): {clips}."
    )
    return "\n".join(lines)


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
        config = base_config(args, seed)
        probe_config = config.copy()
        probe_config.strategy.semantic_privacy = "public-probe"  # prepares the probe set too
        data = LazyData(probe_config)
        for mode, overrides in modes:
            run_config = config.copy()
            run_config.set("strategy.name", "fedalign")
            for key, value in overrides.items():
                run_config.set(key, value)
            # mode none is the robustness table's clean FedAlign-MoE (hard) run: reused
            name = f"seed{seed}-fedalign-{slug(mode)}"
            if mode == "none":
                name = f"seed{seed}-fedalign-hard-none-noclip"
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
    config = base_config(args, seeds[0])
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
    parser.add_argument("--runs", default="runs/robustness", help="run folders (not committed)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-examples", type=int, default=600)
    parser.add_argument("--soft", action="store_true", help="also FedAlign-MoE, soft selection")
    parser.add_argument("--probe-examples", type=int, default=256)
    parser.add_argument("--attack-scale", type=float, default=1000.0)
    parser.add_argument("--noise", default="0.05,4", help="clip-noise multipliers sigma")
    parser.add_argument("--part", choices=("both", "robustness", "privacy"), default="both")
    args = parser.parse_args()
    args.noise = [float(v) for v in args.noise.split(",") if v]
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    out, runs = Path(args.out), Path(args.runs)
    started = time.perf_counter()
    for done in range(1, len(seeds) + 1):  # seed by seed: tables after each seed
        finished = seeds[:done]
        if args.part in ("both", "robustness"):
            results = robustness(args, finished, runs)
            folder = out / "robustness"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "results.json").write_text(json.dumps(results, indent=1))
            (folder / "table.md").write_text(robustness_table(results, finished, args) + "\n")
            print(robustness_table(results, finished, args), flush=True)
        if args.part in ("both", "privacy"):
            results = privacy(args, finished, runs)
            folder = out / "privacy"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "results.json").write_text(json.dumps(results, indent=1))
            (folder / "table.md").write_text(privacy_table(results, finished, args) + "\n")
            print(privacy_table(results, finished, args), flush=True)
        print(f"seeds {finished}: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
