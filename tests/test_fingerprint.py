"""Behaviour fingerprint (see ``tests/fingerprint.py``): six tiny runs match the committed
portable reference on any machine and kernel path; two runs on one machine agree bit for
bit; a real change (one aggregation weight, one selection) fails the portable check.

``make test`` runs this module twice: on the CPU's default kernels and with
``ATEN_CPU_CAPABILITY=default``, so that a reference only one kernel path can meet fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fingerprint import (
    CASES,
    compare,
    digests,
    load_reference,
    run_case,
    signature,
    tolerance,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("name", sorted(CASES))
def test_behaviour_matches_portable_reference(name: str, tmp_path: Path) -> None:
    result = compare(load_reference()[name], signature(run_case(name, tmp_path)), tolerance(name))
    assert not result.problems, (
        f"{name} ({torch.backends.cpu.get_cpu_capability()} kernels) left the reference:\n"
        + result.report()
    )


def test_two_runs_on_one_machine_agree_bit_for_bit(tmp_path: Path) -> None:
    name = "fedalign-adaptive-reg-qwen3"
    first = digests(run_case(name, tmp_path / "first"))
    assert digests(run_case(name, tmp_path / "second")) == first


def test_one_aggregation_weight_changed_by_five_percent_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client 0's FedAvg weight x1.05 (renormalised) in the tensors averaged, not in the
    record: only the floating-point part of the check can see it."""
    import fedalign.strategies.fedavg as fedavg_module

    average = fedavg_module.weighted_average

    def perturbed(global_parameters, results, weights):  # type: ignore[no-untyped-def]
        changed = weights.clone()
        changed[0] *= 1.05
        return average(global_parameters, results, changed / changed.sum())

    monkeypatch.setattr(fedavg_module, "weighted_average", perturbed)
    result = compare(
        load_reference()["fedavg"], signature(run_case("fedavg", tmp_path)), tolerance("fedavg")
    )
    assert result.largest_state_distance > tolerance("fedavg").state
    assert any("final state moved" in problem for problem in result.problems)


def test_one_selection_flipped_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 3 of the partial-participation case trains one other client."""
    import fedalign.federation.simulator as simulator_module

    sample = simulator_module.sample_clients

    def flipped(seed: int, server_round: int, num_clients: int, fraction: float) -> list[int]:
        chosen = sample(seed, server_round, num_clients, fraction)
        if server_round == 3:
            left_out = next(i for i in range(num_clients) if i not in chosen)
            chosen = sorted([*chosen[1:], left_out])
        return chosen

    monkeypatch.setattr(simulator_module, "sample_clients", flipped)
    name = "fedalign-adaptive-reg-qwen3"
    result = compare(load_reference()[name], signature(run_case(name, tmp_path)), tolerance(name))
    assert any("clients" in problem and "exactly" in problem for problem in result.problems)


def test_accuracy_tolerance_is_one_prediction() -> None:
    """A flipped prediction on the global test set passes; two fail."""
    reference = load_reference()["fedavg"]
    size = reference["config"]["data"]["max-test-examples"]
    for flips, passes in ((1, True), (2, False)):
        current = {**reference, "metrics": [dict(row) for row in reference["metrics"]]}
        current["metrics"][-1]["global_accuracy"] += flips / size
        result = compare(reference, current, tolerance("fedavg"))
        assert (not result.problems) is passes, result.problems
