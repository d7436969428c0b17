"""``fedalign bench``: speed and memory ratios of the simulator's design choices.

Each row times two ways of doing the same work in one process, back to back, and reports
medians over repeats and their ratio (the machines are noisy: read ratios, not seconds):

* a local training step through the cached frozen prefix vs recomputing the prefix;
* the upcycled MoE with padding tokens skipping the experts vs every token routed;
* FedAlign-MoE's server aggregation vs FedAvg's on the same client results;
* the bytes kept per client (optimizer state on) vs one copy of the model.

``--suite backbone`` (issue 10) compares the MoEfied backbone with the copy-upcycled one on
the given configuration, everything in one run: the router's task gradient at init and
after one round, per-token routing entropy and between-client JS divergence of routing after
one round, round time, upload bytes per client, the achieved FLOP rate of local training as
a fraction of a float32 matrix product measured in the same run, and a short centralised
accuracy comparison with the dense FFN (MoEfied at top-k = E, which is the dense FFN).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedalign.config import ExperimentConfig
from fedalign.records import tensor_bytes


def _median_seconds(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_bench(config: ExperimentConfig, repeats: int = 5) -> list[dict[str, Any]]:
    """Measure every row on ``config``'s model and data; returns the table rows."""
    from fedalign.models import UpcycledMoE
    from fedalign.simulation import Simulation
    from fedalign.strategies import build_strategy
    from fedalign.strategies.base import TrainInstructions
    from fedalign.training import ModelInputs, forward_logits, train_local

    config = config.copy()
    config.run.progress = False
    config.federated.rounds = 1
    config.train.local_steps = 1
    config.train.keep_optimizer_state = True
    simulation = Simulation(config, Path("runs/bench"), log=None)
    model, data = simulation.model, simulation.data
    batch_indices = data.client_train[0][: config.train.batch_size]
    rows: list[dict[str, Any]] = []

    def step(inputs: ModelInputs) -> None:
        train_local(
            model,
            inputs,
            TrainInstructions(),
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
        with_cache = _median_seconds(lambda: step(cached), repeats)
        without = _median_seconds(lambda: step(recompute), repeats)
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

        skip = _median_seconds(lambda: forward(True), repeats)
        every = _median_seconds(lambda: forward(False), repeats)
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
        result, _sent, _received = simulation._train_client(1, client_id, instructions)
        results.append(result)
    fedavg = build_strategy(_strategy(config, "fedavg"), model.layout)
    fedalign = build_strategy(_strategy(config, "fedalign"), model.layout)
    parameters = simulation.global_parameters
    average = _median_seconds(lambda: fedavg.aggregate(1, parameters, results, {}), repeats)
    aligned = _median_seconds(
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
    kept = simulation.client_state_bytes() / max(len(simulation.optimizer_states), 1)
    rows.append(
        {
            "what": "bytes kept per client (AdamW state) / bytes of one model copy",
            "baseline_s": None,
            "ours_s": None,
            "speedup": kept / model_bytes,
        }
    )
    return rows


# ------------------------------------------------------------------------ backbone suite
def matmul_flop_rate(size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a float32 ``size``-cubed matrix product on this process's threads."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    seconds = _median_seconds(lambda: a @ b, repeats)
    return 2.0 * size**3 / seconds


def router_grad_norm(model: Any, batch: Any) -> float:
    """L2 norm over all routers of the task loss's gradient (the model is left unchanged)."""
    import torch.nn.functional as F

    from fedalign.training import forward_logits

    params = dict(model.model.named_parameters())
    routers = [params[n] for n in sorted(model.full_layout.router_param_names()) if n in params]
    model.model.eval()  # no dropout: the same numbers for every variant
    logits = forward_logits(model, batch)
    loss = F.cross_entropy(logits.float(), batch.labels)
    grads = torch.autograd.grad(loss, routers, allow_unused=True)
    squares = [float((g.float() ** 2).sum()) for g in grads if g is not None]
    return float(sum(squares) ** 0.5)


@torch.no_grad()
def routing_entropy(model: Any, data: Any, batch_size: int = 128) -> float:
    """Mean per-token entropy of the routing softmax over real tokens and layers, in nats."""
    from fedalign.models import RoutingCapture
    from fedalign.training import forward_logits

    model.model.eval()
    total, count = 0.0, 0
    with RoutingCapture(model.taps, detach=True) as capture:
        for start in range(0, len(data), batch_size):
            batch = data.select(torch.arange(start, min(start + batch_size, len(data))))
            capture.set_token_mask(batch.attention_mask)
            forward_logits(model, batch)
            for logits, _hidden in capture.pop().values():
                logp = torch.log_softmax(logits.float(), dim=-1)
                total += float(-(logp.exp() * logp).sum())
                count += int(logits.shape[0])
    return total / max(count, 1)


def central_accuracy(
    config: ExperimentConfig, expert_init: str, top_k: int, steps: int, prepared: Any = None
) -> tuple[float, Any]:
    """Test accuracy after ``steps`` centralised steps on the pooled training data.

    Returns the accuracy and the prepared data (reused by the next variant).
    """
    from fedalign.simulation import Simulation
    from fedalign.strategies.base import TrainInstructions
    from fedalign.training import evaluate, train_local

    variant = config.copy()
    variant.model.expert_init = expert_init
    variant.model.top_k = top_k
    variant.train.local_steps = steps
    simulation = Simulation(variant, Path("runs/bench/central"), prepared=prepared, log=None)
    model, data = simulation.model, simulation.data
    train_local(
        model,
        data.train,
        TrainInstructions(),
        variant.train,
        global_parameters=simulation.global_parameters,
        seed=variant.federated.seed,
    )
    return evaluate(model, data.test).accuracy, data


def _variant_simulation(
    config: ExperimentConfig, expert_init: str, pack_tokens: bool, rounds: int
) -> Any:
    from fedalign.models import EncoderClassifier
    from fedalign.simulation import Simulation

    variant = config.copy()
    variant.model.expert_init = expert_init
    variant.federated.rounds = rounds
    variant.federated.eval_every = 1
    variant.run.progress = False
    out = Path(f"runs/bench/backbone-{expert_init}-{'packed' if pack_tokens else 'padded'}")
    simulation = Simulation(variant, out, log=None)
    if isinstance(simulation.model.model, EncoderClassifier):
        simulation.model.model.pack_tokens = pack_tokens
    return simulation


def _client_flops_and_seconds(simulation: Any) -> tuple[float, float]:
    """FLOPs of the largest client's local epoch (counted on an untimed pass) and the
    seconds of a second, uncounted pass of the same work (same seed, same batches)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedalign.strategies.base import TrainInstructions

    data = simulation.data
    client = int(max(range(data.num_clients), key=lambda c: len(data.client_train[c])))
    with FlopCounterMode(display=False) as counter:
        simulation._train_client(1, client, TrainInstructions())
    started = time.perf_counter()
    simulation._train_client(1, client, TrainInstructions())
    return float(counter.get_total_flops()), time.perf_counter() - started


def backbone_measurements(
    config: ExperimentConfig, variants: dict[str, tuple[str, bool]], repeats: int = 3
) -> tuple[dict[str, dict[str, float]], float]:
    """Every federated row of the suite for each variant, timings interleaved.

    Parameters
    ----------
    config : ExperimentConfig
    variants : dict of str to (expert_init, pack_tokens)
    repeats : int, default 3
        Rounds run per variant, variants interleaved round by round; times are medians
        over them (the machine is shared: one slow spell then hits every variant alike).
        Routing and gradient rows come from round 1.

    Returns
    -------
    rows : dict of str to dict
        Per variant: ``router_grad_init``, ``router_grad_round1``, ``entropy``, ``js``,
        ``usage_js``, ``upload_mib``, ``round_s``, ``train_s``, ``flop_rate``.
    matmul : float
        Median float32 matrix-product FLOP/s measured between the repeats.
    """
    sims = {name: _variant_simulation(config, *v, rounds=repeats) for name, v in variants.items()}
    rows: dict[str, dict[str, float]] = {name: {} for name in sims}
    probes = {}
    for name, sim in sims.items():
        probes[name] = sim.data.test.select(torch.arange(min(128, len(sim.data.test))))
        rows[name]["router_grad_init"] = router_grad_norm(sim.model, probes[name])
    rounds: dict[str, list[float]] = {name: [] for name in sims}
    trains: dict[str, list[float]] = {name: [] for name in sims}
    clients: dict[str, list[float]] = {name: [] for name in sims}
    flops: dict[str, float] = {}
    matmuls = []
    for server_round in range(1, repeats + 1):
        matmuls.append(matmul_flop_rate())
        for name, sim in sims.items():
            line = sim.run_round(server_round)
            rounds[name].append(float(line["seconds"]))
            trains[name].append(float(line["train_seconds"]))
            if server_round == 1:
                row = rows[name]
                sim.model.load_trainable_state(sim.global_parameters)
                row["router_grad_round1"] = router_grad_norm(sim.model, probes[name])
                row["entropy"] = routing_entropy(sim.model, sim.data.test)
                divergence = line["routing_divergence"].values()
                row["js"] = statistics.mean(v["mean_js"] for v in divergence)
                row["usage_js"] = statistics.mean(v["mean_usage_js"] for v in divergence)
                received = [v["received"] for v in line["bytes_per_client"].values()]
                row["upload_mib"] = statistics.mean(received) / 2**20
        for name, sim in sims.items():
            counted, seconds = _client_flops_and_seconds(sim)
            flops[name] = counted
            clients[name].append(seconds)
    for name in sims:
        rows[name]["round_s"] = statistics.median(rounds[name])
        rows[name]["train_s"] = statistics.median(trains[name])
        rows[name]["flop_rate"] = flops[name] / statistics.median(clients[name])
    return rows, statistics.median(matmuls)


def backbone_variant(config: ExperimentConfig, expert_init: str) -> dict[str, float]:
    """The federated rows of one variant alone (one round; for design-choice scripts)."""
    rows, _matmul = backbone_measurements(config, {expert_init: (expert_init, True)}, 1)
    return rows[expert_init]


def run_backbone_suite(config: ExperimentConfig, central_steps: int = 300, repeats: int = 3) -> str:
    """The backbone table (issue 10): MoEfied vs copy-upcycled, measured in one run."""
    variants = {
        "moefication": ("moefication", True),
        "copy": ("copy", True),
        "copy-padded": ("copy", False),
    }
    rows, matmul = backbone_measurements(config, variants, repeats)
    old = rows["copy-padded"]
    experts = config.model.num_experts
    dense, prepared = central_accuracy(config, "moefication", experts, central_steps)
    moefied, _ = central_accuracy(
        config, "moefication", config.model.top_k, central_steps, prepared
    )
    copied, _ = central_accuracy(config, "copy", config.model.top_k, central_steps, prepared)
    m, c = rows["moefication"], rows["copy"]
    k = config.model.top_k

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    lines = [
        f"| what | MoEfied (top-{k}) | copy-upcycled (top-{k}) | MoEfied / copy |",
        "|---|---|---|---|",
        f"| router grad norm from task loss, at init | {m['router_grad_init']:.3g} | "
        f"{c['router_grad_init']:.3g} | {ratio(m['router_grad_init'], c['router_grad_init'])} |",
        f"| router grad norm, after round 1 (one local epoch a client) | "
        f"{m['router_grad_round1']:.3g} | {c['router_grad_round1']:.3g} | "
        f"{ratio(m['router_grad_round1'], c['router_grad_round1'])} |",
        f"| per-token routing entropy after round 1 (nats; uniform = "
        f"{math.log(experts):.3f}) | {m['entropy']:.3f} | {c['entropy']:.3f} | "
        f"{ratio(m['entropy'], c['entropy'])} |",
        f"| between-client JS of routing distributions, round 1 (alpha "
        f"{config.partition.alpha}) | {m['js']:.3g} | {c['js']:.3g} | {ratio(m['js'], c['js'])} |",
        f"| between-client JS of top-k usage shares, round 1 | {m['usage_js']:.3g} | "
        f"{c['usage_js']:.3g} | {ratio(m['usage_js'], c['usage_js'])} |",
        f"| round time (s, train + eval + records; median of {repeats} rounds) | "
        f"{m['round_s']:.2f} | {c['round_s']:.2f} | "
        f"{ratio(m['round_s'], c['round_s'])} |",
        f"| local training time of the round (s) | {m['train_s']:.2f} | {c['train_s']:.2f} | "
        f"{ratio(m['train_s'], c['train_s'])} |",
        f"| round time (s), copy on the padded path before issue 10 | {m['round_s']:.2f} | "
        f"{old['round_s']:.2f} | {ratio(m['round_s'], old['round_s'])} |",
        f"| local training time (s), copy on the padded path before issue 10 | "
        f"{m['train_s']:.2f} | {old['train_s']:.2f} | {ratio(m['train_s'], old['train_s'])} |",
        f"| upload per client per round (MiB) | {m['upload_mib']:.2f} | {c['upload_mib']:.2f} | "
        f"{ratio(m['upload_mib'], c['upload_mib'])} |",
        f"| local training FLOP rate / float32 2048^3 matmul rate ({matmul / 1e9:.0f} GFLOP/s) | "
        f"{m['flop_rate'] / matmul:.1%} | {c['flop_rate'] / matmul:.1%} | "
        f"{ratio(m['flop_rate'], c['flop_rate'])} |",
        f"| centralised test accuracy, {central_steps} steps (dense MiniLM FFN = "
        f"MoEfied top-{experts}: {dense:.3f}) | {moefied:.3f} | {copied:.3f} | "
        f"{ratio(moefied, copied)} |",
    ]
    return "\n".join(lines)


def _token_ids_for(simulation: Any, indices: torch.Tensor) -> torch.Tensor:
    """Token ids of pooled-train rows (tokenized again; the simulation keeps only the cache)."""
    from fedalign.data import build_federated_data, tokenize_dataset

    config = simulation.config
    federated = build_federated_data(config.data, config.partition, config.federated.seed)
    subset = federated.splits.train.subset(indices.numpy())
    tokenized = tokenize_dataset(subset, simulation.model.tokenizer, config.model.max_length)
    return tokenized.input_ids


def _strategy(config: ExperimentConfig, name: str) -> Any:
    strategy = config.copy().strategy
    strategy.name = name
    return strategy


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


def _cmd_bench(args: argparse.Namespace) -> int:
    from fedalign.cli import config_from_args

    config = config_from_args(args)
    if args.suite == "backbone":
        table = run_backbone_suite(config, central_steps=args.central_steps, repeats=args.repeats)
    else:
        table = format_table(run_bench(config, repeats=args.repeats))
    print(table)
    if args.out_table:
        Path(args.out_table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_table).write_text(table + "\n")
    return 0


def register_cli(subparsers: Any) -> None:
    from fedalign.cli import add_experiment_options

    parser = subparsers.add_parser(
        "bench",
        help="speed and memory ratios of the simulator's design choices",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_experiment_options(parser)
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed repeats (median); the backbone suite: rounds per variant, interleaved",
    )
    parser.add_argument(
        "--suite",
        choices=("design", "backbone"),
        default="design",
        help="design: the simulator's choices (default); backbone: MoEfied vs copy-upcycled",
    )
    parser.add_argument(
        "--central-steps",
        type=int,
        default=300,
        help="backbone suite: steps of the centralised quality comparison",
    )
    parser.add_argument("--out-table", type=Path, help="also write the table (Markdown) here")
    parser.set_defaults(handler=_cmd_bench)
