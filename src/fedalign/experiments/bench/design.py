"""``fedalign bench`` (design suite): ratios of the simulator's design choices, one run.

Each row times two ways of doing the same work in one process, back to back, and reports
medians over repeats and their ratio (the machines are noisy: read ratios, not seconds):

* a local training step through the cached frozen prefix vs recomputing the prefix;
* the upcycled MoE with padding tokens skipping the experts vs every token routed;
* FedAlign-MoE's server aggregation vs FedAvg's on the same client results;
* the bytes kept per client (optimizer state on) vs one copy of the model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedalign.client import ModelInputs, forward_logits, run_client_round, train_local
from fedalign.config import ConfigError, ExperimentConfig
from fedalign.data import build_federated_data, tokenize_dataset
from fedalign.experiments.bench.registry import BenchRequest, BenchSuite, SuiteOption, register
from fedalign.experiments.run import Simulation
from fedalign.models import UpcycledMoE
from fedalign.protocol import TrainInstructions, tensor_bytes
from fedalign.strategies import build_strategy


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def require_cpu_classification(config: ExperimentConfig) -> None:
    """``fedalign bench`` times CPU design choices of text classification: refuse anything
    else by name rather than fail midway."""
    if config.run.device != "cpu" or config.run.precision != "fp32":
        raise ConfigError(
            "fedalign bench measures CPU float32 design choices: run.device must be 'cpu' and "
            f"run.precision 'fp32' (got {config.run.device!r}, {config.run.precision!r})"
        )
    if config.data.task != "classification":
        raise ConfigError(
            "fedalign bench measures text classification: data.dataset must not be a "
            f"multiple-choice dataset (got {config.data.dataset!r})"
        )


def run_bench(config: ExperimentConfig, repeats: int = 5) -> list[dict[str, Any]]:
    """Measure every row on ``config``'s model and data; returns the table rows."""
    require_cpu_classification(config)
    config = config.copy()
    config.run.progress = False
    config.federated.rounds = 1
    config.train.local_steps = 1
    config.train.keep_optimizer_state = True
    simulation = Simulation(config, Path("runs/bench"), overwrite=True, log=None)
    model, data = simulation.model, simulation.data
    batch_indices = data.client_train[0][: config.train.batch_size]
    rows: list[dict[str, Any]] = []

    def step(inputs: ModelInputs) -> None:
        train_local(
            model,
            inputs,
            [],
            config.train,
            global_parameters=simulation.global_parameters,
        )

    if data.prefix_cached and data.train.prefix_hidden is not None:
        cached = data.train.select(batch_indices)
        # the token path: the same examples as ids, the prefix recomputed inside the step
        prefix_layers = getattr(model.model, "prefix_layers", 0)
        input_ids = _token_ids_for(simulation, batch_indices)
        recompute = ModelInputs(
            attention_mask=cached.attention_mask,
            labels=cached.labels,
            input_ids=input_ids[:, : cached.attention_mask.shape[1]],
        )
        with_cache = median_seconds(lambda: step(cached), repeats)
        without = median_seconds(lambda: step(recompute), repeats)
        rows.append(
            {
                "what": f"training step, prefix of {prefix_layers} layers cached vs recomputed",
                "baseline_s": without,
                "ours_s": with_cache,
                "speedup": without / with_cache,
            }
        )

    moe_layers = [m for m in model.model.modules() if isinstance(m, UpcycledMoE)]
    if moe_layers:
        batch = data.train.select(batch_indices)

        @torch.no_grad()
        def forward(skip_padding: bool) -> None:
            model.model.eval()
            if skip_padding:
                forward_logits(model, batch)
                return
            # routing every token: an all-ones mask of the same shape
            full = ModelInputs(
                attention_mask=torch.ones_like(batch.attention_mask),
                labels=batch.labels,
                input_ids=batch.input_ids,
                prefix_hidden=batch.prefix_hidden,
            )
            forward_logits(model, full)

        skip = median_seconds(lambda: forward(True), repeats)
        every = median_seconds(lambda: forward(False), repeats)
        real = float(batch.attention_mask.float().mean())
        rows.append(
            {
                "what": f"forward, padding skips experts vs all tokens (real tokens {real:.0%})",
                "baseline_s": every,
                "ours_s": skip,
                "speedup": every / skip,
            }
        )

    # aggregation: run one round of client training once, then time the server alone
    results = []
    for client_id in range(data.num_clients):
        instructions = TrainInstructions(collect_statistics=True)
        done = run_client_round(
            model, data, config, 1, client_id, simulation.global_parameters, instructions
        )
        simulation.simulator.optimizer_states[client_id] = done.optimizer_state or {}
        results.append(done.result)
    options = config.strategy.option_values()
    fedavg = build_strategy("fedavg", options, model.layout)
    fedalign = build_strategy("fedalign", options, model.layout)
    parameters = simulation.global_parameters
    average = median_seconds(lambda: fedavg.aggregate(1, parameters, results, {}), repeats)
    aligned = median_seconds(
        lambda: fedalign.aggregate(1, parameters, results, fedalign.initial_state()), repeats
    )
    rows.append(
        {
            "what": f"server aggregation of {len(results)} clients, FedAlign-MoE vs FedAvg",
            "baseline_s": average,
            "ours_s": aligned,
            "speedup": average / aligned,
        }
    )
    model_bytes = tensor_bytes(dict(model.model.named_parameters()))
    states = simulation.simulator.optimizer_states
    kept = simulation.simulator.client_state_bytes() / max(len(states), 1)
    rows.append(
        {
            "what": "bytes kept per client (AdamW state) / bytes of one model copy",
            "baseline_s": None,
            "ours_s": None,
            "speedup": kept / model_bytes,
        }
    )
    return rows


def _token_ids_for(simulation: Any, indices: torch.Tensor) -> torch.Tensor:
    """Token ids of pooled-train rows (tokenized again; the simulation keeps only the cache)."""
    config = simulation.config
    federated = build_federated_data(config.data, config.partition, config.federated.seed)
    subset = federated.splits.train.subset(indices.numpy())
    tokenized = tokenize_dataset(subset, simulation.model.tokenizer, config.model.max_length)
    return tokenized.input_ids


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| what | baseline (s, median) | ours (s, median) | ratio baseline / ours |",
        "|---|---|---|---|",
    ]
    for row in rows:
        base = "-" if row["baseline_s"] is None else f"{row['baseline_s']:.4f}"
        ours = "-" if row["ours_s"] is None else f"{row['ours_s']:.4f}"
        lines.append(f"| {row['what']} | {base} | {ours} | {row['speedup']:.2f}x |")
    return "\n".join(lines)


REPEATS = SuiteOption(
    "repeats",
    "timed repeats (median); backbone: rounds per variant; parallel, flower-overhead: "
    "runs per setting (all interleaved)",
    int,
    5,
)
"""``--repeats``, shared by the design, backbone, parallel and flower-overhead suites."""


def _run_design(request: BenchRequest) -> str:
    return format_table(run_bench(request.config, repeats=request.options["repeats"]))


register(
    BenchSuite(
        name="design",
        description="the simulator's choices (default)",
        run=_run_design,
        options=(REPEATS,),
    )
)
