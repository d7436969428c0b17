"""Resident memory of one simulation, phase by phase (the profile behind the memory change).

Usage (the memory cell of ``fedalign bench --suite scale`` with N clients)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory_profile.py 20

Prints the resident and peak resident memory (MB) after preparing, and before / after each
round's client training, screening (compressed uploads restored) and aggregation.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedalign.config import ExperimentConfig
from fedalign.experiments.bench.memory import MEMORY_OVERRIDES
from fedalign.experiments.bench.process import MB, peak_resident_bytes, resident_bytes
from fedalign.experiments.run import Simulation
from fedalign.protocol import tensor_bytes


def main() -> None:
    torch.set_num_threads(1)
    clients = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    config = ExperimentConfig()
    config.apply_overrides([*MEMORY_OVERRIDES, *sys.argv[2:]])
    config.partition.num_clients = clients
    config.data.max_train_examples = 20 * clients
    simulation = Simulation(config, Path(tempfile.mkdtemp()) / "run", log=None)
    simulator = simulation.simulator
    marks: list[tuple[str, float, float]] = []

    def mark(what: str) -> None:
        marks.append((what, resident_bytes() / MB, peak_resident_bytes() / MB))

    train, screen, aggregate = (
        simulator._train_clients,
        simulator.server.screen,
        simulator.server.aggregate,
    )

    def traced_train(*args: Any) -> Any:
        mark("before training")
        done = train(*args)
        mark(f"after training (results {tensor_bytes(done[0]) / MB:.1f} MB)")
        return done

    def traced_screen(results: Any) -> Any:
        done = screen(results)
        accepted = tensor_bytes([r.parameters for r in done.accepted]) / MB
        mark(f"after screening (restored {accepted:.1f} MB)")
        return done

    def traced_aggregate(*args: Any) -> Any:
        done = aggregate(*args)
        mark("after aggregation")
        return done

    simulator._train_clients = traced_train  # type: ignore[method-assign]
    simulator.server.screen = traced_screen  # type: ignore[method-assign]
    simulator.server.aggregate = traced_aggregate  # type: ignore[method-assign]
    mark("prepared")
    simulation.run()
    mark("end")
    print(
        f"kept per client state {simulator.client_state_bytes() / MB:.1f} MB, "
        f"trainable {tensor_bytes(simulator.server.global_parameters) / MB:.2f} MB"
    )
    for what, resident, peak in marks:
        print(f"{what:45s} resident {resident:8.1f} peak {peak:8.1f}")


if __name__ == "__main__":
    main()
