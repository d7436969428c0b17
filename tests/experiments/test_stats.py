"""The evaluation statistics, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from fedalign.experiments.stats import (
    CensoredRounds,
    censored_rounds,
    mean_std,
    paired_difference,
    rounds_to_target,
    t_quantile_975,
)


def _rows(*accuracies: float | None) -> list[dict[str, object]]:
    return [
        {"round": r, **({} if a is None else {"global_accuracy": a})}
        for r, a in enumerate(accuracies, start=1)
    ]


def test_mean_std() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([None, float("nan")]) == (None, None)
    # (2 + 4 + None + 6) / 3 = 4; ((-2)^2 + 0 + 2^2) / 2 = 4 -> std 2
    assert mean_std([2.0, 4.0, None, 6.0]) == (4.0, 2.0)


def test_rounds_to_target_is_where_accuracy_stays_above() -> None:
    # reached at round 2, lost at round 3, from round 4 on it stays: 4
    assert rounds_to_target(_rows(0.5, 0.7, 0.6, 0.8, 0.9), 0.7) == 4
    assert rounds_to_target(_rows(0.7), 0.7) == 1  # at the target counts
    assert rounds_to_target(_rows(0.8, 0.6), 0.7) is None  # reached, then lost: censored
    assert rounds_to_target(_rows(0.1, 0.2), 0.7) is None
    assert rounds_to_target([], 0.7) is None
    # rounds without an evaluation are skipped, not read as a drop
    assert rounds_to_target(_rows(0.4, 0.75, None, 0.8), 0.7) == 2
    # row order does not matter
    assert rounds_to_target(list(reversed(_rows(0.5, 0.7, 0.6, 0.8))), 0.7) == 4
    assert rounds_to_target(_rows(0.1, 0.9), 0.5, key="other") is None


def test_censored_rounds_keeps_the_seeds_that_never_got_there() -> None:
    summary = censored_rounds([3, None, 5, None], [10, 10, 10, 8])
    # reached: 3 and 5 -> mean 4, std sqrt(((3-4)^2 + (5-4)^2) / 1) = sqrt(2)
    assert summary == CensoredRounds(2, 4, 4.0, math.sqrt(2.0), 8)
    assert summary.censored == 2
    assert censored_rounds([None, None], [25, 25]) == CensoredRounds(0, 2, None, None, 25)
    assert censored_rounds([7], [25]) == CensoredRounds(1, 1, 7.0, 0.0, None)
    assert censored_rounds([None]).horizon is None  # horizon unknown


def test_paired_difference_three_seeds() -> None:
    # seed 3 has no partner; differences by seed: 1, 3, 2 -> mean 2, std 1
    paired = paired_difference({0: 1.0, 1: 3.0, 2: 2.0}, {0: 0.0, 1: 0.0, 2: 0.0, 3: 5.0})
    assert paired.differences == (1.0, 3.0, 2.0)
    assert paired.pairs == 3 and paired.wins == 3
    assert paired.mean == 2.0
    # half width t_{0.975, 2} * 1 / sqrt(3) = 4.302652729749464 / 1.7320508075688772 = 2.4841377117
    assert paired.low == pytest.approx(2.0 - 2.484137711750331, abs=1e-12)
    assert paired.high == pytest.approx(2.0 + 2.484137711750331, abs=1e-12)


def test_paired_difference_two_seeds_ties_and_one_seed() -> None:
    # differences -0.25 and +0.25: mean 0, std sqrt(0.125), half width 12.7062... * 0.25
    paired = paired_difference({0: 0.25, 1: 0.75}, {0: 0.5, 1: 0.5})
    assert paired.differences == (-0.25, 0.25)
    assert paired.mean == 0.0 and paired.wins == 1
    assert paired.low == pytest.approx(-3.1765511840436745, abs=1e-12)
    assert paired.high == pytest.approx(3.1765511840436745, abs=1e-12)
    tie = paired_difference({0: 0.5, 1: 0.5}, {0: 0.5, 1: 0.5})
    assert tie.wins == 0 and tie.mean == 0.0 and tie.low == 0.0 and tie.high == 0.0
    single = paired_difference({4: 0.75}, {4: 0.5})
    assert single.differences == (0.25,) and single.mean == 0.25 and single.wins == 1
    assert single.low is None and single.high is None  # n < 2: no interval
    empty = paired_difference({0: None}, {0: 0.5})
    assert empty.pairs == 0 and empty.mean is None and empty.low is None


def test_t_quantile() -> None:
    assert t_quantile_975(1) == 12.706204736174698
    assert t_quantile_975(4) == 2.7764451051977934
    assert t_quantile_975(30) == 2.0422724563012373
    # beyond the table: the expansion, against the exact quantiles
    assert t_quantile_975(60) == pytest.approx(2.0002978220142604, abs=1e-8)
    assert t_quantile_975(120) == pytest.approx(1.979930405082441, abs=1e-9)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)
