"""Issue 14: the server step at scale, the sketch's effect on decisions, bytes per client.

Usage (one torch thread; every server-step cell in a fresh process)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/scale.py --out benchmarks/results/scale
    python benchmarks/scale.py --parts step --sizes eighth --clients 10,50   # a quick look

Writes ``server_step.{md,json}``, ``sketch_accuracy.{md,json}``, ``bytes.{md,json}``,
``compression.{md,json}`` (part ``compression``, from ``--run-folder`` folders of ``fedalign
run``) and appends to ``COMMAND.txt`` under ``--out`` (each part only when run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from fedalign.experiments.scale import (
    EXPERT_SIZES,
    compression_table,
    delta_compression,
    model_payload_bytes,
    payload_table,
    rows_as_dicts,
    run_cell_isolated,
    run_folder_update,
    server_step_table,
    sketch_accuracy,
    sketch_accuracy_table,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/scale")
    parser.add_argument("--parts", default="step,accuracy,bytes")
    parser.add_argument("--sizes", default="eighth,full")
    parser.add_argument("--clients", default="10,50,100,200")
    parser.add_argument("--sketch-dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=60.0, help="stop repeating a cell after")
    parser.add_argument("--accuracy-dims", default="32,64,128,256,1024,4096")
    parser.add_argument("--models", default="tiny-upcycled,upcycled-minilm")
    parser.add_argument(
        "--run-folder", action="append", default=[], help="part compression: a fedalign run folder"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    started = time.time()
    log = []

    if "step" in parts:
        rows = []
        variants = [("fedavg", 0), ("fedalign", 0), ("fedalign", args.sketch_dim)]
        for size in args.sizes.split(","):
            assert size in EXPERT_SIZES, size
            for clients in (int(c) for c in args.clients.split(",")):
                for strategy, sketch_dim in variants:
                    row = run_cell_isolated(
                        strategy,
                        clients,
                        size,
                        sketch_dim=sketch_dim,
                        repeats=args.repeats,
                        budget_s=args.budget_s,
                    )
                    rows.append(row)
                    line = (
                        f"{size} C={clients} {row.strategy}: {row.times_s} s, "
                        f"working {row.working_mb} MB, peak {row.peak_mb} MB"
                    )
                    print(line, flush=True)
                    log.append(line)
                    (out / "server_step.json").write_text(json.dumps(rows_as_dicts(rows), indent=1))
        (out / "server_step.md").write_text(server_step_table(rows))

    if "accuracy" in parts:
        dims = [int(d) for d in args.accuracy_dims.split(",")]
        settings = [
            ("eighth, within-group cos ~0.5", {"noise": 1.0}),
            ("eighth, within-group cos ~0.1", {"noise": 3.0}),
            (
                "full, within-group cos ~0.1",
                {"noise": 3.0, "expert_values": 2 * 384 * 1536, "num_experts": 2},
            ),
        ]
        text = ""
        data = {}
        for title, options in settings:
            accuracy = sketch_accuracy(dims, **options)  # type: ignore[arg-type]
            text += f"### {title}\n\n" + sketch_accuracy_table(accuracy) + "\n"
            data[title] = rows_as_dicts(accuracy)
            print(title, flush=True)
        (out / "sketch_accuracy.md").write_text(text)
        (out / "sketch_accuracy.json").write_text(json.dumps(data, indent=1))

    if "bytes" in parts:
        payload = []
        for model in args.models.split(","):
            payload += model_payload_bytes(model)
        (out / "bytes.md").write_text(payload_table(payload))
        (out / "bytes.json").write_text(json.dumps(rows_as_dicts(payload), indent=1))

    if "compression" in parts:
        text = ""
        data = {}
        for folder in args.run_folder:
            initial, final = run_folder_update(folder)
            rows = delta_compression(initial, final)
            text += f"### {folder}\n\n" + compression_table(rows) + "\n"
            data[folder] = rows_as_dicts(rows)
        (out / "compression.md").write_text(text)
        (out / "compression.json").write_text(json.dumps(data, indent=1))

    command = "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src python " + " ".join(
        [sys.argv[0], *sys.argv[1:]]
    )
    with (out / "COMMAND.txt").open("a", encoding="utf-8") as handle:
        handle.write(
            f"{command}\n"
            f"finished {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')} "
            f"after {time.time() - started:.0f} s; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores (shared with other jobs), one torch thread, "
            f"Python {platform.python_version()}; parts {sorted(parts)}\n\n"
        )


if __name__ == "__main__":
    main()
