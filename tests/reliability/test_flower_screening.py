"""The Flower strategy screens replies as the simulator does: a bad one is left out."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedalign[flower]')")

from fedalign.strategies import FedAvg
from tests.flower.test_strategy import (  # noqa: F401  (server_identity: autouse fixture)
    LAYOUT,
    NODES,
    FakeGrid,
    RoundReport,
    client_results,
    parameters,
    replying_with,
    run_round,
    server_identity,
    wrap,
)


def test_a_nan_reply_is_rejected_and_the_rest_aggregate() -> None:
    initial = parameters(0)
    results = {1: client_results(1)}
    results[1][1].parameters["head.weight"][0] = float("nan")
    reports: list[RoundReport] = []

    def on_round(report: RoundReport) -> dict[str, float]:
        reports.append(report)
        return {}

    grid = FakeGrid({v: k for k, v in NODES.items()}, replying_with(results))
    wrapper = wrap(FedAvg(LAYOUT), initial, on_round=on_round)
    run_round(wrapper, grid, 1)
    expected = FedAvg(LAYOUT).aggregate(1, initial, [results[1][0], results[1][2]], {})
    for name, value in expected.parameters.items():
        assert torch.equal(wrapper.global_parameters[name], value), name
    assert list(reports[0].rejected) == [1] and "non-finite" in reports[0].rejected[1]
    assert [r.result.client_id for r in reports[0].replies] == [0, 2]


def test_clipping_on_the_flower_transport() -> None:
    initial = parameters(0)
    results = {1: client_results(1)}
    grid = FakeGrid({v: k for k, v in NODES.items()}, replying_with(results))
    wrapper = wrap(FedAvg(LAYOUT), initial, clip_update_norm=1e-3)
    run_round(wrapper, grid, 1)
    step = sum(float(((wrapper.global_parameters[k] - v) ** 2).sum()) for k, v in initial.items())
    assert step**0.5 <= 1e-3 * (1 + 1e-4)


def test_a_boosted_reply_is_clipped_by_default_and_recorded() -> None:
    initial = parameters(0)
    results = {1: client_results(1)}
    boosted = results[1][2].parameters
    for name, value in initial.items():
        boosted[name] = value + 1000 * (boosted[name] - value)
    reports: list[RoundReport] = []

    def on_round(report: RoundReport) -> dict[str, float]:
        reports.append(report)
        return {}

    grid = FakeGrid({v: k for k, v in NODES.items()}, replying_with(results))
    wrapper = wrap(FedAvg(LAYOUT), initial, on_round=on_round)
    run_round(wrapper, grid, 1)
    assert list(reports[0].clipped) == [2]
    record = reports[0].outcome.record["screening"]
    assert list(record["clipped"]) == ["2"] and record["norm_multiple"] == 5.0
    norms = record["update_norms"]
    assert record["median_norm"] == sorted(norms.values())[1]
    # scaled to the norm of client 1, the nearest in training examples (17 against 24)
    assert record["clipped_to"] == {"2": norms["1"]}
    step = sum(float(((wrapper.global_parameters[k] - v) ** 2).sum()) for k, v in initial.items())
    # a weighted mean of updates no longer than the larger honest norm
    assert step**0.5 <= max(norms["0"], norms["1"]) * (1 + 1e-6)
