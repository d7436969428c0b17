"""The server step at scale: synthetic rounds, time and peak memory, sketch accuracy, bytes.

No model is trained here. :func:`synthetic_round` builds an :class:`MoELayout` of
``num_layers`` MoE layers x ``num_experts`` experts (two matrices per expert, ``(I, H)``
and ``(H, I)``, one tensor each, as an upcycled FFN has), random client parameters and
random but valid :class:`LayerRoutingStatistics`; :func:`run_cell` times one strategy's
``aggregate`` on it and reads the peak resident memory; :func:`run_cell_isolated` does that
in a fresh Python process, so every cell's peak is its own.

Client inputs: client ``i``'s tensors are those of client ``i mod pool`` (the same tensor
objects), so building 200 clients of MiniLM-sized experts (60 GB as separate copies) takes
``pool`` clients' memory. The aggregation reads every client's tensors as if they were
distinct; the memory reported above the inputs (``working``) is what the server step
itself allocates. ``held_inputs_gb`` says what holding every client's parameters would
take (the transport's problem: stream or spill them, see docs/method.md's "Scale").

Shapes: ``C`` clients, ``E`` experts, ``H`` hidden width, ``I`` expert FFN width, ``P_e``
values in one expert, ``k`` sketch values.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics as pystats
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedalign.config import ExperimentConfig, ModelConfig
from fedalign.experiments.run import run_experiment
from fedalign.models.loading import load_moe_model
from fedalign.moe.layout import ExpertSlice, MoELayerLayout, MoELayout
from fedalign.protocol import ClientResult, LayerRoutingStatistics, tensor_bytes
from fedalign.strategies import build_strategy
from fedalign.strategies.fedalign.semantic import (
    cosine_gram,
    hidden_similarities,
    selection_weights,
    semantic_alignment,
    sketch_buckets,
    sketch_signs,
    sketch_vector,
)

Tensor = torch.Tensor

EXPERT_SIZES: dict[str, tuple[int, int]] = {
    "full": (384, 1536),  # all-MiniLM-L6-v2's whole FFN per expert: 1,179,648 values
    "eighth": (384, 192),  # 1/8 of it, as an 8-expert MoEfied FFN: 147,456 values
}
"""Expert shapes ``(H, I)`` by name."""

GB = 1e9
MB = 1e6


# ------------------------------------------------------------------- synthetic rounds
def synthetic_layout(
    num_layers: int = 4, num_experts: int = 16, hidden: int = 384, top_k: int = 2
) -> MoELayout:
    """``num_layers`` MoE layers, each with a router ``(E, H)`` and per-expert ``w1``, ``w2``."""
    layers = []
    for index in range(num_layers):
        prefix = f"layers.{index}.moe"
        layers.append(
            MoELayerLayout(
                name=prefix,
                num_experts=num_experts,
                top_k=top_k,
                hidden_size=hidden,
                router_params=(f"{prefix}.router.weight",),
                experts=tuple(
                    (
                        ExpertSlice(f"{prefix}.experts.{e}.w1"),
                        ExpertSlice(f"{prefix}.experts.{e}.w2"),
                    )
                    for e in range(num_experts)
                ),
            )
        )
    return MoELayout(layers=tuple(layers))


def synthetic_parameters(
    layout: MoELayout, intermediate: int, generator: torch.Generator, scale: float = 0.02
) -> dict[str, Tensor]:
    """Random float32 parameters for every router and expert tensor of ``layout``."""
    parameters: dict[str, Tensor] = {}
    for layer in layout.layers:
        hidden = layer.hidden_size
        for name in layer.router_params:
            parameters[name] = torch.randn(layer.num_experts, hidden, generator=generator) * scale
        for slices in layer.experts:
            w1, w2 = slices
            parameters[w1.param] = torch.randn(intermediate, hidden, generator=generator).mul_(
                scale
            )
            parameters[w2.param] = torch.randn(hidden, intermediate, generator=generator).mul_(
                scale
            )
    return parameters


def synthetic_statistics(
    layer: MoELayerLayout, generator: torch.Generator, num_tokens: int = 512
) -> LayerRoutingStatistics:
    """Random but valid statistics of one layer: a softmax mean, top-k usage, margins, means.

    About one expert in eight gets no token (``count = 0``, zero mean and margin), so
    inactive clients occur as they do under label skew.
    """
    num_experts, hidden = layer.num_experts, layer.hidden_size
    routing = torch.softmax(torch.randn(num_experts, generator=generator), dim=0)  # (E,)
    routed = torch.rand(num_experts, generator=generator) > 0.125  # (E,)
    share = torch.rand(num_experts, generator=generator) * routed  # (E,)
    share = share / share.sum().clamp(min=1e-12) * layer.top_k  # sums to k: usage u_i(e)
    usage = share.clamp(max=1.0)
    token_count = (usage * num_tokens).round()
    active = token_count > 0
    return LayerRoutingStatistics(
        routing_distribution=routing,
        usage=usage * active,
        margin=torch.rand(num_experts, generator=generator) * 0.5 * active,
        mean_hidden=torch.randn(num_experts, hidden, generator=generator) * active[:, None],
        token_count=token_count,
        num_tokens=num_tokens,
    )


def synthetic_round(
    num_clients: int,
    expert_size: str = "full",
    *,
    num_layers: int = 4,
    num_experts: int = 16,
    pool: int = 8,
    update_scale: float = 0.01,
    seed: int = 0,
) -> tuple[MoELayout, dict[str, Tensor], list[ClientResult]]:
    """A round of ``num_clients`` synthetic results on the :data:`EXPERT_SIZES` shapes.

    Returns
    -------
    layout, global_parameters, results
        Client ``i`` holds ``global + update_scale * noise`` of pool member ``i mod pool``
        (the same tensors for every client of a member), ``num_examples`` in [50, 500) and
        its own :func:`synthetic_statistics` for every layer.
    """
    hidden, intermediate = EXPERT_SIZES[expert_size]
    generator = torch.Generator().manual_seed(seed)
    layout = synthetic_layout(num_layers, num_experts, hidden)
    global_parameters = synthetic_parameters(layout, intermediate, generator)
    members = []
    for _ in range(min(pool, num_clients)):
        member = {}
        for name, tensor in global_parameters.items():
            noise = torch.randn(tensor.shape, generator=generator).mul_(update_scale)
            member[name] = noise.add_(tensor)
        members.append(member)
    results = []
    for cid in range(num_clients):
        statistics = {layer.name: synthetic_statistics(layer, generator) for layer in layout.layers}
        examples = int(torch.randint(50, 500, (1,), generator=generator))
        results.append(ClientResult(cid, examples, members[cid % len(members)], statistics))
    return layout, global_parameters, results


# ------------------------------------------------------------------ time and memory
def resident_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """Peak resident set size of this process so far.

    ``VmHWM`` of ``/proc/self/status`` where there is one: the peak of this process's own
    memory. ``getrusage``'s ``ru_maxrss`` (the fallback; Linux reports KiB) also counts the
    parent's resident size at the ``fork``/``exec`` that started the process, so a cell
    started from a large process would report at least that.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class CellResult:
    """One cell of the server-step table (one strategy, client count, expert size)."""

    strategy: str
    sketch_dim: int
    clients: int
    expert_size: str
    expert_values: int
    repeats: int
    times_s: list[float]
    median_s: float
    inputs_mb: float  # resident memory after building the inputs, before aggregating
    peak_mb: float  # peak resident memory of the process
    working_mb: float  # peak - inputs: what the server step allocates
    held_inputs_gb: float  # every client's parameters as separate float32 copies
    similarity_mb: float  # the (E, C, C) float32 similarity matrices of one layer, x2 (S, D)


