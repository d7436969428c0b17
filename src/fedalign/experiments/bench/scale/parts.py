"""Every part of the scale measurement written under one folder (``benchmarks/scale.py``)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedalign.experiments.bench.scale.compression import (
    compression_table,
    delta_compression,
    run_folder_update,
)
from fedalign.experiments.bench.scale.payload import (
    PayloadBytes,
    model_payload_bytes,
    payload_table,
    rows_as_dicts,
)
from fedalign.experiments.bench.scale.server_step import (
    CellResult,
    run_cell_isolated,
    server_step_table,
)
from fedalign.experiments.bench.scale.sketch import sketch_accuracy, sketch_accuracy_table
from fedalign.experiments.bench.scale.sketch_real import (
    real_agreement_table,
    real_sketch_agreement,
)
from fedalign.experiments.bench.scale.synthetic import EXPERT_SIZES

SCALE_PARTS = ("step", "accuracy", "real", "bytes", "compression")
"""Parts of :func:`run_scale_benchmark`."""

Log = Callable[[str], object]

ACCURACY_SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("eighth, within-group cos ~0.5", {"noise": 1.0}),
    ("eighth, within-group cos ~0.1", {"noise": 3.0}),
    (
        "full, within-group cos ~0.1",
        {"noise": 3.0, "expert_values": 2 * 384 * 1536, "num_experts": 2},
    ),
)
"""The three settings of part ``accuracy``: title -> :func:`sketch_accuracy` options."""


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
        step_part(folder, sizes, clients, sketch_dim, repeats, budget_s, log)
    if "accuracy" in parts:
        accuracy_part(folder, accuracy_dims, log)
    if "real" in parts:
        real_part(folder, accuracy_dims, log)
    if "bytes" in parts:
        bytes_part(folder, models)
    if "compression" in parts:
        compression_part(folder, run_folders)


def step_part(
    folder: Path,
    sizes: Sequence[str],
    clients: Sequence[int],
    sketch_dim: int,
    repeats: int,
    budget_s: float,
    log: Log,
) -> None:
    """Part ``step``: ``server_step.json`` rewritten after every cell, then the table."""
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
                (folder / "server_step.json").write_text(json.dumps(rows_as_dicts(rows), indent=1))
    (folder / "server_step.md").write_text(server_step_table(rows))


def accuracy_part(folder: Path, accuracy_dims: Sequence[int], log: Log) -> None:
    """Part ``accuracy``: :func:`sketch_accuracy` in each of :data:`ACCURACY_SETTINGS`."""
    text, data = "", {}
    for title, options in ACCURACY_SETTINGS:
        accuracy = sketch_accuracy(accuracy_dims, **options)
        text += f"### {title}\n\n" + sketch_accuracy_table(accuracy) + "\n"
        data[title] = rows_as_dicts(accuracy)
        log(f"sketch accuracy: {title}")
    (folder / "sketch_accuracy.md").write_text(text)
    (folder / "sketch_accuracy.json").write_text(json.dumps(data, indent=1))


def real_part(folder: Path, accuracy_dims: Sequence[int], log: Log) -> None:
    """Part ``real``: :func:`real_sketch_agreement` with run folders in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="fedalign-scale-") as runs:
        real = real_sketch_agreement(runs, accuracy_dims)
    (folder / "sketch_real.md").write_text(real_agreement_table(real))
    (folder / "sketch_real.json").write_text(json.dumps(real, indent=1))
    log("sketch agreement on a real run")


def bytes_part(folder: Path, models: Sequence[str]) -> None:
    """Part ``bytes``: :func:`model_payload_bytes` of every model."""
    payload: list[PayloadBytes] = []
    for model in models:
        payload += model_payload_bytes(model)
    (folder / "bytes.md").write_text(payload_table(payload))
    (folder / "bytes.json").write_text(json.dumps(rows_as_dicts(payload), indent=1))


def compression_part(folder: Path, run_folders: Sequence[str | Path]) -> None:
    """Part ``compression``: :func:`delta_compression` of every run folder's update."""
    text, data = "", {}
    for run_folder in run_folders:
        initial, final = run_folder_update(run_folder)
        compression = delta_compression(initial, final)
        text += f"### {run_folder}\n\n" + compression_table(compression) + "\n"
        data[str(run_folder)] = rows_as_dicts(compression)
    (folder / "compression.md").write_text(text)
    (folder / "compression.json").write_text(json.dumps(data, indent=1))
