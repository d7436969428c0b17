"""Issue 12: how far factor averaging (FedIT) is from the exact mean of LoRA products.

On real client updates of a few federated rounds (FedAvg, factors aggregated as FedIT does),
for every LoRA block the clients sent (each routed expert's ``gate_up``/``down`` or
``fc_in``/``fc_out`` block, the attention projections), with FedAvg weights ``w_i = n_i / n``:

* FedIT error ``||M - (sum_i w_i B_i)(sum_i w_i A_i)||_F / ||M||_F`` with the exact mean
  ``M = sum_i w_i B_i A_i``;
* SVD-r error: the same for ``model.lora-aggregation = "product-svd"`` (the exact mean
  truncated to rank ``r``; 0 when the mean has rank <= r);
* the numerical rank of the exact mean (singular values > 1e-6 of the largest).

Usage (one torch thread)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lora_error.py --out benchmarks/results/lora
    python benchmarks/lora_error.py --models tiny-qwen3moe --ranks 4 --rounds 1   # a quick look

Writes ``error.md``, ``error.json`` and appends the command to ``COMMAND.txt`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedalign.client import prepare
from fedalign.config import ExperimentConfig
from fedalign.federation import Simulator
from fedalign.moe.lora import factor_mean, product_mean, refactorise, relative_error
from fedalign.protocol import ClientResult
from fedalign.strategies import FedAvg
from fedalign.strategies.base import AggregationResult, StrategyState

Tensor = torch.Tensor

ATTENTION = {"tiny-qwen3moe": ["q_proj", "v_proj"], "upcycled-minilm": ["query", "value"]}


class CapturingFedAvg(FedAvg):
    """FedAvg that keeps every round's global parameters and client results."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: list[tuple[dict[str, Tensor], list[ClientResult]]] = []

    def aggregate(
        self,
        server_round: int,
        global_parameters: Mapping[str, Tensor],
        results: Sequence[ClientResult],
        state: StrategyState,
    ) -> AggregationResult:
        self.rounds.append((dict(global_parameters), list(results)))
        return super().aggregate(server_round, global_parameters, results, state)


def _config(model: str, rank: int, lr: float, args: argparse.Namespace) -> ExperimentConfig:
    config = ExperimentConfig()
    config.model.name = model
    config.model.trainable = "lora"
    config.model.lora_experts = True
    config.model.lora_rank = rank
    config.model.lora_alpha = 2 * rank
    config.model.lora_targets = ATTENTION[model]
    config.model.max_length = 32
    config.data.max_train_examples = args.examples
    config.data.max_test_examples = 40
    config.partition.num_clients = args.clients
    config.partition.alpha = 0.5
    config.partition.min_client_size = 10
    config.federated.rounds = args.rounds
    config.federated.eval_every = args.rounds
    config.train.local_steps = args.local_steps
    config.train.batch_size = 8
    config.train.lr = lr
    config.strategy.name = "fedavg"
    config.run.progress = False
    config.validate()
    return config


def _numerical_rank(matrix: Tensor) -> int:
    values = torch.linalg.svdvals(matrix.double())
    return int((values > 1e-6 * values[0]).sum()) if float(values[0]) > 0 else 0


def measure(model: str, rank: int, lr: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One run: per round and block kind, the FedIT and SVD-r errors."""
    config = _config(model, rank, lr, args)
    simulator = Simulator(config, prepare(config))
    strategy = CapturingFedAvg(simulator.model.layout)
    simulator.server.strategy = strategy
    for server_round in range(1, args.rounds + 1):
        simulator.run_round(server_round)
    layout = simulator.model.layout
    expert_pairs = layout.lora_expert_param_names()
    rows = []
    for server_round, (_, results) in enumerate(strategy.rounds, start=1):
        counts = torch.tensor([float(r.num_examples) for r in results])
        weights = counts / counts.sum()
        per_kind: dict[str, dict[str, list[float]]] = {}
        for factors in layout.lora_modules:
            kind = "experts" if factors.lora_a in expert_pairs else "attention"
            for index in range(factors.num_experts):
                bs = [factors.b(r.parameters, index) for r in results]
                as_ = [factors.a(r.parameters, index) for r in results]
                exact = product_mean(bs, as_, weights)
                fb, fa = factor_mean(bs, as_, weights)
                sb, sa = refactorise(exact, factors.rank)
                entry = per_kind.setdefault(kind, {"fedit": [], "svd": [], "rank": []})
                entry["fedit"].append(relative_error(exact, fb @ fa))
                entry["svd"].append(relative_error(exact, sb @ sa))
                entry["rank"].append(float(_numerical_rank(exact)))
        for kind, entry in sorted(per_kind.items()):
            fedit, svd = torch.tensor(entry["fedit"]), torch.tensor(entry["svd"])
            rows.append(
                {
                    "model": model,
                    "rank": rank,
                    "lr": lr,
                    "round": server_round,
                    "blocks": kind,
                    "count": len(entry["fedit"]),
                    "clients": len(results),
                    "fedit_mean": float(fedit.mean()),
                    "fedit_max": float(fedit.max()),
                    "svd_mean": float(svd.mean()),
                    "svd_max": float(svd.max()),
                    "mean_product_rank": float(torch.tensor(entry["rank"]).mean()),
                }
            )
    return rows


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| model | r | lr | round | blocks | n | FedIT error mean | FedIT max | SVD-r error mean "
        "| SVD-r max | rank of exact mean |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['rank']} | {row['lr']:g} | {row['round']} | "
            f"{row['blocks']} | {row['count']} | {row['fedit_mean']:.4f} | "
            f"{row['fedit_max']:.4f} | {row['svd_mean']:.4f} | {row['svd_max']:.4f} | "
            f"{row['mean_product_rank']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/lora")
    parser.add_argument("--models", default="tiny-qwen3moe,upcycled-minilm")
    parser.add_argument("--ranks", default="2,4,8,16")
    parser.add_argument("--lrs", default="0.001,0.01")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--examples", type=int, default=400)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for model in args.models.split(","):
        for rank in [int(r) for r in args.ranks.split(",")]:
            for lr in [float(x) for x in args.lrs.split(",")]:
                began = time.perf_counter()
                rows.extend(measure(model, rank, lr, args))
                print(
                    f"{model} r={rank} lr={lr:g}: {time.perf_counter() - began:.1f} s", flush=True
                )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "setup": {k: v for k, v in vars(args).items() if k != "out"},
    }
    (out / "error.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    text = table(rows)
    (out / "error.md").write_text(
        f"# Factor averaging (FedIT) vs the exact LoRA product mean\n\n{text}\n\n"
        f"FedAvg, {args.clients} clients (Dirichlet 0.5 over {args.examples} WordNet glosses), "
        f"{args.local_steps} local steps of batch 8 a round, lora-alpha = 2r, LoRA on every "
        f"routed expert and on {ATTENTION}. Errors relative to the exact weighted product "
        f"mean ||.||_F. {meta['seconds']} s on {meta['threads']} thread(s), {meta['date']}.\n"
    )
    with (out / "COMMAND.txt").open("a") as handle:
        handle.write("OMP_NUM_THREADS=1 PYTHONPATH=src python " + " ".join(sys.argv) + "\n")
    print(text)


if __name__ == "__main__":
    main()
