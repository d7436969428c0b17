"""Speed-up of the simulator with a round's clients in 1 vs N worker processes.

The measurement is ``fedalign bench --suite parallel``
(:mod:`fedalign.experiments.bench.parallel`); this script keeps the original command line.
Equivalent commands::

    OMP_NUM_THREADS=1 fedalign bench --suite parallel --workers 1,2 --repeats 2 \
        --out-dir benchmarks/results/parallel
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/parallel_clients.py \
        --workers 1,2 --repeats 2 --out benchmarks/results/parallel

Writes ``speedup.md`` / ``speedup.json`` under ``--out`` and appends to ``COMMAND.txt``.
"""

from __future__ import annotations

import argparse
import sys

from fedalign.config import ExperimentConfig
from fedalign.experiments.bench import BenchRequest, get_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--set", action="append", default=None, help="section.key=value")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/parallel")
    args = parser.parse_args()
    suite = get_suite("parallel")
    config = ExperimentConfig.from_toml(args.config)
    config.apply_overrides(args.set or suite.defaults)
    config.validate()
    options = {
        "workers": [int(w) for w in args.workers.split(",")],
        "repeats": args.repeats,
        "out_dir": args.out,
    }
    command = "OMP_NUM_THREADS=1 PYTHONPATH=src python " + " ".join(sys.argv)
    print(suite.run(BenchRequest(config, options, lambda line: print(line, flush=True), command)))


if __name__ == "__main__":
    main()
