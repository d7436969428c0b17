"""Choosing a ``[suite.tune]`` row's value on validation accuracy, never on test accuracy.

The evaluation rules (docs/method.md) forbid model selection on the test set: a baseline's
knob (FedProx ``mu``, a per-form ``routing-lambda``) is chosen, per alpha, as the candidate
with the best mean ``final_validation_accuracy`` (``summary.json``; the server's
validation set held out of the training pool, ``data.validation-examples``) over the
seeds on which every candidate finished (paired), ties to the first listed. Only the
chosen candidate's runs reach the results table, under the row's own label; the other
candidates' test accuracy is never read.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedalign.experiments.benchmark.plan import PlannedRun
from fedalign.experiments.benchmark.results import FinishedRun
from fedalign.experiments.benchmark.suite import Suite
from fedalign.experiments.tables import number


@dataclass
class TuneChoice:
    """The choice of one tuned row at one alpha.

    Parameters
    ----------
    label : str
        The row's run label.
    alpha : float
    key : str
        The tuned ``section.key``.
    values : list
        Candidates, in the suite's order.
    validation_means : list of float or None
        Mean final validation accuracy of each candidate over ``seeds`` (None: none).
    seeds : list of int
        Seeds on which every candidate finished (the means are paired over them).
    chosen : int or None
        Index of the chosen candidate (None: no seed finished for every candidate).
    planned_seeds : list of int
        The suite's seeds: the choice is ``complete`` once it is made over all of them.
    """

    label: str
    alpha: float
    key: str
    values: list[Any]
    validation_means: list[float | None]
    seeds: list[int]
    chosen: int | None
    planned_seeds: list[int] = dataclasses.field(default_factory=list)

    @property
    def chosen_value(self) -> Any:
        return None if self.chosen is None else self.values[self.chosen]

    @property
    def complete(self) -> bool:
        """Whether every candidate finished on every planned seed (a choice made while the
        tuning suite still runs may change; ``[suite.chosen]`` refuses it)."""
        return self.chosen is not None and set(self.planned_seeds) <= set(self.seeds)

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "chosen_value": self.chosen_value,
            "complete": self.complete,
        }


def best_index(means: Sequence[float | None]) -> int | None:
    """Index of the largest mean (the first of equal ones); None/NaN never win.

    Returns None when every mean is missing.
    """
    best: int | None = None
    for index, mean in enumerate(means):
        if mean is None or math.isnan(mean):
            continue
        if best is None or mean > means[best]:  # type: ignore[operator]
            best = index
    return best


def _validation(f: FinishedRun) -> float | None:
    value = number(f.summary.get("final_validation_accuracy"))
    return None if value is None or math.isnan(value) else value


def choose(
    label: str,
    alpha: float,
    key: str,
    values: Sequence[Any],
    runs: Sequence[FinishedRun],
    planned_seeds: Sequence[int] = (),
) -> TuneChoice:
    """The :class:`TuneChoice` of one row at one alpha from its finished candidate runs."""
    by_value: list[dict[int, float | None]] = [
        {f.run.seed: _validation(f) for f in runs if f.run.value == value} for value in values
    ]
    seeds = sorted(set.intersection(*(set(s) for s in by_value))) if by_value else []
    means: list[float | None] = []
    for scores in by_value:
        kept = [value for s in seeds if (value := scores[s]) is not None]
        means.append(statistics.mean(kept) if kept and len(kept) == len(seeds) else None)
    return TuneChoice(
        label, alpha, key, list(values), means, seeds, best_index(means), list(planned_seeds)
    )


def select_tuned(
    suite: Suite, finished: Sequence[FinishedRun]
) -> tuple[list[FinishedRun], list[TuneChoice]]:
    """Replace every tuned row's candidate runs by the chosen candidate's, relabelled.

    Returns
    -------
    (list of FinishedRun, list of TuneChoice)
        The untuned runs and the chosen candidates' runs (``run.label`` = the row's label),
        in their original order; one choice per tuned row and alpha.
    """
    choices: dict[tuple[str, float], TuneChoice] = {}
    for label, tune in suite.tune.items():
        if label not in suite.strategy_labels:
            continue  # left out by --strategies
        for alpha in suite.alphas:
            candidates = [f for f in finished if f.run.row == label and f.run.alpha == alpha]
            choices[(label, alpha)] = choose(
                label, alpha, tune.key, tune.values, candidates, suite.seeds
            )
    kept = []
    for f in finished:
        if f.run.row is None:
            kept.append(f)
            continue
        choice = choices.get((f.run.row, f.run.alpha))
        if choice is None or choice.chosen is None or f.run.value != choice.chosen_value:
            continue
        if f.run.seed not in choice.seeds:
            continue  # a seed another candidate has not finished: not chosen on it
        kept.append(dataclasses.replace(f, run=dataclasses.replace(f.run, label=f.run.row)))
    return kept, list(choices.values())


def tuning_markdown(suite: Suite, choices: Sequence[TuneChoice]) -> str:
    """The results page's table: per tuned row and alpha, every candidate's mean final
    validation accuracy and the chosen value (empty when nothing is tuned)."""
    if not choices:
        return ""
    lines = [
        "| row | alpha | key | validation accuracy by value (mean over seeds) | chosen |",
        "|---|---|---|---|---|",
    ]
    for c in choices:
        cells = ", ".join(
            f"{value!r}: " + ("–" if mean is None else f"{mean:.4f}")
            for value, mean in zip(c.values, c.validation_means, strict=True)
        )
        chosen = (
            "none (no seed finished for every value)" if c.chosen is None else repr(c.chosen_value)
        )
        if c.chosen is not None and not c.complete:
            chosen += f" (provisional: {len(c.seeds)} of {len(c.planned_seeds)} seeds)"
        lines.append(
            f"| {suite.display(c.label)} | {c.alpha:g} | `{c.key}` | {cells} "
            f"(seeds {c.seeds}) | {chosen} |"
        )
    return "\n".join(lines)


def chosen_markdown(suite: Suite, runs: Sequence[PlannedRun]) -> str:
    """The results page's table of ``[suite.chosen]`` values, as the planned runs carry them
    (empty when there are none)."""
    if not suite.chosen:
        return ""
    lines = [
        "| row | alpha | key | value | chosen on validation in (row) |",
        "|---|---|---|---|---|",
    ]
    for label, chosen in suite.chosen.items():
        section, _, name = chosen.key.partition(".")
        for alpha in suite.alphas:
            run = next((r for r in runs if r.label == label and r.alpha == alpha), None)
            if run is None:
                continue  # left out by --strategies
            value = getattr(getattr(run.config, section.replace("-", "_")), name.replace("-", "_"))
            source = f", `{chosen.tuned_key}`" if chosen.tuned_key != chosen.key else ""
            lines.append(
                f"| {suite.display(label)} | {alpha:g} | `{chosen.key}` | {value!r} | "
                f"`{chosen.results}` ({chosen.row}{source}) |"
            )
    return "\n".join(lines)
