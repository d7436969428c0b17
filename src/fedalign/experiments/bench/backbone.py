"""``fedalign bench --suite backbone``: MoEfied vs copy-upcycled, in one run.

On the given configuration: the router's task gradient at init and after one round,
per-token routing entropy and between-client JS divergence of routing after one round,
round time, upload bytes per client, the achieved FLOP rate of local training as a fraction
of a float32 matrix product measured in the same run, and a short centralised accuracy
comparison with the dense FFN (MoEfied at top-k = E, which is the dense FFN).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fedalign.client import evaluate, forward_logits, run_client_round, train_local
from fedalign.config import ExperimentConfig
from fedalign.experiments.bench.design import REPEATS, median_seconds, require_cpu_classification
from fedalign.experiments.bench.registry import BenchRequest, BenchSuite, SuiteOption, register
from fedalign.experiments.run import Simulation
from fedalign.models import EncoderClassifier, RoutingCapture
from fedalign.protocol import TrainInstructions


def matmul_flop_rate(size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a float32 ``size``-cubed matrix product on this process's threads."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    seconds = median_seconds(lambda: a @ b, repeats)
    return 2.0 * size**3 / seconds


def router_grad_norm(model: Any, batch: Any) -> float:
    """L2 norm over all routers of the task loss's gradient (the model is left unchanged)."""
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
    variant = config.copy()
    variant.model.expert_init = expert_init
    variant.model.top_k = top_k
    variant.train.local_steps = steps
    simulation = Simulation(
        variant, Path("runs/bench/central"), prepared=prepared, overwrite=True, log=None
    )
    model, data = simulation.model, simulation.data
    train_local(
        model,
        data.train,
        [],
        variant.train,
        global_parameters=simulation.global_parameters,
        seed=variant.federated.seed,
    )
    return evaluate(model, data.test).accuracy, data


def _variant_simulation(
    config: ExperimentConfig, expert_init: str, pack_tokens: bool, rounds: int
) -> Any:
    variant = config.copy()
    variant.model.expert_init = expert_init
    variant.federated.rounds = rounds
    variant.federated.eval_every = 1
    variant.run.progress = False
    out = Path(f"runs/bench/backbone-{expert_init}-{'packed' if pack_tokens else 'padded'}")
    simulation = Simulation(variant, out, overwrite=True, log=None)
    if isinstance(simulation.model.model, EncoderClassifier):
        simulation.model.model.pack_tokens = pack_tokens
    return simulation


def _train_client(simulation: Simulation, client: int) -> None:
    """One plain local round of ``client`` on the simulation's model (round 1's seed)."""
    run_client_round(
        simulation.model,
        simulation.data,
        simulation.config,
        1,
        client,
        simulation.global_parameters,
        TrainInstructions(),
    )


def _client_flops_and_seconds(simulation: Any) -> tuple[float, float]:
    """FLOPs of the largest client's local epoch (counted on an untimed pass) and the
    seconds of a second, uncounted pass of the same work (same seed, same batches)."""
    data = simulation.data
    client = int(max(range(data.num_clients), key=lambda c: len(data.client_train[c])))
    with FlopCounterMode(display=False) as counter:
        _train_client(simulation, client)
    started = time.perf_counter()
    _train_client(simulation, client)
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
    """The backbone table: MoEfied vs copy-upcycled, measured in one run."""
    require_cpu_classification(config)
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


CENTRAL_STEPS = SuiteOption(
    "central-steps", "backbone suite: steps of the centralised quality comparison", int, 300
)


def _run_backbone(request: BenchRequest) -> str:
    return run_backbone_suite(
        request.config,
        central_steps=request.options["central_steps"],
        repeats=request.options["repeats"],
    )


register(
    BenchSuite(
        name="backbone",
        description="MoEfied vs copy-upcycled",
        run=_run_backbone,
        options=(REPEATS, CENTRAL_STEPS),
    )
)