def run_cell(
    strategy: str,
    num_clients: int,
    expert_size: str = "full",
    *,
    sketch_dim: int = 0,
    repeats: int = 3,
    budget_s: float = 60.0,
    num_layers: int = 4,
    num_experts: int = 16,
    seed: int = 0,
) -> CellResult:
    """Time ``repeats`` calls of one strategy's ``aggregate`` on a :func:`synthetic_round`.

    Run it in a fresh process (:func:`run_cell_isolated`) for a peak that is the cell's own.
    ``strategy`` is ``"fedavg"`` or ``"fedalign"`` (default options, plus ``sketch_dim``).
    Stops repeating once the calls so far took ``budget_s`` (at least one call).
    """
    layout, global_parameters, results = synthetic_round(
        num_clients, expert_size, num_layers=num_layers, num_experts=num_experts, seed=seed
    )
    options: dict[str, Any] = {"sketch_dim": sketch_dim} if strategy == "fedalign" else {}
    server = build_strategy(strategy, options, layout)
    gc.collect()
    inputs = resident_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outcome = server.aggregate(1, global_parameters, results, {})
        times.append(time.perf_counter() - start)
        del outcome
        gc.collect()
        if sum(times) >= budget_s:
            break
    peak = peak_resident_bytes()
    hidden, intermediate = EXPERT_SIZES[expert_size]
    model_bytes = tensor_bytes(global_parameters)
    return CellResult(
        strategy=strategy if not sketch_dim else f"{strategy}+sketch{sketch_dim}",
        sketch_dim=sketch_dim,
        clients=num_clients,
        expert_size=expert_size,
        expert_values=2 * hidden * intermediate,
        repeats=len(times),
        times_s=[round(t, 4) for t in times],
        median_s=round(pystats.median(times), 4),
        inputs_mb=round(inputs / MB, 1),
        peak_mb=round(peak / MB, 1),
        working_mb=round((peak - inputs) / MB, 1),
        held_inputs_gb=round(num_clients * model_bytes / GB, 2),
        similarity_mb=round(2 * num_experts * num_clients**2 * 4 / MB, 3),
    )


