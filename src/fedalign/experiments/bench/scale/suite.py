"""``fedalign bench --suite scale``: server-step, upload and memory ratios, measured in one run.

Three tables in one Markdown page:

* **server step**: FedAlign-MoE (exact and sketched) vs FedAvg, time and working memory of
  ``aggregate`` at several client counts, each cell in a fresh process
  (:func:`fedalign.experiments.scale.run_cell_isolated`);
* **bytes per client per round**: the upload of each strategy with each
  ``federated.upload-compression``, counted on the real compressed payload of the model's
  trainable tensors (:func:`fedalign.compression.compress_update`), its ratio to the float32
  upload and the routing statistics' share;
* **simulator memory**: peak resident memory of whole runs at several client counts and the
  growth per added client against the state kept per client
  (:mod:`fedalign.experiments.bench.memory`).

``quick`` shrinks every part (tiny model, a handful of clients) so a test runs it in
seconds; the numbers then only show that the pipeline works.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedalign.compression import COMPRESSIONS, compress_update
from fedalign.config import ModelConfig
from fedalign.experiments.bench.memory import (
    MEMORY_OVERRIDES,
    MemoryCell,
    memory_cell_isolated,
    memory_growth,
    memory_table,
)
from fedalign.experiments.scale import (
    CellResult,
    payload_bytes,
    run_cell_isolated,
    server_step_table,
)
from fedalign.models.loading import load_moe_model
from fedalign.protocol import tensor_bytes

SCALE_STRATEGIES = ("fedavg", "fedalign")


@dataclass
class ScaleSize:
    """How big each part of the scale suite is."""

    step_clients: tuple[int, ...] = (10, 50, 100)
    step_size: str = "eighth"
    sketch_dim: int = 4096
    step_repeats: int = 3
    bytes_model: str = "upcycled-minilm"
    topk_fraction: float = 0.1
    memory_clients: tuple[int, ...] = (10, 50, 100)
    memory_examples: int = 20
    memory_overrides: tuple[str, ...] = MEMORY_OVERRIDES


QUICK = ScaleSize(
    step_clients=(4, 8),
    sketch_dim=256,
    bytes_model="tiny-upcycled",
    memory_clients=(3, 6),
    memory_examples=12,
    memory_overrides=(
        *MEMORY_OVERRIDES,
        "model.name=tiny-upcycled",
        "model.max-length=24",
        "data.max-test-examples=40",
        "strategy.stats-max-examples=16",
    ),
)
"""The quick size (a test runs it in seconds)."""


@dataclass
class CompressedBytes:
    """One (strategy, compression) upload of one client in one round."""

    model: str
    strategy: str
    compression: str
    upload_bytes: int
    vs_float32: float  # upload / the uncompressed upload of the same strategy
    statistics_share: float  # routing statistics / upload


def compressed_bytes(
    model_name: str, topk_fraction: float = 0.1, strategies: Sequence[str] = SCALE_STRATEGIES
) -> list[CompressedBytes]:
    """Upload bytes per strategy and compression, on the model's real tensor shapes.

    The compressed sizes depend on shapes only (bf16: 2 bytes a value; int8: 1 byte a value
    plus 4 a row; topk: 8 bytes a kept value), so a random delta of the model's shapes gives
    the exact payload size.
    """
    model = load_moe_model(ModelConfig(name=model_name), 8, seed=0)
    parameters = model.trainable_state()
    generator = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(t.shape, generator=generator) for n, t in parameters.items()}
    sizes = {"none": tensor_bytes(parameters)}
    for method in COMPRESSIONS[1:]:
        update, _ = compress_update(delta, method, fraction=topk_fraction)
        sizes[method] = tensor_bytes(update)
    rows = []
    for base in payload_bytes(model.layout, parameters, model_name, strategies):
        for method, size in sizes.items():
            upload = size + base.statistics_bytes
            rows.append(
                CompressedBytes(
                    model=model_name,
                    strategy=base.strategy,
                    compression=method if method != "topk" else f"topk {topk_fraction:g}",
                    upload_bytes=upload,
                    vs_float32=round(upload / base.upload_bytes, 4),
                    statistics_share=round(base.statistics_bytes / upload, 5),
                )
            )
    return rows


def bytes_table(rows: Sequence[CompressedBytes]) -> str:
    lines = [
        "| model | strategy | upload compression | upload B/client/round | vs float32 "
        "| routing statistics share |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.strategy} | {r.compression} | {r.upload_bytes:,} | "
            f"{r.vs_float32:.3f} | {100 * r.statistics_share:.3f}% |"
        )
    return "\n".join(lines)


def run_scale_suite(
    quick: bool = False,
    *,
    size: ScaleSize | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> str:
    """Every part of the scale suite; returns the Markdown page (and writes
    ``scale.md`` / ``scale.json`` under ``out`` when given)."""
    size = size or (QUICK if quick else ScaleSize())
    say = log or (lambda _line: None)
    cells: list[CellResult] = []
    for clients in size.step_clients:
        for strategy, dim in (("fedavg", 0), ("fedalign", 0), ("fedalign", size.sketch_dim)):
            cell = run_cell_isolated(
                strategy, clients, size.step_size, sketch_dim=dim, repeats=size.step_repeats
            )
            cells.append(cell)
            say(f"server step {cell.strategy} C={clients}: {cell.median_s} s")
    payload = compressed_bytes(size.bytes_model, size.topk_fraction)
    say("bytes")
    memory: list[MemoryCell] = []
    for clients in size.memory_clients:
        memory.append(memory_cell_isolated(clients, size.memory_examples, size.memory_overrides))
        say(f"memory C={clients}: peak {memory[-1].peak_mb} MB")
    growth = memory_growth(memory)
    page = "\n".join(
        [
            "# Scale suite" + (" (quick size: pipeline check, not a measurement)" if quick else ""),
            "",
            f"## Server step ({size.step_size} experts, median of {size.step_repeats} call(s),"
            " each cell a fresh process)",
            "",
            server_step_table(cells),
            "## Bytes per client per round",
            "",
            bytes_table(payload),
            "",
            f"## Simulator memory ({size.memory_examples} examples a client; every cell a "
            "fresh process)",
            "",
            "Overrides: `" + " ".join(size.memory_overrides) + "`",
            "",
            memory_table(memory),
            "",
        ]
    )
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scale.md").write_text(page)
        data: dict[str, Any] = {
            "server_step": [asdict(c) for c in cells],
            "bytes": [asdict(r) for r in payload],
            "memory": [asdict(m) for m in memory],
            "memory_growth": asdict(growth),
        }
        (folder / "scale.json").write_text(json.dumps(data, indent=1))
    return page
