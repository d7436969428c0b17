"""Fault injection in the simulator: failed clients are recorded, min-clients is enforced."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedalign.config import ConfigError
from fedalign.errors import FederationError
from fedalign.experiments.run import Simulation, run_experiment
from fedalign.federation.simulator import FAULT_REASONS, injected_fault
from fedalign.records import read_jsonl
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_fault_draws_are_seeded_and_follow_the_rate() -> None:
    kinds = ["raise", "vanish", "hang"]
    draws = [injected_fault(7, r, c, 0.3, kinds) for r in range(1, 201) for c in range(5)]
    again = [injected_fault(7, r, c, 0.3, kinds) for r in range(1, 201) for c in range(5)]
    assert draws == again
    share = sum(d is not None for d in draws) / len(draws)
    assert 0.25 < share < 0.35
    assert {d for d in draws if d is not None} == set(kinds)
    assert injected_fault(7, 1, 0, 0.0, kinds) is None
    assert all(injected_fault(7, r, 0, 1.0, ["hang"]) == "hang" for r in range(1, 20))


def test_failed_clients_are_recorded_and_the_round_goes_on(tmp_path: Path) -> None:
    config = tiny_config(
        strategy__name="fedavg",
        federated__rounds=3,
        federated__fault_rate=0.5,
        federated__fault_seed=3,
    )
    expected = {
        r: {
            c: kind
            for c in range(3)
            if (kind := injected_fault(3, r, c, 0.5, ["raise", "vanish", "hang"])) is not None
        }
        for r in range(1, 4)
    }
    assert any(expected.values()) and all(len(v) < 3 for v in expected.values())
    run_experiment(config, tmp_path / "run", log=None)
    lines = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    for line in lines:
        faults = expected[line["round"]]
        assert line["failed_clients"] == sorted(faults)
        assert line["failure_reasons"] == {str(c): FAULT_REASONS[k] for c, k in faults.items()}
    decisions = read_jsonl(tmp_path / "run" / "decisions.jsonl")
    for decision in decisions:
        assert decision["clients"] == [c for c in range(3) if c not in expected[decision["round"]]]


def test_too_few_clients_stop_the_run_clearly(tmp_path: Path) -> None:
    config = tiny_config(strategy__name="fedavg", federated__rounds=1, federated__fault_rate=1.0)
    sim = Simulation(config, tmp_path / "run", log=None)
    with pytest.raises(FederationError, match=r"fewer than federated\.min-clients = 1"):
        sim.run_round(1)
    config = tiny_config(
        strategy__name="fedavg",
        federated__rounds=1,
        federated__fault_rate=0.5,
        federated__fault_seed=3,
        federated__min_clients=3,
    )
    assert any(injected_fault(3, 1, c, 0.5, ["raise", "vanish", "hang"]) for c in range(3))
    sim = Simulation(config, tmp_path / "run3", log=None)
    with pytest.raises(FederationError, match="failed"):
        sim.run_round(1)


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("federated.fault-rate", 1.5, "federated.fault-rate"),
        ("federated.fault-kinds", "raise,explode", "federated.fault-kinds"),
        ("federated.min-clients", 0, "federated.min-clients"),
        ("federated.clip-update-norm", -1.0, "federated.clip-update-norm"),
        ("data.encoding", "no-such-codec", "data.encoding"),
    ],
)
def test_new_keys_are_validated(key: str, value: object, field: str) -> None:
    config = tiny_config()
    config.set(key, value)
    with pytest.raises(ConfigError, match=f"^{field}"):
        config.validate()