def run_cell_isolated(
    strategy: str,
    num_clients: int,
    expert_size: str = "full",
    *,
    sketch_dim: int = 0,
    repeats: int = 3,
    budget_s: float = 60.0,
    timeout: float | None = None,
) -> CellResult:
    """:func:`run_cell` in a fresh Python process (one torch thread); its result back."""
    arguments = json.dumps(
        {
            "strategy": strategy,
            "num_clients": num_clients,
            "expert_size": expert_size,
            "sketch_dim": sketch_dim,
            "repeats": repeats,
            "budget_s": budget_s,
        }
    )
    return CellResult(
        **in_fresh_process("fedalign.experiments.scale", "run_cell", arguments, timeout)
    )


def in_fresh_process(
    module: str, function: str, arguments: str, timeout: float | None = None
) -> dict[str, Any]:
    """``asdict(module.function(**json.loads(arguments)))`` computed in a fresh Python process
    with one torch thread (so peak memory and timings are the function's own).

    Raises
    ------
    RuntimeError
        When the process fails (the end of its standard error is in the message).
    """
    code = (
        "import json, sys\n"
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from dataclasses import asdict\n"
        f"from {module} import {function}\n"
        f"print(json.dumps(asdict({function}(**json.loads(sys.argv[1])))))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{function} {arguments} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def server_step_table(rows: Sequence[CellResult]) -> str:
    """Markdown table: per (expert size, clients) FedAvg, FedAlign and sketch columns + ratios."""
    by_cell: dict[tuple[str, int], dict[str, CellResult]] = {}
    for row in rows:
        by_cell.setdefault((row.expert_size, row.clients), {})[row.strategy] = row
    variants = sorted({row.strategy for row in rows}, key=lambda s: (s != "fedavg", s))
    header = ["expert size", "clients"]
    for variant in variants:
        header += [f"{variant} s", f"{variant} working MB"]
    ratio_variants = [v for v in variants if v != "fedavg"]
    header += [f"{v} / fedavg time" for v in ratio_variants]
    header += [f"{v} / fedavg memory" for v in ratio_variants]
    header += ["inputs if held, GB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (size, clients), cell in sorted(
        by_cell.items(), key=lambda item: (list(EXPERT_SIZES).index(item[0][0]), item[0][1])
    ):
        values = [size, str(clients)]
        for variant in variants:
            found = cell.get(variant)
            values += (
                ["-", "-"]
                if found is None
                else [f"{found.median_s:.2f}", f"{found.working_mb:.0f}"]
            )
        base = cell.get("fedavg")
        for key in ("median_s", "working_mb"):
            for variant in ratio_variants:
                other = cell.get(variant)
                if other is None or base is None or getattr(base, key) <= 0:
                    values.append("-")
                else:
                    values.append(f"{getattr(other, key) / getattr(base, key):.2f}")
        any_row = next(iter(cell.values()))
        values.append(f"{any_row.held_inputs_gb:.1f}")
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- sketch accuracy
@dataclass
class SketchAccuracy:
    """How a sketch dimension changes step D's decisions against the exact cosines."""

    sketch_dim: int
    expert_values: int
    memberships: int  # (expert, active client) pairs compared
    agreement: float  # fraction of them with the same aligned / not-aligned decision
    max_abs_cosine_error: float  # over active client pairs i != j
    mean_abs_cosine_error: float
    max_weight_l1: float  # max over experts of sum_i |w_i(sketch) - w_i(exact)|
    sketch_s: float  # time to sketch every update


def structured_updates(
    num_clients: int,
    expert_values: int,
    hidden: int,
    groups: int,
    outliers: int,
    noise: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """One expert's updates ``(C, P_e)``, routed means ``(C, H)`` and activity ``(C,)``.

    Clients ``0 .. C - outliers - 1`` belong to ``groups`` groups (``i mod groups``): update
    ``g + noise * z`` around their group's direction ``g`` (within-group cosine about
    ``1 / (1 + noise^2)``), hidden mean likewise around a group mean. The last ``outliers``
    clients have random directions. One client in ten routed no token (inactive).
    """
    directions = torch.randn(groups, expert_values, generator=generator)
    centres = torch.randn(groups, hidden, generator=generator)
    updates = torch.randn(num_clients, expert_values, generator=generator).mul_(noise)
    means = torch.randn(num_clients, hidden, generator=generator).mul_(0.5)
    for i in range(num_clients - outliers):
        updates[i].add_(directions[i % groups])
        means[i].add_(centres[i % groups])
    active = torch.rand(num_clients, generator=generator) >= 0.1
    return updates, means, active


def sketch_accuracy(
    sketch_dims: Sequence[int],
    *,
    num_clients: int = 50,
    num_experts: int = 8,
    expert_values: int = 2 * 384 * 192,
    hidden: int = 384,
    groups: int = 3,
    outliers: int = 5,
    noise: float = 1.0,
    seed: int = 0,
) -> list[SketchAccuracy]:
    """Step D's decisions (hard selection) from exact vs sketched update cosines.

    Each expert gets fresh :func:`structured_updates`; ``S`` comes from the hidden means,
    ``D`` from :func:`cosine_gram` of the updates (exact) or of their sketches.
    """
    generator = torch.Generator().manual_seed(seed)
    signs = sketch_signs(expert_values)
    experts = []
    for _ in range(num_experts):
        updates, means, active = structured_updates(
            num_clients, expert_values, hidden, groups, outliers, noise, generator
        )
        counts = active.float() * 10.0
        hidden_similarity = hidden_similarities(means[:, None, :], counts[:, None])[0]  # (C, C)
        exact = cosine_gram(updates)
        decision = semantic_alignment(hidden_similarity, exact, active)
        num_examples = torch.randint(50, 500, (num_clients,), generator=generator).float()
        usage = torch.rand(num_clients, generator=generator) * active
        weights, _ = selection_weights(decision, active, num_examples, usage)
        experts.append(
            (updates, hidden_similarity, active, exact, decision, num_examples, usage, weights)
        )
    rows = []
    for sketch_dim in sketch_dims:
        agree = total = 0
        errors: list[Tensor] = []
        weight_l1 = 0.0
        elapsed = 0.0
        for (
            updates,
            hidden_similarity,
            active,
            exact,
            decision,
            num_examples,
            usage,
            weights,
        ) in experts:
            start = time.perf_counter()
            sketches = torch.stack([sketch_vector(u, signs, sketch_dim) for u in updates])
            elapsed += time.perf_counter() - start
            approximate = cosine_gram(sketches)
            sketched = semantic_alignment(hidden_similarity, approximate, active)
            agree += int((sketched.aligned == decision.aligned)[active].sum())
            total += int(active.sum())
            pairs = active[:, None] & active[None, :] & ~torch.eye(num_clients, dtype=torch.bool)
            errors.append((approximate - exact)[pairs].abs())
            sketched_weights, _ = selection_weights(sketched, active, num_examples, usage)
            weight_l1 = max(weight_l1, float((sketched_weights - weights).abs().sum()))
        error = torch.cat(errors)
        rows.append(
            SketchAccuracy(
                sketch_dim=sketch_dim,
                expert_values=expert_values,
                memberships=total,
                agreement=round(agree / max(total, 1), 4),
                max_abs_cosine_error=round(float(error.max()), 4),
                mean_abs_cosine_error=round(float(error.mean()), 4),
                max_weight_l1=round(weight_l1, 4),
                sketch_s=round(elapsed, 3),
            )
        )
    return rows


def sketch_accuracy_table(rows: Sequence[SketchAccuracy]) -> str:
    """Markdown table of :func:`sketch_accuracy`'s rows."""
    header = (
        "| sketch dim | expert values | memberships | agree with exact | max abs cos error "
        "| mean abs cos error | max weight L1 | sketch time s |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    return header + "".join(
        f"| {r.sketch_dim} | {r.expert_values} | {r.memberships} | {r.agreement:.4f} | "
        f"{r.max_abs_cosine_error:.4f} | {r.mean_abs_cosine_error:.4f} | {r.max_weight_l1:.4f} | "
        f"{r.sketch_s:.2f} |\n"
        for r in rows
    )


# ---------------------------------------------------------------------------- bytes
PAYLOAD_STRATEGIES = ("fedavg", "fedprox", "fedmoe", "fedalign")


@dataclass
class PayloadBytes:
    """Bytes one client sends and receives in one round (round 2 on: FedAlign's target set)."""

    model: str
    strategy: str
    trainable_values: int
    download_bytes: int  # global trainable parameters + the instructions' tensors
    upload_bytes: int  # trainable parameters + routing statistics when asked for
    statistics_bytes: int
    statistics_share: float  # statistics / upload
    instructions_bytes: int


def statistics_like(layout: MoELayout) -> dict[str, LayerRoutingStatistics]:
    """Zero statistics with the shapes a client of ``layout`` uploads."""
    return {
        layer.name: LayerRoutingStatistics(
            routing_distribution=torch.zeros(layer.num_experts),
            usage=torch.zeros(layer.num_experts),
            margin=torch.zeros(layer.num_experts),
            mean_hidden=torch.zeros(layer.num_experts, layer.hidden_size),
            token_count=torch.zeros(layer.num_experts),
            num_tokens=0,
        )
        for layer in layout.layers
    }


def payload_bytes(
    layout: MoELayout,
    parameters: Mapping[str, Tensor],
    model: str,
    strategies: Sequence[str] = PAYLOAD_STRATEGIES,
) -> list[PayloadBytes]:
    """Per strategy, a client's bytes per round, counted as :mod:`fedalign.client.round` does.

    Download: ``tensor_bytes(global) + tensor_bytes([loss_terms, start_parameters])`` of the
    round-2 instructions (after one aggregation, so FedAlign sends ``p_g`` and ``alpha``);
    upload: ``tensor_bytes(parameters)`` plus the statistics' tensors when the strategy asks
    for them (``to_tensors()``, ``num_tokens`` included).
    """
    statistics = statistics_like(layout)
    stats_bytes = tensor_bytes([s.to_tensors() for s in statistics.values()])
    rows = []
    for name in strategies:
        strategy = build_strategy(name, {}, layout)
        results = []
        for cid in range(2):
            uniform = {
                layer: LayerRoutingStatistics(
                    routing_distribution=torch.full_like(s.usage, 1.0 / s.usage.numel()),
                    usage=torch.full_like(s.usage, 0.25),
                    margin=torch.full_like(s.usage, 0.1),
                    mean_hidden=torch.ones_like(s.mean_hidden),
                    token_count=torch.full_like(s.usage, 10.0),
                    num_tokens=40,
                )
                for layer, s in statistics.items()
            }
            results.append(ClientResult(cid, 10, dict(parameters), uniform))
        first = strategy.configure_train(1, [0, 1], {})[0]
        state = strategy.aggregate(1, parameters, results, {}).state
        instructions = strategy.configure_train(2, [0, 1], state)[0]
        instruction_bytes = tensor_bytes(
            [instructions.loss_terms, instructions.start_parameters or {}]
        )
        upload = tensor_bytes(parameters)
        uploaded_stats = stats_bytes if first.collect_statistics else 0
        rows.append(
            PayloadBytes(
                model=model,
                strategy=name,
                trainable_values=sum(int(t.numel()) for t in parameters.values()),
                download_bytes=tensor_bytes(parameters) + instruction_bytes,
                upload_bytes=upload + uploaded_stats,
                statistics_bytes=uploaded_stats,
                statistics_share=round(uploaded_stats / (upload + uploaded_stats), 5),
                instructions_bytes=instruction_bytes,
            )
        )
    return rows


def model_payload_bytes(model_name: str, num_labels: int = 8) -> list[PayloadBytes]:
    """:func:`payload_bytes` for a model of :func:`fedalign.models.loading.load_moe_model`.

    ``num_labels`` sizes the classifier (8: the default WordNet supersense task).
    """
    model = load_moe_model(ModelConfig(name=model_name), num_labels, seed=0)
    return payload_bytes(model.layout, model.trainable_state(), model_name)


def payload_table(rows: Sequence[PayloadBytes]) -> str:
    """Markdown table of :func:`payload_bytes` rows."""
    header = (
        "| model | strategy | trainable values | download B/client/round | upload B/client/round "
        "| statistics B | statistics share of upload | instruction tensors B |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    return header + "".join(
        f"| {r.model} | {r.strategy} | {r.trainable_values:,} | {r.download_bytes:,} | "
        f"{r.upload_bytes:,} | {r.statistics_bytes:,} | {100 * r.statistics_share:.3f}% | "
        f"{r.instructions_bytes:,} |\n"
        for r in rows
    )


def rows_as_dicts(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """Dataclass rows as plain dictionaries (for JSON)."""
    return [asdict(row) for row in rows]


# ------------------------------------------------------------------ delta compression
@dataclass
class CompressionRow:
    """What one encoding of a round's update would cost and how well it reconstructs it."""

    encoding: str
    bytes: int
    ratio_to_float32: float
    relative_error: float  # |d_hat - d| / |d| over every trainable value
    max_abs_error: float


def _int8(delta: Tensor, per_row: bool) -> tuple[Tensor, int]:
    """Symmetric absmax int8 round trip of one tensor (per tensor or per row of dim 0)."""
    values = delta.float()
    if per_row and values.dim() >= 2:
        scale = values.abs().amax(dim=tuple(range(1, values.dim())), keepdim=True) / 127.0
        scales = int(values.shape[0])
    else:
        scale = values.abs().max() / 127.0
        scales = 1
    scale = scale.clamp(min=1e-30)
    restored = (values / scale).round().clamp(-127, 127) * scale
    return restored, values.numel() + 4 * scales


def delta_compression(
    initial: Mapping[str, Tensor], final: Mapping[str, Tensor], top_fraction: float = 0.1
) -> list[CompressionRow]:
    """Bytes and reconstruction error of encodings of the update ``final - initial``.

    ``float32 delta`` (the reference), ``bf16 delta``, ``int8 delta`` (absmax per tensor /
    per row, 4-byte scales counted), ``top-k delta`` (the ``top_fraction`` largest
    magnitudes per tensor as float32 value + int32 index, one shot: no error feedback) and
    ``bf16 full values`` (the new parameters in bf16, the update recovered as their difference
    with the float32 ``initial``).
    """
    names = sorted(final)
    deltas = {n: final[n].float() - initial[n].float() for n in names}
    norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in deltas.values()))
    count = sum(d.numel() for d in deltas.values())

    def row(encoding: str, restored: Mapping[str, Tensor], size: int) -> CompressionRow:
        squared = sum(
            float(((restored[n].double() - deltas[n].double()) ** 2).sum()) for n in names
        )
        worst = max(float((restored[n] - deltas[n]).abs().max()) for n in names)
        return CompressionRow(
            encoding,
            size,
            round(size / (4 * count), 4),
            float(f"{math.sqrt(squared) / max(norm, 1e-30):.4g}"),
            float(f"{worst:.4g}"),
        )

    rows = [row("float32 delta", deltas, 4 * count)]
    rows.append(row("bf16 delta", {n: d.bfloat16().float() for n, d in deltas.items()}, 2 * count))
    for per_row, label in ((False, "int8 delta (per tensor)"), (True, "int8 delta (per row)")):
        restored, size = {}, 0
        for name, delta in deltas.items():
            restored[name], nbytes = _int8(delta, per_row)
            size += nbytes
        rows.append(row(label, restored, size))
    restored, size = {}, 0
    for name, delta in deltas.items():
        keep = max(1, round(top_fraction * delta.numel()))
        flat = delta.reshape(-1)
        index = flat.abs().topk(keep).indices
        sparse = torch.zeros_like(flat)
        sparse[index] = flat[index]
        restored[name] = sparse.view_as(delta)
        size += 8 * keep
    rows.append(row(f"top-{top_fraction:.0%} delta (one shot)", restored, size))
    bf16_full = {n: final[n].bfloat16().float() - initial[n].float() for n in names}
    rows.append(row("bf16 full values", bf16_full, 2 * count))
    return rows


def compression_table(rows: Sequence[CompressionRow]) -> str:
    """Markdown table of :func:`delta_compression`'s rows."""
    header = (
        "| encoding | bytes | vs float32 | relative error | max abs error |\n"
        "|---|---|---|---|---|\n"
    )
    return header + "".join(
        f"| {r.encoding} | {r.bytes:,} | {r.ratio_to_float32:.3f} | {r.relative_error:.3g} | "
        f"{r.max_abs_error:.3g} |\n"
        for r in rows
    )


def run_folder_update(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(initial, final)`` global trainable parameters of a ``fedalign run`` folder.

    ``final`` is ``final_state.safetensors``; ``initial`` is rebuilt from the folder's
    ``config.toml`` (the model is seeded by ``federated.seed``, as :func:`prepare` loads it),
    with the classifier sized from the final state.
    """
    folder = Path(folder)
    config = ExperimentConfig.from_toml(folder / "config.toml")
    final = load_file(str(folder / "final_state.safetensors"))
    num_labels = 8
    for _ in range(2):
        model = load_moe_model(config.model, num_labels, seed=config.federated.seed)
        initial = model.trainable_state()
        wrong = [n for n in final if n in initial and initial[n].shape != final[n].shape]
        if not wrong:
            return initial, final
        num_labels = int(final[wrong[0]].shape[0])
    raise ValueError(f"cannot rebuild the initial model of {folder}: shapes differ")


# ------------------------------------------------------------ sketch on real updates
TINY_RUN = (
    "model.name=tiny-upcycled",
    "model.max-length=24",
    "data.max-train-examples=600",
    "run.threads=1",
)
"""Overrides of the small real run whose round-1 decisions :func:`real_sketch_agreement` uses."""


def round_agreement(
    exact: Mapping[str, Any], sketched: Mapping[str, Any]
) -> tuple[int, int, float]:
    """``(agreeing, memberships, max |c_i difference|)`` of two decision records' step D.

    A membership is an (expert, active client) pair; it agrees when the client is in both
    aligned sets or in neither.
    """
    agree = total = 0
    worst = 0.0
    for name, layer in exact["layers"].items():
        other = sketched["layers"][name]["experts"]
        for first, second in zip(layer["experts"], other, strict=True):
            aligned = set(first["aligned"] or []), set(second["aligned"] or [])
            for cid in first["active"] or []:
                total += 1
                agree += (cid in aligned[0]) == (cid in aligned[1])
            for cid, value in (first["consensus"] or {}).items():
                worst = max(worst, abs(value - (second["consensus"] or {}).get(cid, value)))
    return agree, total, worst


def real_sketch_agreement(
    out: str | Path,
    sketch_dims: Sequence[int],
    overrides: Sequence[str] = TINY_RUN,
) -> list[dict[str, Any]]:
    """Round-1 step-D decisions of one real run with exact and with sketched cosines.

    Runs ``fedalign run`` (one round, ``overrides``) once per ``sketch_dim`` in ``0`` and
    ``sketch_dims`` under ``out/k<dim>``: same seed, partition and client training, so
    round 1's client updates are identical and only step D's cosines differ. Also counts
    how close the exact consensus values lie to the threshold.
    """
    records = {}
    for dim in (0, *sketch_dims):
        config = ExperimentConfig()
        config.apply_overrides([*overrides, "federated.rounds=1", f"strategy.sketch-dim={dim}"])
        folder = Path(out) / f"k{dim}"
        run_experiment(config, folder, log=None)
        with (folder / "decisions.jsonl").open(encoding="utf-8") as handle:
            records[dim] = json.loads(handle.readline())
    gaps = [
        abs(value - expert["tau"])
        for layer in records[0]["layers"].values()
        for expert in layer["experts"]
        if expert["tau"] is not None
        for value in expert["consensus"].values()
    ]
    near = sum(gap < 0.01 for gap in gaps) / max(len(gaps), 1)
    rows = []
    for dim in sketch_dims:
        agree, total, worst = round_agreement(records[0], records[dim])
        rows.append(
            {
                "sketch_dim": dim,
                "buckets": sketch_buckets(dim),
                "memberships": total,
                "agreement": round(agree / max(total, 1), 4),
                "max_abs_consensus_difference": round(worst, 4),
                "exact_within_0.01_of_tau": round(near, 4),
            }
        )
    return rows


def real_agreement_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`real_sketch_agreement`'s rows."""
    header = (
        "| sketch dim | buckets | memberships | agree with exact | max abs consensus diff "
        "| exact memberships within 0.01 of tau |\n|---|---|---|---|---|---|\n"
    )
    return header + "".join(
        f"| {r['sketch_dim']} | {r['buckets']} | {r['memberships']} | {r['agreement']:.4f} | "
        f"{r['max_abs_consensus_difference']:.4f} | {r['exact_within_0.01_of_tau']:.2%} |\n"
        for r in rows
    )


# ------------------------------------------------------------------------ all parts
SCALE_PARTS = ("step", "accuracy", "real", "bytes", "compression")
"""Parts of :func:`run_scale_benchmark`."""


def run_scale_benchmark(
    out: str | Path,
    parts: Sequence[str] = ("step", "accuracy", "real", "bytes"),
    *,
    sizes: Sequence[str] = ("eighth", "full"),
    clients: Sequence[int] = (10, 50, 100, 200),
    sketch_dim: int = 4096,
    repeats: int = 3,
    budget_s: float = 60.0,
    accuracy_dims: Sequence[int] = (32, 64, 128, 256, 1024, 4096),
    models: Sequence[str] = ("tiny-upcycled", "upcycled-minilm"),
    run_folders: Sequence[str | Path] = (),
    log: Any = print,
) -> None:
    """Every part of the scale measurement, written under ``out``.

    * ``step``: :func:`run_cell_isolated` for FedAvg, FedAlign-MoE and FedAlign-MoE with
      ``sketch_dim`` per expert size x client count -> ``server_step.{md,json}``;
    * ``accuracy``: :func:`sketch_accuracy` for ``accuracy_dims`` in three settings ->
      ``sketch_accuracy.{md,json}``;
    * ``real``: :func:`real_sketch_agreement` for ``accuracy_dims`` on a small real run
      (run folders in a temporary directory) -> ``sketch_real.{md,json}``;
    * ``bytes``: :func:`model_payload_bytes` of ``models`` -> ``bytes.{md,json}``;
    * ``compression``: :func:`delta_compression` of each of ``run_folders`` ->
      ``compression.{md,json}``.

    ``log`` receives one line per finished cell or setting.
    """
    unknown = set(parts) - set(SCALE_PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; accepted: {list(SCALE_PARTS)}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if "step" in parts:
        rows: list[CellResult] = []
        variants = [("fedavg", 0), ("fedalign", 0), ("fedalign", sketch_dim)]
        for size in sizes:
            if size not in EXPERT_SIZES:
                raise ValueError(f"unknown expert size {size!r}; accepted: {list(EXPERT_SIZES)}")
            for count in clients:
                for strategy, dim in variants:
                    row = run_cell_isolated(
                        strategy, count, size, sketch_dim=dim, repeats=repeats, budget_s=budget_s
                    )
                    rows.append(row)
                    log(
                        f"{size} C={count} {row.strategy}: {row.times_s} s, "
                        f"working {row.working_mb} MB, peak {row.peak_mb} MB"
                    )
                    (folder / "server_step.json").write_text(
                        json.dumps(rows_as_dicts(rows), indent=1)
                    )
        (folder / "server_step.md").write_text(server_step_table(rows))
    if "accuracy" in parts:
        settings: list[tuple[str, dict[str, Any]]] = [
            ("eighth, within-group cos ~0.5", {"noise": 1.0}),
            ("eighth, within-group cos ~0.1", {"noise": 3.0}),
            (
                "full, within-group cos ~0.1",
                {"noise": 3.0, "expert_values": 2 * 384 * 1536, "num_experts": 2},
            ),
        ]
        text, data = "", {}
        for title, options in settings:
            accuracy = sketch_accuracy(accuracy_dims, **options)
            text += f"### {title}\n\n" + sketch_accuracy_table(accuracy) + "\n"
            data[title] = rows_as_dicts(accuracy)
            log(f"sketch accuracy: {title}")
        (folder / "sketch_accuracy.md").write_text(text)
        (folder / "sketch_accuracy.json").write_text(json.dumps(data, indent=1))
    if "real" in parts:
        with tempfile.TemporaryDirectory(prefix="fedalign-scale-") as runs:
            real = real_sketch_agreement(runs, accuracy_dims)
        (folder / "sketch_real.md").write_text(real_agreement_table(real))
        (folder / "sketch_real.json").write_text(json.dumps(real, indent=1))
        log("sketch agreement on a real run")
    if "bytes" in parts:
        payload: list[PayloadBytes] = []
        for model in models:
            payload += model_payload_bytes(model)
        (folder / "bytes.md").write_text(payload_table(payload))
        (folder / "bytes.json").write_text(json.dumps(rows_as_dicts(payload), indent=1))
    if "compression" in parts:
        text, data = "", {}
        for run_folder in run_folders:
            initial, final = run_folder_update(run_folder)
            compression = delta_compression(initial, final)
            text += f"### {run_folder}\n\n" + compression_table(compression) + "\n"
            data[str(run_folder)] = rows_as_dicts(compression)
        (folder / "compression.md").write_text(text)
        (folder / "compression.json").write_text(json.dumps(data, indent=1))
