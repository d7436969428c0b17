"""Norm screening on by default: updates above a multiple of the round's median norm are
clipped to that bound, for both transports, and recorded."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from fedalign.config import ConfigError, FederatedConfig
from fedalign.experiments import run_experiment
from fedalign.federation import ServerState
from fedalign.protocol import ClientResult
from fedalign.records import read_jsonl
from fedalign.strategies import FedAvg, build_strategy
from fedalign.strategies.screening import norm_bound, update_norm
from tests.helpers import tiny_config
from tests.reliability.test_aggregation_properties import LAYOUT, SHAPES
from tests.reliability.test_bad_updates import stats

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GLOBAL = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
ROOT = math.sqrt(sum(math.prod(shape) for shape in SHAPES.values()))
"""The update norm of a result whose every value is 1."""


def moved(client_id: int, value: float, examples: int = 5) -> ClientResult:
    """A result whose update is ``value`` everywhere (norm ``|value| * ROOT``)."""
    parameters = {name: torch.full(shape, value) for name, shape in SHAPES.items()}
    return ClientResult(client_id, examples, parameters, stats())


def server(**options: float) -> ServerState:
    return ServerState(build_strategy("fedavg", {}, LAYOUT), GLOBAL, **options)


def test_the_bound_is_a_multiple_of_the_lower_median_and_the_smaller_of_two() -> None:
    assert norm_bound([1.0, 2.0, 3.0, 100.0], 5.0, 0.0) == (2.0, 10.0)
    # two clients: the outlier is measured against the other one
    assert norm_bound([1000.0, 1.0], 5.0, 0.0) == (1.0, 5.0)
    assert norm_bound([1.0, 2.0, 3.0], 5.0, 4.0) == (2.0, 4.0)
    assert norm_bound([1.0, 2.0, 3.0], 0.0, 4.0) == (None, 4.0)
    assert norm_bound([1.0, 2.0, 3.0], 0.0, 0.0) == (None, None)
    assert norm_bound([], 5.0, 0.0) == (None, None)
    # half the clients did not move: no scale to compare with, only the absolute bound
    assert norm_bound([0.0, 0.0, 3.0], 5.0, 0.0) == (None, None)
    assert norm_bound([0.0, 0.0, 3.0], 5.0, 2.0) == (None, 2.0)


def test_default_screening_clips_a_boosted_update_and_keeps_honest_ones() -> None:
    assert FederatedConfig().screen_norm_multiple == 5.0
    honest = [moved(0, 1.0), moved(1, 1.5), moved(2, 0.5)]
    boosted = moved(3, 1000.0)
    screening = server().screen([*honest, boosted])
    assert screening.accepted[:3] == honest  # within the bound: the same objects
    assert all(a is b for a, b in zip(screening.accepted, honest, strict=False))
    assert screening.median_norm == pytest.approx(1.0 * ROOT)
    assert screening.bound == pytest.approx(5.0 * ROOT)
    assert list(screening.clipped) == [3]
    assert screening.clipped[3] == pytest.approx(1000.0 * ROOT)
    clipped = screening.accepted[3]
    assert update_norm(GLOBAL, clipped.parameters) == pytest.approx(5.0 * ROOT, rel=1e-6)
    # the direction is kept: every value 5 (= 1000 * 5 / 1000)
    assert torch.allclose(clipped.parameters["head.weight"], torch.full((2,), 5.0))
    record = screening.record()
    assert record is not None
    assert record["clipped"] == {"3": pytest.approx(1000.0 * ROOT)}
    assert record["bound"] == pytest.approx(5.0 * ROOT) and record["norm_multiple"] == 5.0
    assert set(record["update_norms"]) == {"0", "1", "2", "3"} and record["rejected"] == {}


def test_two_clients_an_outlier_is_clipped_to_a_multiple_of_the_other() -> None:
    screening = server().screen([moved(0, 1.0), moved(1, -1000.0)])
    assert list(screening.clipped) == [1]
    assert update_norm(GLOBAL, screening.accepted[1].parameters) == pytest.approx(5.0 * ROOT)


def test_a_sign_flip_keeps_its_norm_and_passes() -> None:
    """What norm screening cannot see: a reversed update has an honest norm."""
    screening = server().screen([moved(0, 1.0), moved(1, 1.2), moved(2, -1.1)])
    assert screening.clipped == {} and len(screening.accepted) == 3


def test_off_and_absolute_clipping_compose() -> None:
    results = [moved(0, 1.0), moved(1, 1.0), moved(2, 4.0)]
    off = server(screen_norm_multiple=0.0).screen(results)
    assert off.clipped == {} and off.record() is None and off.norms == {}
    # relative bound 5 * ROOT, absolute 2 * ROOT: the smaller clips client 2
    both = server(clip_update_norm=2.0 * ROOT).screen(results)
    assert both.bound == pytest.approx(2.0 * ROOT) and list(both.clipped) == [2]
    # a rejected result is left out of the median and recorded
    bad = dataclasses.replace(moved(3, 1.0), num_examples=-1)
    mixed = server().screen([*results, bad])
    assert set(mixed.norms) == {0, 1, 2} and set(mixed.rejected) == {3}
    record = mixed.record()
    assert record is not None and "negative" in record["rejected"]["3"]


def test_updates_are_measured_from_the_personalised_start() -> None:
    class Personal(FedAvg):
        def configure_train(self, server_round, selected, state):  # type: ignore[no-untyped-def]
            instructions = super().configure_train(server_round, selected, state)
            instructions[1].start_parameters = {"head.weight": torch.full((2,), 50.0)}
            return instructions

    state = ServerState(Personal(LAYOUT), GLOBAL)
    state.instructions(1, [0, 1, 2])
    near_start = moved(1, 1.0)
    near_start.parameters["head.weight"] = torch.full((2,), 51.0)
    screening = state.screen([moved(0, 1.0), near_start, moved(2, 1.0)])
    assert screening.clipped == {}  # 50 from the global values, 1 from its start
    assert screening.norms[1] == pytest.approx(ROOT)


def test_the_decisions_record_holds_the_screening() -> None:
    state = server()
    screening = state.screen([moved(0, 1.0), moved(1, 1.0), moved(2, 100.0)])
    outcome = state.aggregate(1, screening.accepted, screening)
    assert outcome.record["screening"]["clipped"] == {"2": pytest.approx(100.0 * ROOT)}
    assert "screening" not in state.aggregate(1, screening.accepted).record


@pytest.mark.parametrize("value", [-1.0, 0.5, float("inf"), float("nan")])
def test_a_bad_multiple_names_the_key(value: float) -> None:
    with pytest.raises(ConfigError, match=r"federated.screen-norm-multiple must be 0 \(off\)"):
        tiny_config(federated__screen_norm_multiple=value).validate()


@pytest.mark.parametrize("value", [0.0, 1.0, 3.0])
def test_good_multiples_validate(value: float) -> None:
    tiny_config(federated__screen_norm_multiple=value).validate()


@pytest.mark.slow
def test_the_simulator_clips_a_boosted_client_by_default(tmp_path: Path) -> None:
    config = tiny_config(
        strategy__name="fedavg",
        federated__rounds=1,
        federated__attack="scale",
        federated__attack_clients="1",
    )
    run_experiment(config, tmp_path / "r", log=None)
    line = read_jsonl(tmp_path / "r" / "metrics.jsonl")[0]
    assert list(line["clipped_clients"]) == ["1"]
    record = read_jsonl(tmp_path / "r" / "decisions.jsonl")[0]["screening"]
    norms = record["update_norms"]
    # three norms: the middle one, the larger honest one
    assert record["median_norm"] == pytest.approx(max(norms["0"], norms["2"]))
    assert record["bound"] == pytest.approx(5.0 * record["median_norm"])
    assert norms["1"] > 100 * record["bound"] and list(record["clipped"]) == ["1"]
