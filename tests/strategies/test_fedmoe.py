"""FedMoE-style activation-aware aggregation: u_min exclusion and n_i * u_i(e) weights."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult, LayerRoutingStatistics
from fedalign.strategies import FedMoE
from tests.helpers import ROUTER_WEIGHT, toy_layout

# Two experts, stored fused or one tensor pair (w (3,), b (1,)) each; a router weight only.
FUSED = toy_layout(router_params=ROUTER_WEIGHT)
PER_EXPERT = toy_layout(per_expert=True, router_params=ROUTER_WEIGHT)


def build(layout: MoELayout, router: float, experts: list[list[float]]) -> dict[str, torch.Tensor]:
    """Parameters with a constant router and expert e's flattened values ``experts[e]``."""
    if layout is FUSED:
        state = {"moe.experts.w": torch.zeros(2, 2, 2)}
    else:
        state = {
            f"moe.experts.{e}.{p}": torch.zeros(s)
            for e in range(2)
            for p, s in [("w", 3), ("b", 1)]
        }
    state["moe.router.weight"] = torch.full((2, 2), router)
    for expert, values in enumerate(experts):
        layout.layers[0].write_expert_vector(state, expert, torch.tensor(values))
    return state


def stats(usage: list[float]) -> dict[str, LayerRoutingStatistics]:
    return {
        "moe": LayerRoutingStatistics(
            routing_distribution=torch.tensor([0.5, 0.5]),
            usage=torch.tensor(usage),
            margin=torch.zeros(2),
            mean_hidden=torch.zeros(2, 2),
            token_count=torch.tensor(usage) * 100,
            num_tokens=100,
        )
    }


@pytest.mark.parametrize("layout", [FUSED, PER_EXPERT], ids=["fused", "per-expert"])
def test_fedmoe_usage_threshold_and_weights(layout: MoELayout) -> None:
    previous_expert_1 = [-1.0, -2.0, -3.0, -4.0]
    global_parameters = build(layout, 0.0, [[0.0] * 4, previous_expert_1])
    results = [
        ClientResult(0, 1, build(layout, 6.0, [[1, 2, 3, 4], [9] * 4]), stats([0.5, 0.0])),
        ClientResult(1, 2, build(layout, 12.0, [[100] * 4, [9] * 4]), stats([0.05, 0.05])),
        ClientResult(2, 3, build(layout, 0.0, [[10, 20, 30, 40], [9] * 4]), stats([0.2, 0.09])),
    ]
    aggregated = FedMoE(layout, u_min=0.1).aggregate(1, global_parameters, results, {})
    moe = layout.layers[0]
    # Expert 0: clients 0 and 2 qualify (u >= 0.1); weights n * u = 1 * 0.5, 3 * 0.2 -> 5/11, 6/11.
    expected_0 = (
        torch.tensor([1.0, 2.0, 3.0, 4.0]) * 5 / 11 + torch.tensor([10.0, 20, 30, 40]) * 6 / 11
    )
    assert_close(moe.expert_vector(aggregated.parameters, 0), expected_0)
    # Expert 1: nobody reaches u_min -> previous global value.
    assert_close(moe.expert_vector(aggregated.parameters, 1), torch.tensor(previous_expert_1))
    # Router: FedAvg with n = 1, 2, 3: (6 + 24 + 0) / 6 = 5.
    assert_close(aggregated.parameters["moe.router.weight"], torch.full((2, 2), 5.0))
    experts = aggregated.record["layers"]["moe"]["experts"]
    assert experts[0]["qualified"] == [0, 2]
    assert experts[0]["weights"] == pytest.approx({"0": 5 / 11, "2": 6 / 11}, abs=1e-6)
    assert experts[0]["fallback"] is None
    assert experts[1]["qualified"] == []
    assert experts[1]["fallback"] == "no-qualified-client"
    json.dumps(aggregated.record)


def test_fedmoe_needs_statistics() -> None:
    strategy = FedMoE(FUSED)
    assert strategy.needs_routing_statistics
    assert strategy.configure_train(1, [0], {})[0].collect_statistics
    global_parameters = build(FUSED, 0.0, [[0.0] * 4, [0.0] * 4])
    with pytest.raises(ValueError, match="routing statistics"):
        strategy.aggregate(1, global_parameters, [ClientResult(0, 1, global_parameters)], {})
