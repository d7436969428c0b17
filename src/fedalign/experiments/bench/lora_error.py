"""``fedalign bench --suite lora-error``: factor averaging (FedIT) against the exact mean of
LoRA products.

On real client updates of a few federated rounds (FedAvg, factors aggregated as FedIT
does), for every LoRA block the clients sent (each routed expert's ``gate_up``/``down`` or
``fc_in``/``fc_out`` block, the attention projections), with FedAvg weights
``w_i = n_i / n``:

* FedIT error ``||M - (sum_i w_i B_i)(sum_i w_i A_i)||_F / ||M||_F`` with the exact mean
  ``M = sum_i w_i B_i A_i``;
* SVD-r error: the same for ``model.lora-aggregation = "product-svd"`` (the exact mean
  truncated to rank ``r``; 0 when the mean has rank <= r);
* the numerical rank of the exact mean (singular values > 1e-6 of the largest).

Every (model, rank, learning rate) cell is one run of :data:`LORA_DEFAULTS` (4 clients,
Dirichlet 0.5 over 400 WordNet glosses, 2 rounds of 10 local steps of batch 8), with LoRA
of rank ``r`` and ``lora-alpha = 2r`` on every routed expert and on the attention
projections in :data:`ATTENTION`.
"""

from __future__ import annotations

import datetime
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedalign.client import prepare
from fedalign.config import ExperimentConfig
from fedalign.experiments.bench.output import write_results
from fedalign.experiments.bench.registry import (
    OUT_DIR,
    BenchRequest,
    BenchSuite,
    SuiteOption,
    comma_list,
    register,
)
from fedalign.federation import Simulator
from fedalign.moe.lora import factor_mean, product_mean, refactorise, relative_error
from fedalign.protocol import ClientResult

Tensor = torch.Tensor

ATTENTION = {"tiny-qwen3moe": ["q_proj", "v_proj"], "upcycled-minilm": ["query", "value"]}
"""The attention projections given LoRA, per model."""

LORA_DEFAULTS = (
    "model.max-length=32",
    "data.max-train-examples=400",
    "data.max-test-examples=40",
    "partition.num-clients=4",
    "partition.alpha=0.5",
    "partition.min-client-size=10",
    "federated.rounds=2",
    "train.local-steps=10",
    "train.batch-size=8",
    "strategy.name=fedavg",
    "run.threads=1",
    "run.progress=false",
)
"""The suite's starting configuration (the command line's options apply over it)."""


def lora_config(base: ExperimentConfig, model: str, rank: int, lr: float) -> ExperimentConfig:
    """``base`` with ``model``, LoRA of rank ``rank`` (alpha ``2 rank``) and learning rate
    ``lr``; evaluated once, after the last round."""
    config = base.copy()
    config.model.name = model
    config.model.trainable = "lora"
    config.model.lora_experts = True
    config.model.lora_rank = rank
    config.model.lora_alpha = 2 * rank
    config.model.lora_targets = ATTENTION[model]
    config.federated.eval_every = config.federated.rounds
    config.train.lr = lr
    config.strategy.name = "fedavg"
    config.validate()
    return config


def numerical_rank(matrix: Tensor) -> int:
    """Singular values above 1e-6 of the largest (0 for a zero matrix)."""
    values = torch.linalg.svdvals(matrix.double())
    return int((values > 1e-6 * values[0]).sum()) if float(values[0]) > 0 else 0


def capture_rounds(config: ExperimentConfig) -> tuple[Any, list[list[ClientResult]]]:
    """Run ``config``'s rounds; the model's layout and each round's client results (those
    the strategy aggregated)."""
    simulator = Simulator(config, prepare(config))
    rounds = [
        simulator.run_round(server_round).results
        for server_round in range(1, config.federated.rounds + 1)
    ]
    return simulator.model.layout, rounds


