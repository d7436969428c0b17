"""Bad client updates are rejected with a reason and never aggregated; update clipping."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from fedalign.errors import FederationError
from fedalign.experiments.run import Simulation
from fedalign.federation import ServerState, simulator
from fedalign.protocol import ClientResult, LayerRoutingStatistics
from fedalign.records import read_jsonl
from fedalign.strategies import build_strategy
from fedalign.strategies.screening import check_results, clip_update, result_problem
from tests.helpers import tiny_config
from tests.reliability.test_aggregation_properties import LAYOUT, SHAPES

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GLOBAL = {name: torch.zeros(shape) for name, shape in SHAPES.items()}


def stats(**changes: Any) -> dict[str, LayerRoutingStatistics]:
    fields = {
        "routing_distribution": torch.tensor([0.25, 0.75]),
        "usage": torch.tensor([0.4, 0.6]),
        "margin": torch.tensor([0.1, 0.2]),
        "mean_hidden": torch.ones(2, 2),
        "token_count": torch.tensor([4.0, 6.0]),
        "num_tokens": 10,
    }
    fields.update(changes)
    return {"moe": LayerRoutingStatistics(**fields)}


def good(client_id: int = 0, value: float = 1.0) -> ClientResult:
    parameters = {name: torch.full(shape, value) for name, shape in SHAPES.items()}
    return ClientResult(client_id, 5, parameters, stats())


def with_parameter(name: str, tensor: torch.Tensor | None) -> ClientResult:
    result = good()
    if tensor is None:
        del result.parameters[name]
    else:
        result.parameters[name] = tensor
    return result


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (with_parameter("head.weight", torch.tensor([1.0, float("nan")])), "non-finite"),
        (with_parameter("head.weight", torch.tensor([float("inf"), 0.0])), "non-finite"),
        (with_parameter("head.weight", torch.zeros(3)), "has shape (3,), expected (2,)"),
        (with_parameter("head.weight", torch.zeros(2, dtype=torch.float64)), "dtype"),
        (with_parameter("head.weight", None), "missing parameter 'head.weight'"),
        (with_parameter("extra.bias", torch.zeros(1)), "unexpected parameter 'extra.bias'"),
        (
            dataclasses.replace(
                good(), routing_statistics=stats(routing_distribution=torch.tensor([0.5, 0.6]))
            ),
            "sums to 1.1",
        ),
        (
            dataclasses.replace(
                good(), routing_statistics=stats(routing_distribution=torch.tensor([-0.5, 1.5]))
            ),
            "negative",
        ),
        (
            dataclasses.replace(good(), routing_statistics=stats(usage=torch.tensor([0.4, 1.6]))),
            "usage outside [0, 1]",
        ),
        (
            dataclasses.replace(
                good(), routing_statistics=stats(token_count=torch.tensor([4.0, 9.0]))
            ),
            "expected top_k * num_tokens = 1 * 10 = 10",
        ),
        (
            dataclasses.replace(
                good(), routing_statistics=stats(margin=torch.tensor([0.1, float("nan")]))
            ),
            "margin has non-finite",
        ),
        (
            dataclasses.replace(good(), routing_statistics=stats(mean_hidden=torch.ones(3, 2))),
            "mean_hidden has shape (3, 2)",
        ),
        (  # a hidden width other than the layer's would crash the stacking in step D
            dataclasses.replace(good(), routing_statistics=stats(mean_hidden=torch.ones(2, 3))),
            "mean_hidden has shape (2, 3), expected (2, 2)",
        ),
        (  # the empty (E, 0) of public-probe, sent to a server that needs the vectors
            dataclasses.replace(good(), routing_statistics=stats(mean_hidden=torch.ones(2, 0))),
            "mean_hidden has shape (2, 0), expected (2, 2)",
        ),
        (
            dataclasses.replace(good(), routing_statistics={"other": stats()["moe"]}),
            "unknown MoE layer 'other'",
        ),
    ],
)
def test_result_problem_names_the_reason(result: ClientResult, reason: str) -> None:
    problem = result_problem(GLOBAL, result, LAYOUT)
    assert problem is not None and reason in problem
    assert result_problem(GLOBAL, good(), LAYOUT) is None


def test_empty_hidden_passes_only_where_the_server_measures_it() -> None:
    empty = dataclasses.replace(good(), routing_statistics=stats(mean_hidden=torch.ones(2, 0)))
    assert result_problem(GLOBAL, empty, LAYOUT, allow_empty_hidden=True) is None
    assert result_problem(GLOBAL, good(), LAYOUT, allow_empty_hidden=True) is None
    server = ServerState(build_strategy("fedalign", {}, LAYOUT), GLOBAL)
    assert "expected (2, 2)" in server.screen([empty]).rejected[0]


def test_check_results_refuses_non_finite_and_extra_keys() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        check_results(GLOBAL, [with_parameter("head.weight", torch.tensor([1.0, float("nan")]))])
    with pytest.raises(ValueError, match="unexpected parameter"):
        check_results(GLOBAL, [with_parameter("x", torch.zeros(1))])


def test_screen_rejects_and_the_rest_aggregate() -> None:
    server = ServerState(build_strategy("fedavg", {}, LAYOUT), GLOBAL)
    bad = with_parameter("head.weight", torch.tensor([1.0, float("nan")]))
    bad.client_id = 1
    screening = server.screen([good(0, 1.0), bad, good(2, 3.0), good(2, 5.0)])
    assert [r.client_id for r in screening.accepted] == [0, 2]
    assert set(screening.rejected) == {1, 2}
    assert "non-finite" in screening.rejected[1]
    outcome = server.aggregate(1, screening.accepted)
    assert torch.allclose(outcome.parameters["head.weight"], torch.full((2,), 2.0))


def test_needed_statistics_must_be_there() -> None:
    server = ServerState(build_strategy("fedalign", {}, LAYOUT), GLOBAL)
    screening = server.screen([dataclasses.replace(good(), routing_statistics={})])
    assert screening.rejected == {0: "no routing statistics for MoE layer 'moe'"}


def test_clip_update_scales_to_the_norm() -> None:
    result = good(0, 1.0)  # update norm sqrt(16)
    clipped, norm = clip_update(GLOBAL, result, 2.0)
    assert norm == pytest.approx(4.0)
    total = sum(float((t**2).sum()) for t in clipped.parameters.values()) ** 0.5
    assert total == pytest.approx(2.0, rel=1e-6)
    same, _ = clip_update(GLOBAL, result, 10.0)
    assert same is result
    server = ServerState(build_strategy("fedavg", {}, LAYOUT), GLOBAL, clip_update_norm=2.0)
    screening = server.screen([good(0, 1.0), good(1, 0.1)])
    assert list(screening.clipped) == [0]


def corrupting(clients: set[int]) -> Any:
    """A run_client_round that returns NaN parameters for ``clients``."""
    original = simulator.run_client_round

    def run(*args: Any, **kwargs: Any) -> Any:
        done = original(*args, **kwargs)
        if args[4] in clients:
            name = next(iter(done.result.parameters))
            done.result.parameters[name] = torch.full_like(
                done.result.parameters[name], float("nan")
            )
        return done

    return run


@pytest.mark.slow
def test_simulator_records_rejections_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(simulator, "run_client_round", corrupting({1}))
    sim = Simulation(
        tiny_config(federated__rounds=1, strategy__name="fedavg"), tmp_path / "r", log=None
    )
    line = sim.run_round(1)
    assert list(line["rejected_clients"]) == ["1"]
    assert "non-finite" in line["rejected_clients"]["1"]
    assert line["failed_clients"] == []
    assert all(torch.isfinite(t).all() for t in sim.global_parameters.values())
    decision = read_jsonl(tmp_path / "r" / "decisions.jsonl")[0]
    assert decision["clients"] == [0, 2]


def test_simulator_stops_when_no_valid_result_remains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(simulator, "run_client_round", corrupting({0, 1, 2}))
    sim = Simulation(
        tiny_config(federated__rounds=1, strategy__name="fedavg"), tmp_path / "r", log=None
    )
    with pytest.raises(FederationError, match=r"round 1: 0 valid client result\(s\) of 3"):
        sim.run_round(1)


def test_clipping_bounds_the_fedavg_step(tmp_path: Path) -> None:
    config = tiny_config(
        federated__rounds=1, strategy__name="fedavg", federated__clip_update_norm=1e-3
    )
    sim = Simulation(config, tmp_path / "r", log=None)
    before = {k: v.clone() for k, v in sim.global_parameters.items()}
    line = sim.run_round(1)
    assert set(line["clipped_clients"]) == {"0", "1", "2"}
    step = sum(
        float(((sim.global_parameters[k].float() - v.float()) ** 2).sum())
        for k, v in before.items()
    )
    assert step**0.5 <= 1e-3 * (1 + 1e-4)
