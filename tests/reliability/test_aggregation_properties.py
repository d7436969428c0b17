"""Property-based invariants of aggregation (hypothesis): FedAvg, FedMoE, FedAlign-MoE.

* the record's example weights sum to one;
* permuting the clients changes nothing (up to float tolerance);
* identical clients give their common update.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedalign.protocol import ClientResult, LayerRoutingStatistics
from fedalign.strategies import build_strategy
from tests.helpers import FUSED_LAYOUT

LAYOUT = FUSED_LAYOUT
SHAPES = {
    "moe.experts.w": (2, 2, 2),
    "moe.router.weight": (2, 2),
    "moe.router.bias": (2,),
    "head.weight": (2,),
}
SIZE = sum(torch.Size(s).numel() for s in SHAPES.values())
STRATEGIES = ("fedavg", "fedmoe", "fedalign")
NUM_TOKENS = 20

values = st.floats(-3.0, 3.0, allow_nan=False, width=32)


def unflatten(flat: list[float]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in SHAPES.items():
        n = torch.Size(shape).numel()
        out[name] = torch.tensor(flat[offset : offset + n], dtype=torch.float32).reshape(shape)
        offset += n
    return out


@st.composite
def client_payload(draw: Any) -> dict[str, Any]:
    """Parameters and valid routing statistics of one client (every expert used)."""
    routed = draw(st.integers(1, NUM_TOKENS - 1))
    counts = torch.tensor([float(routed), float(NUM_TOKENS - routed)])
    raw = torch.tensor(draw(st.lists(st.floats(0.05, 1.0), min_size=2, max_size=2)))
    return {
        "parameters": unflatten(draw(st.lists(values, min_size=SIZE, max_size=SIZE))),
        "num_examples": draw(st.integers(1, 50)),
        "statistics": {
            "moe": LayerRoutingStatistics(
                routing_distribution=raw / raw.sum(),
                usage=counts / NUM_TOKENS,
                margin=torch.tensor(draw(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2))),
                mean_hidden=torch.tensor(
                    draw(st.lists(st.floats(0.1, 2.0), min_size=4, max_size=4))
                ).reshape(2, 2),
                token_count=counts,
                num_tokens=NUM_TOKENS,
            )
        },
    }


def result(
    client_id: int, payload: dict[str, Any], num_examples: int | None = None
) -> ClientResult:
    return ClientResult(
        client_id,
        payload["num_examples"] if num_examples is None else num_examples,
        {k: v.clone() for k, v in payload["parameters"].items()},
        payload["statistics"],
        {"task_loss": 1.0, "routing_loss": 0.0},
    )


def aggregate(name: str, results: list[ClientResult], global_parameters: dict) -> Any:
    strategy = build_strategy(name, {}, LAYOUT)
    return strategy.aggregate(1, global_parameters, results, strategy.initial_state())


GLOBAL = unflatten([0.0] * SIZE)
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


@pytest.mark.parametrize("name", STRATEGIES)
@SETTINGS
@given(payloads=st.lists(client_payload(), min_size=1, max_size=4), data=st.data())
def test_weights_sum_to_one_and_permutation_changes_nothing(
    name: str, payloads: list[dict[str, Any]], data: Any
) -> None:
    results = [result(i, p) for i, p in enumerate(payloads)]
    outcome = aggregate(name, results, GLOBAL)
    weights = outcome.record["example_weights"]
    assert set(weights) == {str(i) for i in range(len(results))}
    assert abs(sum(weights.values()) - 1.0) <= 1e-5
    order = data.draw(st.permutations(range(len(results))))
    permuted = aggregate(name, [results[i] for i in order], GLOBAL)
    for key, tensor in outcome.parameters.items():
        torch.testing.assert_close(permuted.parameters[key], tensor, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", STRATEGIES)
@SETTINGS
@given(
    payload=client_payload(),
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=4),
    start=st.lists(values, min_size=SIZE, max_size=SIZE),
)
def test_identical_clients_give_their_common_update(
    name: str, payload: dict[str, Any], sizes: list[int], start: list[float]
) -> None:
    global_parameters = unflatten(start)
    results = [result(i, payload, n) for i, n in enumerate(sizes)]
    outcome = aggregate(name, results, global_parameters)
    for key, tensor in payload["parameters"].items():
        torch.testing.assert_close(outcome.parameters[key], tensor, atol=1e-5, rtol=1e-5)
