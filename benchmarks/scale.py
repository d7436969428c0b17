"""Issue 14: the server step at scale, the sketch's effect on decisions, bytes per client.

Usage (one torch thread; every server-step cell in a fresh process)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/scale.py --out benchmarks/results/scale
    python benchmarks/scale.py --parts step --sizes eighth --clients 10,50   # a quick look
    python benchmarks/scale.py --parts compression --run-folder /tmp/x/fedalign

Writes ``server_step.{md,json}``, ``sketch_accuracy.{md,json}``, ``bytes.{md,json}``,
``compression.{md,json}`` (part ``compression``, from ``--run-folder`` folders of ``fedalign
run``) and appends the command to ``COMMAND.txt`` under ``--out`` (each part only when run).
The work is :func:`fedalign.experiments.bench.scale.run_scale_benchmark`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from fedalign.experiments.bench.scale import run_scale_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/scale")
    parser.add_argument("--parts", default="step,accuracy,real,bytes")
    parser.add_argument("--sizes", default="eighth,full")
    parser.add_argument("--clients", default="10,50,100,200")
    parser.add_argument("--sketch-dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=60.0, help="stop repeating a cell after")
    parser.add_argument("--accuracy-dims", default="32,64,128,256,1024,4096")
    parser.add_argument("--models", default="tiny-upcycled,upcycled-minilm")
    parser.add_argument(
        "--run-folder", action="append", default=[], help="part compression: a fedalign run folder"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    parts = args.parts.split(",")
    run_scale_benchmark(
        args.out,
        parts,
        sizes=args.sizes.split(","),
        clients=[int(c) for c in args.clients.split(",")],
        sketch_dim=args.sketch_dim,
        repeats=args.repeats,
        budget_s=args.budget_s,
        accuracy_dims=[int(d) for d in args.accuracy_dims.split(",")],
        models=args.models.split(","),
        run_folders=args.run_folder,
        log=lambda line: print(line, flush=True),
    )
    command = "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src python " + " ".join(
        [sys.argv[0], *sys.argv[1:]]
    )
    with (Path(args.out) / "COMMAND.txt").open("a", encoding="utf-8") as handle:
        handle.write(
            f"{command}\n"
            f"finished {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')} "
            f"after {time.time() - started:.0f} s; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores (shared with other jobs), one torch thread, "
            f"Python {platform.python_version()}; parts {sorted(parts)}\n\n"
        )


if __name__ == "__main__":
    main()
