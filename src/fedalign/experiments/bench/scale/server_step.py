"""The server step at scale: one strategy's ``aggregate`` timed on a synthetic round.

:func:`run_cell` times one strategy's ``aggregate`` on a
:func:`~.synthetic.synthetic_round` and reads the peak resident memory;
:func:`run_cell_isolated` does that in a fresh Python process, so every cell's peak is its
own. The aggregation reads every client's tensors as if they were distinct; the memory
reported above the inputs (``working``) is what the server step itself allocates.
``held_inputs_gb`` says what holding every client's parameters would take (the transport's
problem: stream or spill them, see docs/method.md's "Scale").
"""

from __future__ import annotations

import gc
import json
import statistics as pystats
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedalign.experiments.bench.process import (
    GB,
    MB,
    in_fresh_process,
    peak_resident_bytes,
    resident_bytes,
)
from fedalign.experiments.bench.scale.synthetic import EXPERT_SIZES, synthetic_round
from fedalign.protocol import tensor_bytes
from fedalign.strategies import build_strategy

Tensor = torch.Tensor


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
        **in_fresh_process(
            "fedalign.experiments.bench.scale.server_step", "run_cell", arguments, timeout
        )
    )


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
