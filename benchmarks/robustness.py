"""One malicious client against the server's default screening, on the demo configuration.

FedAvg, FedProx and FedAlign-MoE (``fedalign:full``, as the paper specifies it: the
default row until 2026-12-03, when table.md was measured; ``--fedalign-row`` runs another
row, e.g. today's default ``full-sound-prox``) on ``configs/demo.toml``
(10 clients, Dirichlet 0.1, 1,200 training examples, 6 rounds; ``--rounds`` and
``--train-examples`` shorten it), paired by seed (same partition and initial model):

* honest clients, with ``federated.screen-norm-multiple`` off (0) and at its default;
* client 0 scaling its update by ``--attack-scale`` (``federated.attack = scale``), and
  client 0 reversing it (``sign-flip``), both under the default screening (and with the
  screening off too with ``--attacked-off``).

Each attacked run is compared with the honest run of its seed under the same screening:
paired differences of final accuracy, mean and 95% Student-t interval. Per round, each
client's cosine with the example-weighted mean update of the others is kept
(``rounds.json``), to show whether a direction rule could single out a sign flip. Runs go
one after another on one torch thread and are reused when finished
(``benchmarks/demo_runs.py``).

    python benchmarks/robustness.py --out benchmarks/results --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from demo_runs import LazyData, base_config, run_one, slug

from fedalign.config import FederatedConfig
from fedalign.experiments.stats import paired_difference


def strategies(fedalign_row: str) -> dict[str, dict[str, Any]]:
    """The rows by label: FedAvg, FedProx and FedAlign-MoE as ablation ``fedalign_row``
    (``--fedalign-row``; ``full`` keeps the label of the committed table, others name it)."""
    label = "FedAlign-MoE" if fedalign_row == "full" else f"FedAlign-MoE {fedalign_row}"
    return {
        "FedAvg": {"strategy.name": "fedavg"},
        "FedProx": {"strategy.name": "fedprox"},
        label: {"strategy.name": "fedalign", "strategy.ablation": fedalign_row},
    }


ATTACKER = 0
"""The attacking client (every round: full participation)."""


def grid(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(attack, screening)`` pairs to run, the ones the targets need first (``--pairs``
    picks some)."""
    pairs = [("none", "default"), ("scale", "default"), ("sign-flip", "default"), ("none", "off")]
    if args.attacked_off:
        pairs += [("scale", "off"), ("sign-flip", "off")]
    if args.pairs:
        wanted = [tuple(item.split(":")) for item in args.pairs.split(",") if item]
        pairs = [pair for pair in pairs if pair in wanted]
    return pairs


