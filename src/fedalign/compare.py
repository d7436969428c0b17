"""Several strategies on the identical partition, seed and initial model.

The data is tokenized (and the frozen prefix cached) once and shared by every run. The
table reports final and best global accuracy, mean and worst local accuracy, and rounds to
reach the first strategy's final accuracy (the reference, FedAvg by default).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedalign.client import prepare
from fedalign.config import ExperimentConfig
from fedalign.experiments.run import run_experiment
from fedalign.records import RunSummary, plot_convergence, read_jsonl


@dataclass
class ComparisonResult:
    summaries: list[RunSummary]
    rows: list[dict[str, object]]
    markdown: str


def rounds_to_target(rows: Sequence[dict[str, object]], target: float) -> int | None:
    """First round whose global accuracy is >= ``target`` (None if never)."""
    for row in rows:
        accuracy = row.get("global_accuracy")
        if isinstance(accuracy, int | float) and accuracy >= target - 1e-12:
            return int(row["round"])  # type: ignore[call-overload]
    return None


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def comparison_table(
    summaries: Sequence[RunSummary], metrics: Sequence[Sequence[dict[str, object]]]
) -> list[dict[str, object]]:
    """One row per run; rounds-to-target uses the first run's final accuracy."""
    target = summaries[0].final_accuracy if summaries else float("nan")
    rows = []
    for summary, lines in zip(summaries, metrics):
        rows.append(
            {
                "strategy": summary.strategy,
                "final_accuracy": summary.final_accuracy,
                "mean_local_accuracy": summary.mean_local_accuracy,
                "worst_local_accuracy": summary.worst_local_accuracy,
                f"rounds_to_{summaries[0].strategy}_final": rounds_to_target(lines, target),
                "seconds_per_round": summary.seconds_per_round,
                "mib_up_per_round": summary.bytes_received / 2**20 / max(summary.rounds, 1),
            }
        )
    return rows


def to_markdown(rows: Sequence[dict[str, object]]) -> str:
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[h]) for h in header) + " |")
    return "\n".join(lines)


def to_csv(rows: Sequence[dict[str, object]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def run_comparison(
    config: ExperimentConfig, strategies: Sequence[tuple[str, str]], out: Path
) -> ComparisonResult:
    """Run each ``(strategy, ablation)`` on ``config`` and write the table and plot to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    configs = []
    for name, ablation in strategies:
        run_config = config.copy()
        run_config.strategy.name = name
        run_config.strategy.ablation = ablation
        run_config.validate()
        configs.append(run_config)
    # identical partition and seed: prepare the data once with the first run's model
    prepared = prepare(config).data
    summaries: list[RunSummary] = []
    metrics: list[list[dict[str, object]]] = []
    for run_config in configs:
        label = run_config.strategy.name
        if label == "fedalign" and run_config.strategy.ablation != "full":
            label = f"fedalign-{run_config.strategy.ablation}"
        summary = run_experiment(run_config, out / label, prepared=prepared)
        summaries.append(summary)
        metrics.append(read_jsonl(out / label / "metrics.jsonl"))
    rows = comparison_table(summaries, metrics)
    markdown = to_markdown(rows)
    (out / "results.md").write_text(markdown + "\n")
    (out / "results.csv").write_text(to_csv(rows))
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_convergence(
        {s.strategy: m for s, m in zip(summaries, metrics)},
        out / "convergence.png",
        title=f"{config.model.name}, {config.partition.num_clients} clients, "
        f"{config.partition.method} alpha={config.partition.alpha}",
    )
    return ComparisonResult(summaries=summaries, rows=rows, markdown=markdown)
