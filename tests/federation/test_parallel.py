"""Parallel clients (``run.workers``): the same rounds as one process, bit for bit.

Spawns two worker processes (each builds the tiny model once), so the module takes some
seconds; one torch thread everywhere, the condition of bitwise equality.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedalign.config import ConfigError
from fedalign.experiments.run import Simulation
from fedalign.federation.parallel import worker_threads
from tests.helpers import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]


def final_state(tmp_path: Path, name: str, **overrides: object) -> tuple[dict, list[dict]]:
    config = tiny_config(run__threads=1, **overrides)
    simulation = Simulation(config, tmp_path / name, log=None)
    lines = []
    try:
        for server_round in range(1, config.federated.rounds + 1):
            lines.append(simulation.run_round(server_round))
    finally:
        simulation.simulator.close()
    return simulation.global_parameters, lines


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy__name": "fedalign"},
        # kept optimiser state and injected faults travel through the pool too
        {
            "strategy__name": "fedprox",
            "train__keep_optimizer_state": True,
            "federated__fault_rate": 0.4,
            "federated__fault_seed": 3,
            "federated__fault_kinds": "raise,vanish",
        },
        # error-feedback residuals travel to the workers; attacks apply to their results
        {"strategy__name": "fedavg", "federated__upload_compression": "int8"},
        {
            "strategy__name": "fedavg",
            "federated__attack": "sign-flip",
            "federated__attack_clients": [1],
        },
    ],
)
def test_two_workers_give_the_sequential_rounds_bitwise(
    tmp_path: Path, overrides: dict[str, object]
) -> None:
    sequential, sequential_lines = final_state(tmp_path, "one", **overrides)
    parallel, parallel_lines = final_state(tmp_path, "two", run__workers=2, **overrides)
    assert sequential.keys() == parallel.keys()
    for name, value in sequential.items():
        assert torch.equal(parallel[name], value), name
    for one, two in zip(sequential_lines, parallel_lines, strict=True):
        for key in ("train_loss", "routing_loss", "global_accuracy", "failed_clients"):
            assert one[key] == two[key], key
        assert one["bytes_per_client"] == two["bytes_per_client"]
    if "federated__fault_rate" in overrides:  # the faults did strike
        assert any(line["failed_clients"] for line in sequential_lines)


def test_worker_threads_and_validation() -> None:
    assert worker_threads(1, 2) == 1
    assert worker_threads(8, 2) == 4
    assert worker_threads(5, 2) == 2
    config = tiny_config(run__workers=0)
    with pytest.raises(ConfigError, match=r"run.workers must be >= 1 \(got 0\)"):
        config.validate()
