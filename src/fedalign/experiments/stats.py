"""Statistics of the evaluation rules (docs/docs/method.md, "Evaluation rules"): pure functions.

* :func:`mean_std`: unpaired mean and sample standard deviation over seeds;
* :func:`rounds_to_target`: the first round after which accuracy *stays* at or above a
  target; :func:`censored_rounds` summarises it over seeds without dropping the seeds that
  never got there (they are *censored* at the last round);
* :func:`paired_difference`: per-seed differences to a reference strategy on the same
  (alpha, seed), with their mean, a 95% Student-t interval and the wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30.
T_975 = (
    12.706204736174698,
    4.302652729749464,
    3.182446305284263,
    2.7764451051977934,
    2.570581835636314,
    2.4469118511449692,
    2.3646242515927844,
    2.306004135204168,
    2.2621571627982053,
    2.2281388519649385,
    2.200985160082949,
    2.1788128296634177,
    2.1603686564610127,
    2.1447866879169273,
    2.131449545559323,
    2.1199052992210112,
    2.1098155778331806,
    2.10092204024096,
    2.093024054408263,
    2.0859634472658364,
    2.079613844727662,
    2.0738730679040147,
    2.0686576104190406,
    2.0638985616280205,
    2.0595385527532946,
    2.055529438642871,
    2.0518305164802833,
    2.048407141795244,
    2.045229642132703,
    2.0422724563012373,
)
Z_975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom.

    Exact (tabulated) for ``df <= 30``; above, the Cornish-Fisher expansion in ``1/df``
    (Abramowitz and Stegun 26.7.5, error below 1e-6).

    Raises
    ------
    ValueError
        When ``df < 1``.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1 (got {df})")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def finite(values: Sequence[float | None]) -> list[float]:
    """The values that are numbers and finite, as floats."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) of the finite values.

    Returns ``(None, None)`` when no value is finite.
    """
    kept = finite(values)
    if not kept:
        return None, None
    mean = sum(kept) / len(kept)
    if len(kept) == 1:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)
    return mean, math.sqrt(variance)


def rounds_to_target(
    rows: Sequence[Mapping[str, object]], target: float, key: str = "global_accuracy"
) -> int | None:
    """The first round after which ``key`` stays ``>= target`` on every later evaluated round.

    Rows without a numeric ``key`` (rounds not evaluated) are skipped. Returns None when the
    last evaluated round is below the target (never reached, or reached and lost again).
    """
    evaluated = [
        (int(row["round"]), float(value))  # type: ignore[call-overload]
        for row in rows
        if isinstance(value := row.get(key), int | float) and not isinstance(value, bool)
    ]
    first: int | None = None
    for round_number, accuracy in sorted(evaluated):
        below = accuracy < target - 1e-12
        if below or first is None:
            first = None if below else round_number
    return first


@dataclass(frozen=True)
class CensoredRounds:
    """Rounds to a target over seeds, with the seeds that never reached it kept.

    ``mean`` and ``std`` are over the ``reached`` seeds only; the other ``censored`` seeds
    are known to need more than ``horizon`` rounds (the rounds they ran).
    """

    reached: int
    seeds: int
    mean: float | None
    std: float | None
    horizon: int | None

    @property
    def censored(self) -> int:
        return self.seeds - self.reached


def censored_rounds(
    rounds: Sequence[int | None], horizons: Sequence[int | None] = ()
) -> CensoredRounds:
    """Summarise per-seed rounds to target; None marks a seed censored at its horizon.

    Parameters
    ----------
    rounds : sequence of int or None
        Per seed, :func:`rounds_to_target` (None: not reached within the run).
    horizons : sequence of int or None
        Per seed, the rounds the run had; the summary's horizon is the smallest over the
        censored seeds (None when none is censored or none is known).
    """
    reached = [float(r) for r in rounds if r is not None]
    mean, std = mean_std(reached)
    censored_horizons = [
        int(h) for r, h in zip(rounds, horizons) if r is None and isinstance(h, int)
    ]
    horizon = min(censored_horizons) if censored_horizons else None
    return CensoredRounds(len(reached), len(rounds), mean, std, horizon)


@dataclass(frozen=True)
class PairedComparison:
    """Per-seed differences ``strategy - reference`` of one metric on the same seeds.

    ``low`` and ``high`` bound the 95% Student-t interval of the mean difference (None with
    fewer than two pairs); ``wins`` counts the pairs with a positive difference.
    """

    differences: tuple[float, ...]
    mean: float | None
    low: float | None
    high: float | None
    wins: int

    @property
    def pairs(self) -> int:
        return len(self.differences)


def paired_difference(
    values: Mapping[int, float | None], reference: Mapping[int, float | None]
) -> PairedComparison:
    """Pair ``values`` with ``reference`` by seed (keys) and summarise the differences.

    Seeds present in only one of the two, or with a non-finite value, are not paired.
    """
    differences = tuple(
        float(values[seed]) - float(reference[seed])  # type: ignore[arg-type]
        for seed in sorted(values)
        if seed in reference and len(finite([values[seed], reference[seed]])) == 2
    )
    wins = sum(1 for d in differences if d > 0)
    mean, std = mean_std(list(differences))
    if mean is None or std is None or len(differences) < 2:
        return PairedComparison(differences, mean, None, None, wins)
    half = t_quantile_975(len(differences) - 1) * std / math.sqrt(len(differences))
    return PairedComparison(differences, mean, mean - half, mean + half, wins)
