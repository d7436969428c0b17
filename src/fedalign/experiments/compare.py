"""Several strategies on the identical partition, seed and initial model.

The data is tokenized (and the frozen prefix cached) once and shared by every run. The
table reports, per strategy, the global accuracy after the final round (no model selection
on the test set), its difference to the first strategy (the reference, FedAvg by default)
on this seed, the mean local accuracy, the per-client figure (10th percentile of local
accuracy, or the worst client for older runs), and the rounds after which the global
accuracy stays at or above the reference's final accuracy (censored at the run's length
when it never does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedalign.client import PreparedData, prepare
from fedalign.config import ExperimentConfig, run_label
from fedalign.errors import RunFolderError
from fedalign.experiments.run import run_experiment
from fedalign.experiments.stats import rounds_to_target
from fedalign.experiments.tables import client_key, client_value, to_csv, to_json, to_markdown
from fedalign.records import RunSummary, claim_run_folder, plot_convergence, read_jsonl, run_marker


@dataclass
class ComparisonResult:
    summaries: list[RunSummary]
    rows: list[dict[str, object]]
    markdown: str


def _rounds_cell(lines: Sequence[Mapping[str, object]], target: float, rounds: int) -> object:
    reached = rounds_to_target(lines, target)
    return reached if reached is not None else f">{rounds} (censored)"


def comparison_table(
    summaries: Sequence[RunSummary],
    metrics: Sequence[Sequence[Mapping[str, object]]],
    labels: Sequence[str] | None = None,
) -> list[dict[str, object]]:
    """One row per run; the first run is the reference (difference and rounds-to-target).

    ``labels`` name the rows (default: the summaries' strategy); the per-client column is
    ``local_accuracy_p10`` when every run recorded it, else ``worst_local_accuracy``; both
    per-client columns are taken over the ``local_clients_evaluated`` clients beside them.
    """
    if not summaries:
        return []
    names = list(labels) if labels is not None else [s.strategy for s in summaries]
    reference = names[0]
    target = summaries[0].final_accuracy
    sources = [(s.to_dict(), lines[-1] if lines else {}) for s, lines in zip(summaries, metrics)]
    key = client_key(sources)
    rows = []
    for name, summary, lines, source in zip(names, summaries, metrics, sources):
        rows.append(
            {
                "strategy": name,
                "final_accuracy": summary.final_accuracy,
                f"minus_{reference}": summary.final_accuracy - target,
                "mean_local_accuracy": summary.mean_local_accuracy,
                key: client_value(key, *source),
                "local_clients_evaluated": summary.local_clients_evaluated,
                f"rounds_to_{reference}_final": _rounds_cell(lines, target, summary.rounds),
                "seconds_per_round": summary.seconds_per_round,
                "mib_up_per_round": summary.bytes_received / 2**20 / max(summary.rounds, 1),
            }
        )
    return rows


def prepare_shared_data(config: ExperimentConfig) -> PreparedData:
    """Partition, tokenize and prefix-cache once for every run on one partition and seed.

    The model is built only for its frozen prefix; every run builds its own from the seed.
    """
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    return prepare(config).data


def check_compare_folder(
    out: Path, labels: Sequence[str], *, resume: bool = False, overwrite: bool = False
) -> None:
    """Refuse an output folder that holds a comparison or one of its runs.

    Raises
    ------
    RunFolderError
        When ``out`` holds ``results.md`` or a run folder named like one of ``labels`` and
        neither ``resume`` nor ``overwrite`` is given (or both are).
    """
    claim_run_folder(out, resume=resume, overwrite=overwrite, command="compare")
    if resume or overwrite:
        return
    held = [out / "results.md"] if (out / "results.md").exists() else []
    held += [out / label for label in labels if run_marker(out / label) is not None]
    if held:
        raise RunFolderError(
            f"output folder {str(out)!r} already holds a comparison ({str(held[0])!r}); "
            "give --resume to continue its runs from their checkpoints or --overwrite to "
            "replace them"
        )


def run_comparison(
    config: ExperimentConfig,
    strategies: Sequence[tuple[str, str]],
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> ComparisonResult:
    """Run each ``(strategy, ablation)`` on ``config`` and write the table and plot to ``out``.

    Writes ``results.md`` / ``results.csv`` / ``results.json`` and ``convergence.png``; each
    run's folder is ``out / run_label(strategy, ablation)``. ``resume`` continues each run
    from its checkpoint, ``overwrite`` replaces them; without either an ``out`` that holds
    a comparison is refused (:func:`check_compare_folder`).
    """
    labels = [run_label(name, ablation) for name, ablation in strategies]
    check_compare_folder(out, labels, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    configs = []
    for name, ablation in strategies:
        run_config = config.copy()
        run_config.strategy.name = name
        run_config.strategy.ablation = ablation
        run_config.validate()
        configs.append(run_config)
    prepared = prepare_shared_data(config)
    summaries: list[RunSummary] = []
    metrics: list[list[dict[str, object]]] = []
    labels = [run_label(c.strategy.name, c.strategy.ablation) for c in configs]
    for label, run_config in zip(labels, configs):
        summaries.append(
            run_experiment(
                run_config, out / label, prepared=prepared, resume=resume, overwrite=overwrite
            )
        )
        metrics.append(read_jsonl(out / label / "metrics.jsonl"))
    rows = comparison_table(summaries, metrics, labels)
    markdown = to_markdown(rows)
    (out / "results.md").write_text(markdown + "\n")
    (out / "results.csv").write_text(to_csv(rows))
    (out / "results.json").write_text(to_json(rows))
    plot_convergence(
        dict(zip(labels, metrics)),
        out / "convergence.png",
        title=f"{config.model.name}, {config.partition.num_clients} clients, "
        f"{config.partition.method} alpha={config.partition.alpha}",
    )
    return ComparisonResult(summaries=summaries, rows=rows, markdown=markdown)