def block_errors(layout: Any, results: Sequence[ClientResult]) -> dict[str, dict[str, list]]:
    """Per block kind (``experts``, ``attention``): FedIT and SVD-r errors and the exact
    mean's rank of every LoRA block of one round's ``results``."""
    counts = torch.tensor([float(r.num_examples) for r in results])
    weights = counts / counts.sum()
    expert_pairs = layout.lora_expert_param_names()
    per_kind: dict[str, dict[str, list]] = {}
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
            entry["rank"].append(float(numerical_rank(exact)))
    return per_kind


def measure(config: ExperimentConfig) -> list[dict[str, Any]]:
    """One run of a :func:`lora_config`: a row per round and block kind."""
    layout, rounds = capture_rounds(config)
    rows = []
    for server_round, results in enumerate(rounds, start=1):
        for kind, entry in sorted(block_errors(layout, results).items()):
            fedit, svd = torch.tensor(entry["fedit"]), torch.tensor(entry["svd"])
            rows.append(
                {
                    "model": config.model.name,
                    "rank": config.model.lora_rank,
                    "lr": config.train.lr,
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


def lora_error_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table: a row per model, rank, learning rate, round and block kind."""
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


def lora_error_page(text: str, config: ExperimentConfig, meta: Mapping[str, Any]) -> str:
    """``error.md``: the table and what was run."""
    return (
        f"# Factor averaging (FedIT) vs the exact LoRA product mean\n\n{text}\n\n"
        f"FedAvg, {config.partition.num_clients} clients (Dirichlet {config.partition.alpha:g} "
        f"over {config.data.max_train_examples} WordNet glosses), {config.train.local_steps} "
        f"local steps of batch {config.train.batch_size} a round, lora-alpha = 2r, LoRA on "
        f"every routed expert and on {ATTENTION}. Errors relative to the exact weighted "
        f"product mean ||.||_F. {meta['seconds']} s on {meta['threads']} thread(s), "
        f"{meta['date']}.\n"
    )


def run_lora_error(
    base: ExperimentConfig,
    models: Sequence[str],
    ranks: Sequence[int],
    lrs: Sequence[float],
    log: Callable[[str], None] = lambda _line: None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every (model, rank, lr) cell on ``base``: the rows and the run's metadata."""
    if base.run.threads > 0:
        torch.set_num_threads(base.run.threads)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for model in models:
        for rank in ranks:
            for lr in lrs:
                began = time.perf_counter()
                rows.extend(measure(lora_config(base, model, rank, lr)))
                log(f"{model} r={rank} lr={lr:g}: {time.perf_counter() - began:.1f} s")
    setup = {
        "models": ",".join(models),
        "ranks": ",".join(str(r) for r in ranks),
        "lrs": ",".join(f"{x:g}" for x in lrs),
        "rounds": base.federated.rounds,
        "clients": base.partition.num_clients,
        "local_steps": base.train.local_steps,
        "examples": base.data.max_train_examples,
    }
    meta = {
        "date": datetime.date.today().isoformat(),
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "setup": setup,
    }
    return rows, meta


MODELS = SuiteOption(
    "models", "lora-error: models, comma-separated", comma_list(str), ",".join(ATTENTION)
)
RANKS = SuiteOption("ranks", "lora-error: LoRA ranks, comma-separated", comma_list(int), "2,4,8,16")
LRS = SuiteOption(
    "lrs", "lora-error: learning rates, comma-separated", comma_list(float), "0.001,0.01"
)


def _run(request: BenchRequest) -> str:
    options = request.options
    started = time.time()
    rows, meta = run_lora_error(
        request.config, options["models"], options["ranks"], options["lrs"], request.log
    )
    text = lora_error_table(rows)
    page = lora_error_page(text, request.config, meta)
    write_results(request, "error", page, {"meta": meta, "rows": rows}, started)
    return text


register(
    BenchSuite(
        name="lora-error",
        description="FedIT factor averaging vs the exact LoRA product mean (and SVD-r)",
        run=_run,
        options=(MODELS, RANKS, LRS, OUT_DIR),
        defaults=LORA_DEFAULTS,
    )
)
