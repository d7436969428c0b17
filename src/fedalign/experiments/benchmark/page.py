"""What a benchmark writes into its results folder.

``results.md`` / ``results.csv`` / ``results.json`` (one row per strategy and alpha),
``runs.csv`` (one row per run; a tuned row's chosen candidate only), the tuning table
(:mod:`.tuning`), ``convergence.png`` and ``divergence.png`` (mean over seeds
with a band, one column per alpha), the machines the runs came from (beside each table,
and ``machines`` in ``results.json``: :mod:`.machines`), ``reports/`` (``fedalign
report`` pages of the suite's ``report`` strategies, first seed) and ``COMMAND.txt`` (the
command that made them).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fedalign.config import ExperimentConfig
from fedalign.experiments.benchmark.machines import machine_table, machines_markdown
from fedalign.experiments.benchmark.plan import PlannedRun, alpha_name
from fedalign.experiments.benchmark.results import (
    FinishedRun,
    aggregate_rows,
    display_rows,
    load_finished,
    run_rows,
    table_client_key,
    target_accuracies,
)
from fedalign.experiments.benchmark.suite import Suite
from fedalign.experiments.benchmark.tuning import (
    chosen_markdown,
    select_tuned,
    tuning_markdown,
)
from fedalign.experiments.plots import GridFigure, layer_mean, plot_grid
from fedalign.experiments.report.page import build_report
from fedalign.experiments.tables import (
    CLIENT_HEADERS,
    CLIENT_TEXT,
    number,
    to_csv,
    to_json,
    to_markdown,
)
from fedalign.records import atomic_write_text


@dataclass
class ResultsPage:
    """The parts of ``results.md`` besides the suite and its base config."""

    table: str
    command: str
    missing: int
    compute_seconds: float
    band: str
    client_key: str
    reports: Sequence[tuple[str, Path]] = ()
    tuning: str = ""
    chosen: str = ""
    machines: str = ""


def setup_text(suite: Suite, base: ExperimentConfig) -> str:
    """One sentence describing the shared configuration."""
    m, d, p, t, f = base.model, base.data, base.partition, base.train, base.federated
    examples = (
        f"{d.max_train_examples} train / {d.max_test_examples or 'all'} test examples"
        if d.max_train_examples
        else "all examples"
    )
    steps = f"local steps {t.local_steps}" if t.local_steps else f"local epochs {t.local_epochs}"
    return (
        f"model `{m.name}` ({m.num_experts} experts, top-{m.top_k}, {m.upcycle_layers} MoE "
        f"layers, trainable `{m.trainable}`), dataset `{d.dataset}` ({examples}), "
        f"{p.num_clients} clients, {p.method} partition with alpha in "
        f"{{{', '.join(f'{a:g}' for a in suite.alphas)}}}, {f.rounds} rounds, "
        f"fraction {f.fraction:g}, {steps}, batch {t.batch_size}, lr {t.lr:g}, "
        f"routing lambda {base.strategy.routing_lambda:g}, seeds {suite.seeds}"
    )


def reading_text(suite: Suite, page: ResultsPage) -> str:
    """How to read the table: what every column is (evaluation rules of docs/docs/method.md)."""
    reference = suite.display(suite.reference_label)
    return (
        "*final accuracy* is the global test accuracy after the last round (no round is "
        "selected on the test set), mean ± sample standard deviation (ddof=1) over seeds. "
        f"*paired Δ vs {reference}*: per seed, this strategy's final accuracy minus "
        f"{reference}'s on the same partition, initial model and client sampling; the mean "
        "over seeds and its 95% Student-t interval (none with fewer than two seeds); *wins*: "
        f"seeds on which it beat {reference}. {CLIENT_TEXT[page.client_key]}. "
        f"*target* = {suite.target_fraction:g} × {reference}'s mean final accuracy at the "
        "same alpha; *rounds to target* is the first round after which global accuracy stays "
        "at or above it, averaged over the seeds that reached it; seeds that never did are "
        "counted as censored at the number of rounds they ran, not dropped. *s/round* is the "
        "median wall time of a round on the machine that ran it (mean over seeds)."
    )


def results_markdown(suite: Suite, base: ExperimentConfig, page: ResultsPage) -> str:
    """The ``results.md`` page: setup, table, how to read it, plots, command."""
    band_text = "min-max over seeds" if page.band == "minmax" else "± one standard deviation"
    lines = [f"# Benchmark `{suite.name}`{' (quick size)' if suite.quick else ''}", ""]
    for paragraph in (suite.description, suite.note):
        if paragraph:
            lines += [paragraph, ""]
    lines += [f"Setup: {setup_text(suite, base)}.", "", page.table, ""]
    if page.machines:
        lines += [page.machines, ""]
    lines += [reading_text(suite, page), ""]
    for label in suite.versus:
        if label in suite.strategy_labels and label != suite.reference_label:
            lines += [
                f"Every row paired with {suite.display(label)} instead: "
                f"[versus-{label}.md](versus-{label}.md).",
                "",
            ]
    if page.tuning:
        lines += [
            "Tuned rows: per alpha, the value with the best mean *final validation accuracy* "
            "(the server's validation set, held out of the training pool; never the test "
            "set) over the seeds every value finished on, ties to the first listed; the "
            "table above reports that value's runs.",
            "",
            page.tuning,
            "",
        ]
    if page.chosen:
        lines += [
            "Rows whose value was chosen by another suite's tuning (on that suite's validation "
            "split; the runs here train on the whole pool and are paired with the other rows):",
            "",
            page.chosen,
            "",
        ]
    if page.missing:
        lines += [
            f"**{page.missing} planned run(s) have not finished and are not in the table.**",
            "",
        ]
    lines += [
        f"Total compute over the runs in the table: {page.compute_seconds / 60:.1f} min.",
        "",
        f"![convergence](convergence.png)  (line: mean over seeds, band: {band_text})",
        "",
        "![divergence](divergence.png)",
        "",
    ]
    if page.reports:
        lines += ["Routing and expert pictures of single runs (`fedalign report`):", ""]
        lines += [f"- [{title}]({path.as_posix()})" for title, path in page.reports]
        lines.append("")
    lines += ["Reproduce (finished runs under `runs/` are reused):", ""]
    lines += ["```bash", page.command, "```", ""]
    return "\n".join(lines)


def _grid(suite: Suite, finished: Sequence[FinishedRun]) -> GridFigure:
    runs: dict[tuple[float, str], list[list[dict[str, object]]]] = {}
    for f in finished:
        runs.setdefault((f.run.alpha, f.run.label), []).append(f.metrics)
    return GridFigure(suite.alphas, suite.strategy_labels, runs, suite.display)


def write_plots(
    suite: Suite,
    finished: Sequence[FinishedRun],
    out: Path,
    targets: Mapping[float, float | None],
    band: str,
    client_key: str,
) -> None:
    """``convergence.png`` (global and per-client accuracy) and ``divergence.png``."""
    grid = _grid(suite, finished)
    title = f"{suite.name}{' (quick)' if suite.quick else ''}"
    client_label = CLIENT_HEADERS[client_key].split(" (")[0]
    accuracy = [
        ("global test accuracy", lambda r: r.get("global_accuracy")),
        (client_label, lambda r: r.get(client_key)),
    ]
    plot_grid(grid, accuracy, out / "convergence.png", targets=targets, band=band, title=title)
    divergence = [
        (
            "routing divergence (JS, mean over layers)",
            lambda r: layer_mean(r, "routing_divergence", "mean_js"),
        ),
        (
            "semantic dispersion (mean over layers)",
            lambda r: layer_mean(r, "semantic_dispersion", "mean_dispersion"),
        ),
    ]
    plot_grid(grid, divergence, out / "divergence.png", band=band, title=title)


def write_results(
    suite: Suite,
    base: ExperimentConfig,
    runs: Sequence[PlannedRun],
    out: Path,
    command: str,
    band: str = "minmax",
    reports: bool = True,
) -> list[dict[str, object]]:
    """Aggregate the finished runs and write tables, plots and run reports into ``out``.

    Returns
    -------
    list of dict
        The aggregated numeric rows (as in ``results.csv``).
    """
    loaded = load_finished(runs)
    finished, choices = select_tuned(suite, loaded)
    targets = target_accuracies(finished, suite)
    per_run = run_rows(finished, targets, out)
    rows = aggregate_rows(suite, per_run)
    key = table_client_key(rows)
    machines = machine_table(per_run)
    reference = suite.display(suite.reference_label)
    out.mkdir(parents=True, exist_ok=True)
    page = ResultsPage(
        table=to_markdown(display_rows(rows, reference)),
        command=command,
        missing=len(runs) - len(loaded),
        compute_seconds=sum(number(r["seconds"]) or 0.0 for r in per_run),
        band=band,
        client_key=key,
        reports=write_run_reports(suite, finished, out) if reports else [],
        tuning=tuning_markdown(suite, choices),
        chosen=chosen_markdown(suite, runs),
        machines=machines_markdown(machines, rows, reference),
    )
    atomic_write_text(out / "results.md", results_markdown(suite, base, page))
    atomic_write_text(out / "results.csv", to_csv(rows))
    atomic_write_text(out / "runs.csv", to_csv(per_run))
    payload: dict[str, object] = {
        "suite": suite.name,
        "quick": suite.quick,
        "client_metric": key,
        "machines": machines,
        "rows": rows,
    }
    if choices:
        payload["tuning"] = [c.to_dict() for c in choices]
    versus = write_versus_pages(suite, finished, out, page)
    if versus:
        payload["versus"] = versus
    atomic_write_text(out / "results.json", to_json(payload))
    write_plots(suite, finished, out, targets, band, key)
    return rows


def write_versus_pages(
    suite: Suite, finished: Sequence[FinishedRun], out: Path, page: ResultsPage
) -> dict[str, list[dict[str, object]]]:
    """``versus-<label>.md`` per label of ``suite.versus`` in the grid: the same runs paired
    with that strategy (and its target) instead of the reference. Returns the rows by label."""
    pages = {}
    for label in suite.versus:
        if label not in suite.strategy_labels or label == suite.reference_label:
            continue
        other = dataclasses.replace(suite, reference=label)
        per_run = run_rows(finished, target_accuracies(finished, other), out)
        rows = aggregate_rows(other, per_run)
        name = other.display(label)
        table = to_markdown(display_rows(rows, name))
        text = [
            f"# Benchmark `{suite.name}`: every row paired with {name}",
            "",
            f"The runs of `results.md`, compared seed by seed with {name} instead of "
            f"{suite.display(suite.reference_label)}.",
            "",
            table,
            "",
            machines_markdown(machine_table(per_run), rows, name),
            "",
            reading_text(other, page),
            "",
        ]
        atomic_write_text(out / f"versus-{label}.md", "\n".join(text))
        pages[label] = rows
    return pages


def write_run_reports(
    suite: Suite, finished: Sequence[FinishedRun], out: Path
) -> list[tuple[str, Path]]:
    """``fedalign report`` of the suite's ``report`` strategies, first seed, every alpha.

    Pages go to ``out/reports/<alpha>-seed<S>-<label>/index.html`` (outside ``runs/``, so
    that they travel with the tables). Returns (title, page path relative to ``out``).
    """
    pages = []
    first_seed = suite.seeds[0]
    for f in finished:
        if f.run.label not in suite.report or f.run.seed != first_seed:
            continue
        name = f"{alpha_name(f.run.alpha)}-seed{f.run.seed}-{f.run.label}"
        page = build_report(f.run.folder, out=out / "reports" / name)
        title = f"{suite.display(f.run.label)}, alpha = {f.run.alpha:g}, seed {f.run.seed}"
        pages.append((title, page.relative_to(out)))
    return pages


def _git_commit() -> str:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return completed.stdout.strip() or "unknown"


def write_command(
    out: Path, command: str, seconds: float, counts: Mapping[str, int], redraw: bool = False
) -> None:
    """``COMMAND.txt``: the command, where and when it ran, and what it computed.

    With ``redraw`` (nothing run) an existing file keeps the command that made the runs and
    gets one line saying when the tables were redrawn.
    """
    path = out / "COMMAND.txt"
    now = datetime.now().isoformat(timespec="seconds")
    if redraw and path.exists():
        note = f"# tables and plots redrawn from finished runs (--no-run): {now}\n"
        atomic_write_text(path, path.read_text() + note)
        return
    invoked = shlex.join(["fedalign", *sys.argv[1:]]) if "fedalign" in sys.argv[0] else ""
    lines = [
        command,
        "",
        f"# invoked as: {invoked or command}",
        f"# directory: {os.getcwd()}",
        f"# finished: {now}",
        f"# wall time of this invocation: {seconds:.1f}s "
        f"(runs reused {counts.get('finished', 0)}, resumed {counts.get('resume', 0)}, "
        f"run {counts.get('new', 0)}, left to another process {counts.get('busy', 0)}"
        + (f", re-run from other machines {counts['rerun']}" if counts.get("rerun") else "")
        + ")",
        f"# git commit: {_git_commit()}; python {platform.python_version()}; "
        f"{os.cpu_count()} CPUs visible",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))
