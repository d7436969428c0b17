"""Resident memory of one simulation, phase by phase (the profile behind the memory change).

The measurement is ``fedalign bench --suite memory-profile``
(:mod:`fedalign.experiments.bench.memory_profile`); this script keeps the original command
line: the number of clients, then any ``section.key=value`` overrides. Equivalent commands::

    OMP_NUM_THREADS=1 fedalign bench --suite memory-profile --clients 20
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory_profile.py 20

Prints the resident and peak resident memory (MB) after preparing, and before / after each
round's client training, screening (compressed uploads restored) and aggregation.
"""

from __future__ import annotations

import sys

from fedalign.config import ExperimentConfig
from fedalign.experiments.bench import BenchRequest, get_suite


def main() -> None:
    suite = get_suite("memory-profile")
    config = ExperimentConfig()
    config.apply_overrides([*suite.defaults, *sys.argv[2:]])
    config.partition.num_clients = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    print(suite.run(BenchRequest(config, {"examples_per_client": 20})))


if __name__ == "__main__":
    main()
