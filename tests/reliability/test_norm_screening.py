"""Norm screening on by default: an update above a multiple of the round's median norm is
scaled down to an honest size, for both transports, and recorded."""

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
from fedalign.strategies.screening import norm_targets, update_norm
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


def plan(norms: list[float], multiple: float, max_norm: float) -> tuple[object, ...]:
    targets = norm_targets(dict(enumerate(norms)), multiple, max_norm)
    return targets.median, targets.outlier_bound, targets.targets


def test_outliers_go_to_the_lower_median_and_the_absolute_bound_applies_on_top() -> None:
    assert plan([1.0, 2.0, 3.0, 100.0], 5.0, 0.0) == (2.0, 10.0, {3: 2.0})
    # two clients: the outlier is measured against the other one
    assert plan([1000.0, 1.0], 5.0, 0.0) == (1.0, 5.0, {0: 1.0})
    assert plan([1.0, 2.0, 3.0, 100.0], 5.0, 2.5) == (2.0, 10.0, {2: 2.5, 3: 2.0})
    assert plan([1.0, 2.0, 3.0, 100.0], 5.0, 1.5) == (2.0, 10.0, {1: 1.5, 2: 1.5, 3: 1.5})
    assert plan([1.0, 2.0, 3.0], 0.0, 2.5) == (None, None, {2: 2.5})
    assert plan([1.0, 2.0, 3.0], 0.0, 0.0) == (None, None, {})
    assert plan([], 5.0, 0.0) == (None, None, {})
    # just inside the bound: untouched (no client is moved below the bound it met)
    assert plan([1.0, 1.0, 5.0], 5.0, 0.0) == (1.0, 5.0, {})
    # half the clients did not move: no scale to compare with, only the absolute bound
    assert plan([0.0, 0.0, 3.0], 5.0, 0.0) == (None, None, {})
    assert plan([0.0, 0.0, 3.0], 5.0, 2.0) == (None, None, {2: 2.0})


def test_an_outlier_takes_the_norm_of_the_client_nearest_in_examples() -> None:
    norms = {0: 1.0, 1: 3.0, 2: 2.0, 3: 1000.0}
    sized = norm_targets(norms, 5.0, 0.0, {0: 10, 1: 100, 2: 50, 3: 95})
    assert (sized.median, sized.outlier_bound, sized.targets) == (2.0, 10.0, {3: 3.0})
    # a tie between clients 0 (10 examples) and 2 (50): the lower median of their norms
    tied = norm_targets(norms, 5.0, 0.0, {0: 10, 1: 100, 2: 50, 3: 30})
    assert tied.targets == {3: 1.0}
    # another outlier is never the reference; the absolute bound still applies on top
    two = norm_targets({**norms, 4: 500.0}, 5.0, 2.5, {0: 10, 1: 100, 2: 50, 3: 95, 4: 96})
    assert two.targets == {1: 2.5, 3: 2.5, 4: 2.5}
    assert norm_targets(
        {**norms, 4: 500.0}, 5.0, 0.0, {0: 10, 1: 100, 2: 50, 3: 95, 4: 96}
    ).targets == {
        3: 3.0,
        4: 3.0,
    }


def test_default_screening_scales_a_boosted_update_to_the_median() -> None:
    assert FederatedConfig().screen_norm_multiple == 5.0
    honest = [moved(0, 1.0), moved(1, 1.5), moved(2, 0.5)]
    boosted = moved(3, 1000.0)
    screening = server().screen([*honest, boosted])
    assert all(a is b for a, b in zip(screening.accepted, honest, strict=False))  # the same
    assert screening.median_norm == pytest.approx(1.0 * ROOT)
    assert screening.outlier_bound == pytest.approx(5.0 * ROOT)
    assert list(screening.clipped) == [3]
    assert screening.clipped[3] == pytest.approx(1000.0 * ROOT)
    clipped = screening.accepted[3]
    assert update_norm(GLOBAL, clipped.parameters) == pytest.approx(ROOT, rel=1e-6)
    # the direction is kept: every value 1 (= 1000 * median / norm)
    assert torch.allclose(clipped.parameters["head.weight"], torch.full((2,), 1.0))
    record = screening.record()
    assert record is not None
    assert record["clipped"] == {"3": pytest.approx(1000.0 * ROOT)}
    assert record["clipped_to"] == {"3": pytest.approx(ROOT)}
    assert record["outlier_bound"] == pytest.approx(5.0 * ROOT)
    assert record["norm_multiple"] == 5.0 and record["max_norm"] is None
    assert set(record["update_norms"]) == {"0", "1", "2", "3"} and record["rejected"] == {}


def test_two_clients_an_outlier_is_scaled_to_the_other() -> None:
    screening = server().screen([moved(0, 1.0), moved(1, -1000.0)])
    assert list(screening.clipped) == [1]
    assert update_norm(GLOBAL, screening.accepted[1].parameters) == pytest.approx(ROOT)


def test_a_sign_flip_keeps_its_norm_and_passes() -> None:
    """What norm screening cannot see: a reversed update has an honest norm."""
    screening = server().screen([moved(0, 1.0), moved(1, 1.2), moved(2, -1.1)])
    assert screening.clipped == {} and len(screening.accepted) == 3


def test_off_and_absolute_clipping_compose() -> None:
    results = [moved(0, 1.0), moved(1, 1.0), moved(2, 4.0)]
    off = server(screen_norm_multiple=0.0).screen(results)
    assert off.clipped == {} and off.record() is None and off.norms == {}
    # 4 is within 5 x the median; the absolute bound 2 * ROOT clips it
    both = server(clip_update_norm=2.0 * ROOT).screen(results)
    assert list(both.clipped) == [2] and both.clipped_to[2] == pytest.approx(2.0 * ROOT)
    record = both.record()
    assert record is not None and record["max_norm"] == pytest.approx(2.0 * ROOT)
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
    assert record["outlier_bound"] == pytest.approx(5.0 * record["median_norm"])
    assert norms["1"] > 100 * record["outlier_bound"] and list(record["clipped"]) == ["1"]
    # scaled to the norm of the honest client nearest to it in training examples
    examples = read_jsonl(tmp_path / "r" / "decisions.jsonl")[0]["num_examples"]
    distance = {c: abs(examples[c] - examples["1"]) for c in ("0", "2")}
    nearest = [c for c in ("0", "2") if distance[c] == min(distance.values())]
    assert record["clipped_to"]["1"] == pytest.approx(min(norms[c] for c in nearest))