def table_rows(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The grid in the table's order: the honest reference first."""
    pairs = grid(args)
    first = [pair for pair in pairs if pair == ("none", "off")]
    return first + [pair for pair in pairs if pair != ("none", "off")]


def percent(values: list[float]) -> str:
    """Mean ± sd of fractions, in percent with one decimal."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def run_grid(args: argparse.Namespace, seeds: list[int], runs: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"runs": {}}
    for seed in seeds:
        config = base_config(seed, args.rounds, args.train_examples, 256)
        data = LazyData(config)
        for attack, screening in grid(args):
            for label, overrides in strategies(args.fedalign_row).items():
                run_config = config.copy()
                for key, value in overrides.items():
                    run_config.set(key, value)
                run_config.federated.attack = attack
                run_config.federated.attack_clients = [] if attack == "none" else [ATTACKER]
                run_config.federated.attack_scale = args.attack_scale
                if screening == "off":
                    run_config.federated.screen_norm_multiple = 0.0
                name = f"seed{seed}-{slug(label)}-{attack}-{screening}"
                summary = run_one(run_config, runs / name, data)
                attacked = {str(ATTACKER)} if attack != "none" else set()
                clipped = [c for r in summary["rounds"] for c in r["clipped"]]
                results["runs"][name] = {
                    "seed": seed,
                    "strategy": label,
                    "attack": attack,
                    "screening": screening,
                    "final_accuracy": summary["final_accuracy"],
                    "clipped_attacker": sum(c in attacked for c in clipped),
                    "clipped_honest": sum(c not in attacked for c in clipped),
                    "cosines": [r["cosines"] for r in summary["rounds"]],
                }
    return results


def pick(results: dict[str, Any], label: str, attack: str, screening: str) -> dict[int, Any]:
    return {
        row["seed"]: row
        for row in results["runs"].values()
        if (row["strategy"], row["attack"], row["screening"]) == (label, attack, screening)
    }


def paired_cell(rows: dict[int, Any], reference: dict[int, Any]) -> tuple[str, str]:
    """The paired difference's cell and the target's verdict: ``met`` when the mean and the
    interval's low end are both at least -1 point, ``met on the mean`` when only the mean
    is, ``missed`` otherwise."""
    paired = paired_difference(
        {s: r["final_accuracy"] for s, r in rows.items()},
        {s: r["final_accuracy"] for s, r in reference.items()},
    )
    if paired.mean is None:
        return "-", "-"
    verdict = "met" if paired.mean >= -0.01 else "**missed**"
    if paired.low is None or paired.high is None:
        return f"{100 * paired.mean:+.1f}", verdict
    if verdict == "met" and paired.low < -0.01:
        verdict = "met on the mean"
    per_seed = ", ".join(f"{100 * d:+.1f}" for d in paired.differences)
    text = (
        f"{100 * paired.mean:+.1f} [{100 * paired.low:+.1f}, {100 * paired.high:+.1f}], "
        f"{paired.wins}/{paired.pairs} ({per_seed})"
    )
    return text, verdict


def robustness_table(results: dict[str, Any], args: argparse.Namespace) -> str:
    names = {"none": "honest", "scale": f"x{args.attack_scale:g}", "sign-flip": "sign flip"}
    lines = [
        "| strategy | client 0 | screening | final accuracy (%) | paired Δ (points) [95% CI], "
        "wins (per seed) | vs | cost ≤ 1 point | clipped updates: client 0 / honest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in strategies(args.fedalign_row):
        for attack, screening in table_rows(args):
            rows = pick(results, label, attack, screening)
            if not rows:
                continue
            reference_key = ("none", "off") if attack == "none" else ("none", screening)
            reference = pick(results, label, *reference_key)
            if not reference or (attack, screening) == reference_key:
                delta, versus, target = "(reference)", "-", "-"
            else:
                delta, target = paired_cell(rows, reference)
                versus = f"honest, {reference_key[1]}"
                target = "-" if attack == "none" else target
            accuracy = percent([r["final_accuracy"] for r in rows.values()])
            clipped_attacker = sum(r["clipped_attacker"] for r in rows.values())
            clipped_honest = sum(r["clipped_honest"] for r in rows.values())
            lines.append(
                f"| {label} | {names[attack]} | {screening} | {accuracy} | {delta} | {versus} | "
                f"{target} | {clipped_attacker} / {clipped_honest} |"
            )
    seeds = sorted({row["seed"] for row in results["runs"].values()})
    multiple = FederatedConfig().screen_norm_multiple
    lines += [
        "",
        f"Seeds {seeds}; final-round global accuracy on the 600-example test set, mean ± sd. "
        f"Screening `default`: `federated.screen-norm-multiple = {multiple:g}` (an update above "
        f"{multiple:g} x the round's median update norm is scaled down to the norm of the client "
        "nearest to it in training examples); `off`: 0. "
        "Paired Δ: per seed, minus the honest run named in `vs` (same partition, initial model "
        "and sampling); cost ≤ 1 point: `met` when the mean paired Δ and the low end of its "
        "interval are both at least -1 point, `met on the mean` when only the mean is. Clipped "
        "updates: client-rounds clipped, summed over seeds.",
        "",
        direction_table(results),
    ]
    return "\n".join(lines)


def direction_table(results: dict[str, Any]) -> str:
    """The sign-flipped client's cosine with the others' mean update against the honest
    clients' cosines of the honest runs (could a direction rule tell them apart?)."""
    lines = [
        "| strategy | flipped client 0: cosine with the others' mean, min / median / max | "
        "honest runs, every client: min / 5th percentile / median | honest client-rounds "
        "below the flipped client's median |",
        "|---|---|---|---|",
    ]
    for label in dict.fromkeys(row["strategy"] for row in results["runs"].values()):
        flipped = [
            rounds[str(ATTACKER)]
            for row in pick(results, label, "sign-flip", "default").values()
            for rounds in row["cosines"]
            if str(ATTACKER) in rounds
        ]
        honest = sorted(
            value
            for row in pick(results, label, "none", "default").values()
            for rounds in row["cosines"]
            for value in rounds.values()
        )
        if not flipped or not honest:
            continue
        middle = statistics.median(flipped)
        below = sum(value < middle for value in honest)
        fifth = honest[int(0.05 * (len(honest) - 1))]
        lines.append(
            f"| {label} | {min(flipped):+.3f} / {middle:+.3f} / {max(flipped):+.3f} | "
            f"{honest[0]:+.3f} / {fifth:+.3f} / {statistics.median(honest):+.3f} | "
            f"{below} of {len(honest)} |"
        )
    lines += [
        "",
        "Cosine of each client's update (as aggregated) with the example-weighted mean update of "
        "the round's other clients, every round of every seed.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--runs", default="runs/robustness", help="run folders (not committed)")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--rounds", type=int, default=None, help="default: configs/demo.toml's")
    parser.add_argument("--train-examples", type=int, default=None, help="default: demo.toml's")
    parser.add_argument("--attack-scale", type=float, default=1000.0)
    parser.add_argument(
        "--attacked-off", action="store_true", help="also the attacks with the screening off"
    )
    parser.add_argument(
        "--pairs",
        default="",
        help="only these attack:screening pairs, e.g. none:default,scale:default (default: all)",
    )
    parser.add_argument(
        "--fedalign-row",
        default="full",
        help="FedAlign-MoE's ablation row (full: as specified; full-sound-prox: the default)",
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    started = time.perf_counter()
    folder = Path(args.out) / "robustness"
    for done in range(1, len(seeds) + 1):  # seed by seed: the table after each seed
        results = run_grid(args, seeds[:done], Path(args.runs))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(results, indent=1))
        (folder / "table.md").write_text(robustness_table(results, args) + "\n")
        print(robustness_table(results, args), flush=True)
        print(f"seeds {seeds[:done]}: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
