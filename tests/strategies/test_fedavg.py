"""FedAvg: every tensor averaged with weights n_i, asserted against hand-computed values."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from fedalign.protocol import ClientResult, LayerRoutingStatistics
from fedalign.strategies import FedAvg
from tests.helpers import FUSED_LAYOUT

# One fused MoE layer: 2 experts, router (2, 2) + bias, experts (2, 2, 2), plus a head.
LAYOUT = FUSED_LAYOUT


def parameters(value: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor filled with ``value`` except the head, which is ``[value, 2 * value]``."""
    return {
        "moe.router.weight": torch.full((2, 2), value, dtype=dtype),
        "moe.router.bias": torch.full((2,), value, dtype=dtype),
        "moe.experts.w": torch.full((2, 2, 2), value, dtype=dtype),
        "head.weight": torch.tensor([value, 2 * value], dtype=dtype),
    }


def test_fedavg_weights_by_num_examples() -> None:
    results = [
        ClientResult(client_id=0, num_examples=1, parameters=parameters(1.0)),
        ClientResult(client_id=1, num_examples=3, parameters=parameters(5.0)),
    ]
    aggregated = FedAvg(LAYOUT).aggregate(1, parameters(0.0), results, {"kept": 1})
    # (1 * 1 + 3 * 5) / 4 = 4 everywhere; the head's second entry is (2 + 30) / 4 = 8.
    assert_close(aggregated.parameters["moe.router.weight"], torch.full((2, 2), 4.0))
    assert_close(aggregated.parameters["moe.router.bias"], torch.full((2,), 4.0))
    assert_close(aggregated.parameters["moe.experts.w"], torch.full((2, 2, 2), 4.0))
    assert_close(aggregated.parameters["head.weight"], torch.tensor([4.0, 8.0]))
    assert aggregated.state == {"kept": 1}
    assert aggregated.client_parameters == {}
    assert aggregated.record["example_weights"] == {"0": 0.25, "1": 0.75}
    assert aggregated.record["clients"] == [0, 1]
    assert aggregated.record["routing_divergence"] == {}
    json.dumps(aggregated.record)


def test_fedavg_keeps_bfloat16_and_averages_in_float32() -> None:
    results = [
        ClientResult(client_id=0, num_examples=1, parameters=parameters(1.0, torch.bfloat16)),
        ClientResult(client_id=1, num_examples=2, parameters=parameters(2.5, torch.bfloat16)),
    ]
    aggregated = FedAvg(LAYOUT).aggregate(1, parameters(0.0, torch.bfloat16), results, {})
    head = aggregated.parameters["head.weight"]
    assert head.dtype == torch.bfloat16
    # (1 + 2 * 2.5) / 3 = 2, (2 + 2 * 5) / 3 = 4: exact in bfloat16.
    assert_close(head, torch.tensor([2.0, 4.0], dtype=torch.bfloat16))


def test_fedavg_uniform_when_no_examples() -> None:
    results = [
        ClientResult(client_id=0, num_examples=0, parameters=parameters(1.0)),
        ClientResult(client_id=1, num_examples=0, parameters=parameters(3.0)),
    ]
    aggregated = FedAvg(LAYOUT).aggregate(1, parameters(0.0), results, {})
    assert_close(aggregated.parameters["head.weight"], torch.tensor([2.0, 4.0]))


def test_fedavg_records_routing_metrics_when_statistics_arrive() -> None:
    def stats(distribution: list[float]) -> LayerRoutingStatistics:
        return LayerRoutingStatistics(
            routing_distribution=torch.tensor(distribution),
            usage=torch.tensor(distribution),
            margin=torch.zeros(2),
            mean_hidden=torch.eye(2),
            token_count=torch.ones(2),
            num_tokens=4,
        )

    results = [
        ClientResult(0, 1, parameters(1.0), routing_statistics={"moe": stats([0.5, 0.5])}),
        ClientResult(1, 1, parameters(1.0), routing_statistics={"moe": stats([0.5, 0.5])}),
    ]
    record = FedAvg(LAYOUT).aggregate(2, parameters(0.0), results, {}).record
    assert record["routing_divergence"]["moe"]["mean_js"] == pytest.approx(0.0)
    assert record["semantic_dispersion"]["moe"]["mean_dispersion"] == pytest.approx(0.0)
    json.dumps(record)


def test_fedavg_rejects_bad_results() -> None:
    strategy = FedAvg(LAYOUT)
    with pytest.raises(ValueError, match="no client results"):
        strategy.aggregate(1, parameters(0.0), [], {})
    missing = parameters(1.0)
    del missing["head.weight"]
    with pytest.raises(ValueError, match=r"head\.weight"):
        strategy.aggregate(1, parameters(0.0), [ClientResult(0, 1, missing)], {})
    wrong_shape = parameters(1.0)
    wrong_shape["head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        strategy.aggregate(1, parameters(0.0), [ClientResult(0, 1, wrong_shape)], {})
    twice = [ClientResult(0, 1, parameters(1.0)), ClientResult(0, 1, parameters(1.0))]
    with pytest.raises(ValueError, match="twice"):
        strategy.aggregate(1, parameters(0.0), twice, {})
