"""``fedalign bench --suite scale``: server-step, upload and memory ratios, measured in one run.

Three tables in one Markdown page:

* **server step**: FedAlign-MoE (exact and sketched) vs FedAvg, time and working memory of
  ``aggregate`` at several client counts, each cell in a fresh process
  (:func:`.server_step.run_cell_isolated`);
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

from fedalign.experiments.bench.memory import (
    MEMORY_OVERRIDES,
    MemoryCell,
    memory_cell_isolated,
    memory_growth,
    memory_table,
)
from fedalign.experiments.bench.registry import (
    OUT_DIR,
    BenchRequest,
    BenchSuite,
    SuiteOption,
    register,
)
from fedalign.experiments.bench.scale.payload import CompressedBytes, bytes_table, compressed_bytes
from fedalign.experiments.bench.scale.server_step import (
    CellResult,
    run_cell_isolated,
    server_step_table,
)


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
    page = scale_page(quick, size, cells, payload, memory)
    if out is not None:
        data: dict[str, Any] = {
            "server_step": [asdict(c) for c in cells],
            "bytes": [asdict(r) for r in payload],
            "memory": [asdict(m) for m in memory],
            "memory_growth": asdict(growth),
        }
        write_scale(Path(out), page, data)
    return page


def scale_page(
    quick: bool,
    size: ScaleSize,
    cells: Sequence[CellResult],
    payload: Sequence[CompressedBytes],
    memory: Sequence[MemoryCell],
) -> str:
    """The suite's Markdown page: the three tables under their headings."""
    return "\n".join(
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


def write_scale(folder: Path, page: str, data: dict[str, Any]) -> None:
    """``scale.md`` (the page) and ``scale.json`` (every row) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scale.md").write_text(page)
    (folder / "scale.json").write_text(json.dumps(data, indent=1))


QUICK_OPTION = SuiteOption("quick", "scale suite: a tiny size that runs in seconds")


def _run_scale(request: BenchRequest) -> str:
    return run_scale_suite(
        request.options["quick"], out=request.options["out_dir"], log=request.log
    )


register(
    BenchSuite(
        name="scale",
        description="server step, bytes per client and simulator memory at 10-100 clients",
        run=_run_scale,
        options=(QUICK_OPTION, OUT_DIR),
    )
)
