"""FedAdam / FedYogi (Reddi et al. 2021): server steps checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult
from fedalign.strategies import FedAdam, FedYogi

LAYOUT = MoELayout(layers=())
LR, BETA1, BETA2, TAU = 0.1, 0.9, 0.99, 0.01
GLOBAL = {"w": torch.tensor([1.0, 2.0])}
# FedAvg of the clients = [1.5, 1.0]: pseudo-gradient Delta = [0.5, -1.0].
RESULTS = [
    ClientResult(0, 1, {"w": torch.tensor([1.0, 1.0])}),
    ClientResult(1, 1, {"w": torch.tensor([2.0, 1.0])}),
]
DELTA = [0.5, -1.0]


def expected_step(first: list[float], second: list[float], start: list[float]) -> torch.Tensor:
    return torch.tensor(
        [x + LR * m / (math.sqrt(v) + TAU) for x, m, v in zip(start, first, second, strict=True)]
    )


def test_fedadam_one_step_by_hand() -> None:
    strategy = FedAdam(LAYOUT, server_lr=LR, beta1=BETA1, beta2=BETA2, tau=TAU)
    aggregated = strategy.aggregate(1, GLOBAL, RESULTS, {})
    first = [(1 - BETA1) * d for d in DELTA]  # m_0 = 0
    second = [BETA2 * TAU**2 + (1 - BETA2) * d**2 for d in DELTA]  # v_0 = tau^2
    assert_close(aggregated.state["first_moment"]["w"], torch.tensor(first))
    assert_close(aggregated.state["second_moment"]["w"], torch.tensor(second))
    assert_close(aggregated.parameters["w"], expected_step(first, second, [1.0, 2.0]))
    assert aggregated.record["pseudo_gradient_norm"] == pytest.approx(math.sqrt(1.25), abs=1e-6)

    # Round 2: the clients return the new global (Delta = 0): m decays, v shrinks by beta2.
    new_global = {"w": aggregated.parameters["w"]}
    unchanged = [ClientResult(0, 1, {"w": new_global["w"].clone()})]
    second_round = strategy.aggregate(2, new_global, unchanged, aggregated.state)
    first_2 = [BETA1 * m for m in first]
    second_2 = [BETA2 * v for v in second]
    assert_close(
        second_round.parameters["w"],
        expected_step(first_2, second_2, new_global["w"].tolist()),
    )


def test_fedyogi_one_step_by_hand() -> None:
    strategy = FedYogi(LAYOUT, server_lr=LR, beta1=BETA1, beta2=BETA2, tau=TAU)
    aggregated = strategy.aggregate(1, GLOBAL, RESULTS, {})
    first = [(1 - BETA1) * d for d in DELTA]
    # v_1 = v_0 - (1 - beta2) * Delta^2 * sign(v_0 - Delta^2); v_0 = tau^2 < Delta^2 -> sign -1.
    second = [TAU**2 + (1 - BETA2) * d**2 for d in DELTA]
    assert_close(aggregated.state["second_moment"]["w"], torch.tensor(second))
    assert_close(aggregated.parameters["w"], expected_step(first, second, [1.0, 2.0]))

    # Round 2 with Delta = 0: Yogi keeps v (unlike Adam), m decays.
    new_global = {"w": aggregated.parameters["w"]}
    unchanged = [ClientResult(0, 1, {"w": new_global["w"].clone()})]
    second_round = strategy.aggregate(2, new_global, unchanged, aggregated.state)
    assert_close(second_round.state["second_moment"]["w"], torch.tensor(second))
    assert_close(
        second_round.parameters["w"],
        expected_step([BETA1 * m for m in first], second, new_global["w"].tolist()),
    )


def test_fedopt_keeps_dtype_and_validates() -> None:
    strategy = FedAdam(LAYOUT)
    bf16_global = {"w": torch.zeros(2, dtype=torch.bfloat16)}
    results = [ClientResult(0, 1, {"w": torch.ones(2, dtype=torch.bfloat16)})]
    assert strategy.aggregate(1, bf16_global, results, {}).parameters["w"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="server_lr"):
        FedYogi(LAYOUT, server_lr=0.0)
