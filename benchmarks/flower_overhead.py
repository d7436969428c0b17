"""Per-round wall time of a loopback Flower deployment against the simulator.

The measurement is ``fedalign bench --suite flower-overhead``
(:mod:`fedalign.experiments.bench.flower_overhead`, which describes the modes and what is
counted); this script keeps the original command line. Equivalent commands, from the
repository root::

    OMP_NUM_THREADS=1 fedalign bench --suite flower-overhead \
        --modes sim,cold,warm,warm-tls --repeats 2 --out-dir benchmarks/results/flower
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/flower_overhead.py \
        --modes sim,cold,warm,warm-tls --repeats 2 --out benchmarks/results/flower

Writes ``overhead.md`` and ``overhead.json`` under ``--out`` and appends the command to
``COMMAND.txt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedalign.config import ExperimentConfig
from fedalign.experiments.bench import BenchRequest, get_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument(
        "--set",
        action="append",
        default=None,
        help="section.key=value (default: 3 clients, 4 rounds, one thread)",
    )
    parser.add_argument("--modes", default="sim,cold,warm,warm-tls")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--client-counts", default="", help="e.g. 3,10: each timed with every mode")
    parser.add_argument("--out", default="benchmarks/results/flower")
    parser.add_argument(
        "--before-repo", type=Path, help="a checkout without this branch (mode cold-before)"
    )
    args = parser.parse_args()
    suite = get_suite("flower-overhead")
    config = ExperimentConfig.from_toml(args.config)
    config.apply_overrides(args.set or suite.defaults)
    config.validate()
    options = {
        "modes": args.modes.split(","),
        "repeats": args.repeats,
        "client_counts": [int(n) for n in args.client_counts.split(",") if n.strip()],
        "before_repo": args.before_repo,
        "out_dir": args.out,
    }
    command = "OMP_NUM_THREADS=1 PYTHONPATH=src python " + " ".join(sys.argv)
    print(suite.run(BenchRequest(config, options, lambda line: print(line, flush=True), command)))


if __name__ == "__main__":
    main()
