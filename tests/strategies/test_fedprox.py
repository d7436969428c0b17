"""FedProx: FedAvg on the server, proximal_mu in every client's instructions."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fedalign.errors import OptionError
from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult
from fedalign.strategies import FedAvg, FedProx
from tests.helpers import proximal_mu

LAYOUT = MoELayout(layers=())


def test_fedprox_instructions_carry_mu() -> None:
    instructions = FedProx(LAYOUT, proximal_mu=0.05).configure_train(1, [3, 7], {})
    assert set(instructions) == {3, 7}
    for instruction in instructions.values():
        # one term, the proximal one, with coefficient mu / 2
        assert [term.name for term in instruction.loss_terms] == ["proximal"]
        assert instruction.loss_terms[0].coefficient == 0.025
        assert proximal_mu(instruction) == 0.05
        assert not instruction.collect_statistics


def test_fedprox_mu_zero_sends_no_term() -> None:
    instructions = FedProx(LAYOUT, proximal_mu=0.0).configure_train(1, [0], {})
    assert instructions[0].loss_terms == []


def test_fedprox_aggregates_like_fedavg() -> None:
    global_parameters = {"w": torch.zeros(2, 3)}
    results = [
        ClientResult(0, 2, {"w": torch.full((2, 3), 1.0)}),
        ClientResult(1, 6, {"w": torch.arange(6.0).reshape(2, 3)}),
    ]
    prox = FedProx(LAYOUT, proximal_mu=0.01).aggregate(1, global_parameters, results, {})
    avg = FedAvg(LAYOUT).aggregate(1, global_parameters, results, {})
    # (2 * 1 + 6 * x) / 8
    expected = (2.0 + 6.0 * torch.arange(6.0).reshape(2, 3)) / 8.0
    assert_close(prox.parameters["w"], expected)
    assert_close(prox.parameters["w"], avg.parameters["w"])
    assert prox.record["strategy"] == "fedprox"


def test_fedprox_rejects_negative_mu() -> None:
    with pytest.raises(OptionError, match="'proximal_mu' must be >= 0"):
        FedProx(LAYOUT, proximal_mu=-1.0)
