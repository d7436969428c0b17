"""Finished runs of a grid turned into tables: one row per run, one per (strategy, alpha).

Per (strategy, alpha), over seeds: the final-round global accuracy (mean ± sample std,
unpaired) and its paired difference to the reference strategy on the same seeds (mean, 95%
Student-t interval, wins); the per-client figure (10th percentile of local accuracy, or
the worst client for runs that predate it); the rounds after which global accuracy stays at
or above the target, with the seeds that never got there counted as censored.

Target accuracy, per alpha: ``target_fraction`` x the reference's mean final accuracy.

Every run row names the machine it ran on (``provenance.json``, :mod:`.machines`); every
aggregated row its machines and whether its paired comparison mixes machines.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedalign.experiments.benchmark.machines import MIXED_MARK, row_machines
from fedalign.experiments.benchmark.plan import PlannedRun, run_status
from fedalign.experiments.benchmark.suite import Suite
from fedalign.experiments.stats import (
    CensoredRounds,
    censored_rounds,
    mean_std,
    paired_difference,
    rounds_to_target,
)
from fedalign.experiments.tables import (
    CLIENT_HEADERS,
    P10,
    WORST,
    censored_cell,
    client_value,
    number,
    paired_cell,
    pm,
    wins_cell,
)
from fedalign.records import read_jsonl, read_provenance, recorded_machine

AVERAGED = ("final_accuracy", P10, WORST, "mean_local_accuracy")
"""Per-run metrics reported as mean ± std over seeds."""


@dataclass
class FinishedRun:
    """The records of one finished run folder (``provenance``: None for a run recorded
    before provenance)."""

    run: PlannedRun
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    provenance: dict[str, Any] | None = None

    @property
    def last(self) -> dict[str, Any]:
        """The last metrics line (empty when there is none)."""
        return self.metrics[-1] if self.metrics else {}


def load_finished(runs: Sequence[PlannedRun]) -> list[FinishedRun]:
    """The planned runs whose folders are finished with the planned configuration."""
    finished = []
    for run in runs:
        if run_status(run) != "finished":
            continue
        summary = json.loads((run.folder / "summary.json").read_text())
        metrics = read_jsonl(run.folder / "metrics.jsonl")
        finished.append(FinishedRun(run, summary, metrics, read_provenance(run.folder)))
    return finished


def target_accuracies(finished: Sequence[FinishedRun], suite: Suite) -> dict[float, float | None]:
    """Per alpha: ``target_fraction`` x the reference strategy's mean final accuracy."""
    reference = suite.reference_label
    targets: dict[float, float | None] = {}
    for alpha in suite.alphas:
        mean, _ = mean_std(
            [
                number(f.summary.get("final_accuracy"))
                for f in finished
                if f.run.alpha == alpha and f.run.label == reference
            ]
        )
        targets[alpha] = None if mean is None else suite.target_fraction * mean
    return targets


def median_round_seconds(finished: FinishedRun) -> float | None:
    """Median wall seconds of a run's rounds (robust to a slow first round on a busy machine).

    Falls back to the summary's mean when ``metrics.jsonl`` has no ``seconds``.
    """
    seconds = [number(row.get("seconds")) for row in finished.metrics]
    kept = [s for s in seconds if s is not None]
    if not kept:
        return number(finished.summary.get("seconds_per_round"))
    return statistics.median(kept)


def _relative(path: Path, start: Path | None) -> str:
    if start is not None:
        try:
            return path.relative_to(start).as_posix()
        except ValueError:
            pass
    return str(path)


def run_row(f: FinishedRun, target: float | None, out: Path | None) -> dict[str, object]:
    """The ``runs.csv`` row of one finished run (final round; no best-round selection)."""
    rounds = max(int(f.summary.get("rounds", 0)), 1)
    machine, label = recorded_machine(f.provenance)
    return {
        "strategy": f.run.label,
        "alpha": f.run.alpha,
        "seed": f.run.seed,
        "final_accuracy": number(f.summary.get("final_accuracy")),
        "mean_local_accuracy": client_value("mean_local_accuracy", f.summary, f.last),
        P10: client_value(P10, f.summary, f.last),
        WORST: client_value(WORST, f.summary, f.last),
        "local_clients_evaluated": client_value("local_clients_evaluated", f.summary, f.last),
        "target_accuracy": target,
        "rounds_to_target": None if target is None else rounds_to_target(f.metrics, target),
        "rounds": f.summary.get("rounds"),
        "seconds": f.summary.get("seconds"),
        "seconds_per_round": median_round_seconds(f),
        "mib_up_per_round": float(f.summary.get("bytes_received", 0)) / 2**20 / rounds,
        "folder": _relative(f.run.folder, out),
        "machine": machine,
        "machine_label": label,
        "software": (f.provenance or {}).get("software", "unknown"),
    }


def run_rows(
    finished: Sequence[FinishedRun],
    targets: Mapping[float, float | None],
    out: Path | None = None,
) -> list[dict[str, object]]:
    """One row per finished run (``runs.csv``; folders relative to ``out`` when inside it)."""
    return [run_row(f, targets.get(f.run.alpha), out) for f in finished]


def _by_seed(cell: Sequence[Mapping[str, object]], metric: str) -> dict[int, float | None]:
    return {int(r["seed"]): number(r[metric]) for r in cell}  # type: ignore[call-overload]


