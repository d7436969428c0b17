"""Simulator memory per client: peak resident memory of a whole run at several client counts.

Each cell runs :class:`~fedalign.experiments.run.Simulation` for a few rounds in a fresh
Python process (one torch thread), so every peak is the cell's own, and reports the
process's peak resident set size (``getrusage``) next to what the simulator keeps on
purpose: the prepared data (token ids or the cached frozen-prefix outputs of every
client's examples, the partition's index tensors) and the state kept per client between
its rounds (:meth:`Simulator.client_state_bytes`: AdamW moments with
``train.keep-optimizer-state``, error-feedback residuals with ``federated.upload-compression``,
personalised parameters).

The target: the peak grows by no more than twice the state kept per added client.
:func:`memory_growth` fits both against the client count (least squares over the cells) and
reports their ratio. Clients hold a fixed number of examples each, so the data grows with
them as it would in a real federation.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedalign.config import ExperimentConfig
from fedalign.experiments.bench.process import (
    MB,
    in_fresh_process,
    peak_resident_bytes,
    resident_bytes,
)
from fedalign.experiments.run import Simulation
from fedalign.protocol import tensor_bytes

MEMORY_OVERRIDES = (
    "model.name=upcycled-minilm",
    "model.max-length=48",
    "partition.method=iid",
    "partition.min-client-size=5",
    "data.max-test-examples=200",
    "train.local-steps=1",
    "train.batch-size=16",
    "train.lr=1e-3",
    "train.keep-optimizer-state=true",
    "federated.upload-compression=int8",
    "federated.rounds=2",
    "federated.eval-every=2",
    "strategy.name=fedalign",
    "strategy.stats-max-examples=32",
    "run.threads=1",
    "run.progress=false",
)
"""The default memory cell: the upcycled MiniLM default, every kind of per-client state on
(AdamW moments kept, int8 uploads with error feedback), 2 rounds of one local step."""


@dataclass
class MemoryCell:
    """One client count's memory, in MB (1e6 bytes)."""

    clients: int
    examples_per_client: int
    rounds: int
    baseline_mb: float  # resident memory after imports, before the run
    prepared_mb: float  # resident memory after preparing model and data
    peak_mb: float  # peak resident memory of the process over the run
    data_mb: float  # tensors of the prepared data (inputs, caches, partition indices)
    client_state_mb: float  # state kept between rounds, all clients together
    trainable_mb: float  # one copy of the trainable parameters
    seconds: float


def prepared_data_bytes(data: Any) -> int:
    """Bytes of the prepared data's tensors: inputs (ids or prefix cache) and partitions."""
    return (
        tensor_bytes(data.train)
        + tensor_bytes(data.test)
        + tensor_bytes(data.client_train)
        + tensor_bytes(data.client_test)
    )


def memory_cell(
    clients: int,
    examples_per_client: int = 20,
    overrides: Sequence[str] = MEMORY_OVERRIDES,
) -> MemoryCell:
    """Run one simulation of ``clients`` clients here and read its memory (see the module).

    Run it in a fresh process (:func:`memory_cell_isolated`) for a peak of its own.
    """
    baseline = resident_bytes()
    started = time.perf_counter()
    config = ExperimentConfig()
    config.apply_overrides(overrides)
    config.partition.num_clients = clients
    config.data.max_train_examples = clients * examples_per_client
    config.validate()
    with tempfile.TemporaryDirectory(prefix="fedalign-memory-") as folder:
        simulation = Simulation(config, Path(folder) / "run", log=None)
        prepared = resident_bytes()
        simulation.run()
        peak = peak_resident_bytes()
        kept = simulation.simulator.client_state_bytes()
        data = prepared_data_bytes(simulation.data)
        trainable = tensor_bytes(simulation.global_parameters)
    return MemoryCell(
        clients=clients,
        examples_per_client=examples_per_client,
        rounds=config.federated.rounds,
        baseline_mb=round(baseline / MB, 1),
        prepared_mb=round(prepared / MB, 1),
        peak_mb=round(peak / MB, 1),
        data_mb=round(data / MB, 2),
        client_state_mb=round(kept / MB, 2),
        trainable_mb=round(trainable / MB, 3),
        seconds=round(time.perf_counter() - started, 1),
    )


def memory_cell_isolated(
    clients: int,
    examples_per_client: int = 20,
    overrides: Sequence[str] = MEMORY_OVERRIDES,
    timeout: float | None = None,
) -> MemoryCell:
    """:func:`memory_cell` in a fresh Python process (one torch thread); its result back."""
    arguments = json.dumps(
        {"clients": clients, "examples_per_client": examples_per_client, "overrides": overrides}
    )
    return MemoryCell(
        **in_fresh_process("fedalign.experiments.bench.memory", "memory_cell", arguments, timeout)
    )


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs`` (0 for fewer than two distinct xs)."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


@dataclass
class MemoryGrowth:
    """Per added client, in MB: the peak's growth and the state kept on purpose."""

    peak_per_client_mb: float
    kept_per_client_mb: float  # data + client state
    data_per_client_mb: float
    client_state_per_client_mb: float
    ratio: float  # peak growth / kept growth (target: <= 2)


def memory_growth(cells: Sequence[MemoryCell]) -> MemoryGrowth:
    """Fit the peak and the kept state against the client count (see the module)."""
    counts = [float(c.clients) for c in cells]
    peak = slope(counts, [c.peak_mb for c in cells])
    data = slope(counts, [c.data_mb for c in cells])
    state = slope(counts, [c.client_state_mb for c in cells])
    kept = data + state
    return MemoryGrowth(
        peak_per_client_mb=round(peak, 3),
        kept_per_client_mb=round(kept, 3),
        data_per_client_mb=round(data, 3),
        client_state_per_client_mb=round(state, 3),
        ratio=round(peak / kept, 3) if kept > 0 else float("inf"),
    )


def memory_table(cells: Sequence[MemoryCell]) -> str:
    """Markdown table of the cells and the fitted growth per client."""
    lines = [
        "| clients | examples/client | prepared MB | peak MB | data MB | client state MB "
        "| trainable MB | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(
            f"| {c.clients} | {c.examples_per_client} | {c.prepared_mb:,.1f} | {c.peak_mb:,.1f} "
            f"| {c.data_mb:,.2f} | {c.client_state_mb:,.2f} | {c.trainable_mb:,.3f} "
            f"| {c.seconds:.0f} |"
        )
    if len({c.clients for c in cells}) > 1:
        growth = memory_growth(cells)
        lines.append("")
        lines.append(
            f"Per added client: peak +{growth.peak_per_client_mb:.2f} MB; kept "
            f"{growth.kept_per_client_mb:.2f} MB (data {growth.data_per_client_mb:.2f} + "
            f"client state {growth.client_state_per_client_mb:.2f}); ratio "
            f"**{growth.ratio:.2f}** (target <= 2)."
        )
    return "\n".join(lines)


def cells_as_dicts(cells: Sequence[MemoryCell]) -> list[dict[str, Any]]:
    return [asdict(c) for c in cells]