def _averages(cell: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """``<metric>_mean`` / ``<metric>_std``; p10 only when every seed recorded it."""
    row: dict[str, object] = {}
    for metric in AVERAGED:
        values = [number(r[metric]) for r in cell]
        if metric == P10 and any(v is None for v in values):
            values = []
        row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(values)
    return row


def _paired(
    cell: Sequence[Mapping[str, object]], reference: Sequence[Mapping[str, object]]
) -> dict[str, object]:
    """Final accuracy minus the reference's, paired by seed."""
    paired = paired_difference(
        _by_seed(cell, "final_accuracy"), _by_seed(reference, "final_accuracy")
    )
    return {
        "minus_reference_mean": paired.mean,
        "minus_reference_low": paired.low,
        "minus_reference_high": paired.high,
        "wins": paired.wins,
        "pairs": paired.pairs,
    }


def _rounds(cell: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """Rounds to target over seeds; seeds that never stay above it are censored."""
    horizons = [r["rounds"] if isinstance(r["rounds"], int) else None for r in cell]
    summary = censored_rounds(
        [r["rounds_to_target"] if isinstance(r["rounds_to_target"], int) else None for r in cell],
        horizons,
    )
    return {
        "rounds_to_target_mean": summary.mean,
        "rounds_to_target_std": summary.std,
        "reached": summary.reached,
        "censored": summary.censored,
        "censored_at": summary.horizon,
    }


def aggregate_rows(
    suite: Suite, per_run: Sequence[Mapping[str, object]]
) -> list[dict[str, object]]:
    """One row per (strategy, alpha), numeric (``results.csv``).

    Columns: ``<metric>_mean`` / ``<metric>_std`` over seeds (unpaired);
    ``minus_reference_*``: mean and 95% interval of the per-seed difference of final
    accuracy to the reference, ``wins`` of ``pairs``; rounds to target over the ``reached``
    seeds, with ``censored`` seeds known to need more than ``censored_at`` rounds;
    ``machines`` and ``mixed_machines`` (:func:`~.machines.row_machines`).
    """
    rows: list[dict[str, object]] = []
    reference = suite.reference_label
    for alpha in suite.alphas:
        at_alpha = [r for r in per_run if r["alpha"] == alpha]
        baseline = [r for r in at_alpha if r["strategy"] == reference]
        for label in suite.strategy_labels:
            cell = [r for r in at_alpha if r["strategy"] == label]
            row: dict[str, object] = {
                "strategy": label,
                "name": suite.display(label),
                "alpha": alpha,
                "seeds": len(cell),
                **_averages(cell),
                "reference": reference,
                **_paired(cell, baseline),
                "target_accuracy": cell[0]["target_accuracy"] if cell else None,
                **_rounds(cell),
                "seconds_per_round_mean": mean_std([number(r["seconds_per_round"]) for r in cell])[
                    0
                ],
                "mib_up_per_round_mean": mean_std([number(r["mib_up_per_round"]) for r in cell])[0],
                **row_machines(cell, baseline),
            }
            rows.append(row)
    return rows


def table_client_key(rows: Sequence[Mapping[str, object]]) -> str:
    """p10 when every row with seeds has it, else the worst client (one key per table)."""
    filled = [r for r in rows if r["seeds"]]
    if filled and all(r[f"{P10}_mean"] is not None for r in filled):
        return P10
    return WORST


def _rounds_of(row: Mapping[str, object]) -> CensoredRounds:
    horizon = row["censored_at"] if isinstance(row["censored_at"], int) else None
    return CensoredRounds(
        _count(row["reached"]),
        _count(row["seeds"]),
        number(row["rounds_to_target_mean"]),
        number(row["rounds_to_target_std"]),
        horizon,
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _paired_cells(row: Mapping[str, object]) -> tuple[str, str]:
    """The paired-difference and wins cells (``(reference)`` on the reference's own row)."""
    if row["strategy"] == row["reference"]:
        return "(reference)", "-"
    difference = paired_cell(
        number(row["minus_reference_mean"]),
        number(row["minus_reference_low"]),
        number(row["minus_reference_high"]),
    )
    return difference, wins_cell(_count(row["wins"]), _count(row["pairs"]))


def display_row(row: Mapping[str, object], key: str, reference: str) -> dict[str, object]:
    """One numeric row formatted for Markdown (``mean ± std`` cells; no std of one seed;
    :data:`~.machines.MIXED_MARK` after the name of a row that mixes machines)."""
    spread = _count(row["seeds"]) > 1

    def cell(metric: str) -> str:
        return pm(row[f"{metric}_mean"], row[f"{metric}_std"] if spread else None)

    difference, wins = _paired_cells(row)
    alpha = number(row["alpha"])
    mark = MIXED_MARK if row.get("mixed_machines") else ""
    return {
        "strategy": f"{row['name']}{mark}",
        "alpha": f"{alpha:g}" if alpha is not None else "-",
        "seeds": row["seeds"],
        "final accuracy": cell("final_accuracy"),
        f"paired Δ vs {reference} [95% CI]": difference,
        f"wins vs {reference}": wins,
        CLIENT_HEADERS[key]: cell(key),
        "mean local accuracy": cell("mean_local_accuracy"),
        "target": pm(row["target_accuracy"]),
        "rounds to target": censored_cell(_rounds_of(row)),
        "s/round": pm(row["seconds_per_round_mean"], None, 1),
    }


def display_rows(
    rows: Sequence[Mapping[str, object]], reference: str = "reference"
) -> list[dict[str, object]]:
    """The numeric rows formatted for Markdown; ``reference`` names the paired columns.

    The per-client column is the 10th percentile when every row has it, else the worst
    client, labelled as such.
    """
    key = table_client_key(rows)
    return [display_row(row, key, reference) for row in rows]
