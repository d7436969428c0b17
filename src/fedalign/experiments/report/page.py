"""``fedalign report RUN_DIR``: the page of one run folder, or of every run below a folder.

Writes ``RUN_DIR/report/`` with PNGs (:mod:`.drawing`, :mod:`.figures`) and one page,
``index.html`` (also as ``report.md``). The chosen expert of the similarity figure
defaults, per layer, to the one whose clients agree least (lowest mean similarity over
pairs of clients that routed tokens to it, last round). A folder that holds several run
folders (a ``fedalign compare`` or ``fedalign benchmark`` output) gets one report per run
and an index page linking them.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedalign.config import ConfigError
from fedalign.experiments.report.diagnostics import diagnostics_section_parts
from fedalign.experiments.report.drawing import plot_accuracy, plot_divergence, plot_routing
from fedalign.experiments.report.extract import (
    RULE_TEXT,
    all_clients,
    default_expert,
    layer_tag,
    num_experts,
    routing_rows,
    select_layers,
    short_layer_name,
    similarity_of,
)
from fedalign.experiments.report.figures import (
    plot_merges,
    plot_similarity,
    plot_similarity_all,
    plot_usage,
)
from fedalign.experiments.report.load import (
    REPORT_FOLDER,
    RunRecords,
    find_run_folders,
    load_run,
)
from fedalign.records import atomic_write_text

Rounds = list[tuple[int, list[int], dict[str, Any]]]
"""``(round, clients, layer entry)`` of ``routing.jsonl`` for one layer."""

SUMMARY_KEYS = (
    "rounds",
    "final_accuracy",
    "mean_local_accuracy",
    "local_accuracy_p10",
    "local_clients_evaluated",
    "worst_local_accuracy",
    "seconds_per_round",
)
"""Headline numbers of the page (final round; no best round chosen on the test set)."""

SETTINGS = (
    ("model", "name"),
    ("data", "dataset"),
    ("partition", "num-clients"),
    ("partition", "method"),
    ("partition", "alpha"),
    ("federated", "seed"),
)


@dataclass
class Section:
    """One block of the report page: a heading, a sentence and images."""

    title: str
    text: str
    images: list[Path] = field(default_factory=list)


def summary_rows(records: RunRecords) -> list[tuple[str, str]]:
    """Headline numbers and the key settings, as (name, value) pairs."""
    rows: list[tuple[str, str]] = [("strategy", records.strategy)]
    summary = dict(records.summary or {})
    last = records.metrics[-1] if records.metrics else {}
    for key in ("local_accuracy_p10", "local_clients_evaluated"):
        if summary and summary.get(key) is None and last.get(key) is not None:
            summary[key] = last[key]
    for key in SUMMARY_KEYS:
        value = summary.get(key)
        if isinstance(value, float):
            rows.append((key.replace("_", " "), f"{value:.4f}"))
        elif value is not None:
            rows.append((key.replace("_", " "), str(value)))
    if not records.summary:
        rows.append(("status", f"unfinished: {len(records.metrics)} round(s) recorded"))
    for section, key in SETTINGS:
        value = records.config.get(section, {}).get(key)
        if value is not None:
            rows.append((f"{section}.{key}", str(value)))
    return rows


def curve_sections(records: RunRecords, out: Path) -> list[Section]:
    """Accuracy and divergence curves, and a note when routing snapshots are missing."""
    sections = [
        Section(
            "Accuracy",
            "Global test accuracy of the aggregated model, and its accuracy on each client's "
            "local test split (mean, and the 10th percentile over clients with at least 20 "
            "local test examples, or the worst client for runs that predate it), per round.",
            [plot_accuracy(records, out / "accuracy.png")],
        ),
        Section(
            "Divergence",
            "Routing divergence: mean Jensen-Shannon divergence between each client's "
            "routing distribution and the clients' mean. Semantic dispersion: mean over "
            "experts and client pairs of 1 - cosine of the hidden states the clients route "
            "to the same expert (high: one expert index means different things to clients).",
            [plot_divergence(records, out / "divergence.png")],
        ),
    ]
    diagnostics = diagnostics_section_parts(records, out)
    if diagnostics is not None:
        sections.append(Section("Where accuracy goes", *diagnostics))
    if not records.routing:
        sections.append(
            Section(
                "Routing snapshots",
                "This run folder has no routing.jsonl (written by newer versions of the "
                "simulator), so usage heatmaps and similarity matrices are not available.",
            )
        )
    return sections


def usage_section(name: str, rounds: Rounds, image: Path) -> Section:
    first, last = rounds[0][0], rounds[-1][0]
    before = " (initial global model, before training)" if first == 0 else ""
    return Section(
        f"Expert usage, {short_layer_name(name)}",
        "Fraction of each client's tokens that have the expert among their top-k, "
        f"round {first}{before} and round {last}, and the change between them "
        f"(red: used more). Layer `{name}`.",
        [plot_usage(name, rounds, image)],
    )


def similarity_section(
    name: str, rounds: Rounds, expert: int | None, out: Path, tag: str
) -> Section:
    """Client similarity of the chosen (or least-agreeing) expert, then of every expert."""
    short = short_layer_name(name)
    last_similarity = similarity_of(rounds[-1][2])
    if expert is not None and not 0 <= expert < last_similarity.shape[0]:
        raise ConfigError(
            f"--expert {expert} out of range: {short} has {last_similarity.shape[0]} experts"
        )
    pick = expert if expert is not None else default_expert(last_similarity)
    how = "chosen with --expert" if expert is not None else "the least-agreeing expert"
    last_round, last_clients = rounds[-1][0], rounds[-1][1]
    return Section(
        f"Semantic similarity of clients, expert {pick}, {short}",
        f"Cosine similarity between clients' mean hidden states routed to expert "
        f"{pick} ({how}); grey where a client routed no token to it. Then every "
        "expert in the last round.",
        [
            plot_similarity(name, rounds, pick, out / f"similarity_{tag}.png"),
            plot_similarity_all(
                name, last_round, last_clients, last_similarity, out / f"similarity_all_{tag}.png"
            ),
        ],
    )


def merges_section(records: RunRecords, name: str, experts: int, image: Path) -> Section:
    path, rules = plot_merges(name, experts, records.decisions, all_clients(records), image)
    return Section(
        f"Which clients each expert was merged from, {short_layer_name(name)}",
        "Rows are rounds, columns clients; the colour is the weight of the "
        "client's update in the expert's aggregate. Rule: "
        + "; ".join(RULE_TEXT[r] for r in sorted(rules))
        + ".",
        [path],
    )


def layer_sections(
    records: RunRecords, index: int, name: str, expert: int | None, out: Path
) -> list[Section]:
    """Usage, routing over rounds, client similarity and merges of one MoE layer."""
    tag = layer_tag(index)
    rounds = routing_rows(records, name)
    sections = []
    if rounds:
        sections.append(usage_section(name, rounds, out / f"usage_{tag}.png"))
    routing_image = plot_routing(name, rounds, records.decisions, out / f"routing_{tag}.png")
    if routing_image is not None:
        sections.append(
            Section(
                f"Routing distribution over rounds, {short_layer_name(name)}",
                "Share per expert, round by round: of the routing probability (softmax) "
                "and of the top-k assignments (usage), mean over the round's clients; "
                "for FedAlign-MoE also the aggregated global routing distribution p_g.",
                [routing_image],
            )
        )
    if rounds and all("semantic_similarity" in e for _, _, e in rounds):
        sections.append(similarity_section(name, rounds, expert, out, tag))
    experts = num_experts(records, name)
    if records.decisions and experts:
        sections.append(merges_section(records, name, experts, out / f"merges_{tag}.png"))
    return sections


def build_report(
    folder: Path,
    *,
    expert: int | None = None,
    layer: str | None = None,
    out: Path | None = None,
) -> Path:
    """Draw every figure of one run folder and write the page.

    Parameters
    ----------
    folder : Path
        A run folder.
    expert : int or None, default None
        Expert of the similarity figure; None picks, per layer, the least-agreeing one.
    layer : str or None, default None
        Only this MoE layer (full name, unique part of it, or index); None draws all.
    out : Path or None, default None
        Where to write; None is ``folder / "report"``.

    Returns
    -------
    Path
        The ``index.html`` written.

    Raises
    ------
    ConfigError
        On a folder that is not a run folder, an unknown layer or an expert out of range.
    """
    records = load_run(folder)
    out = Path(out) if out is not None else records.folder / REPORT_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    layers = records.layers
    sections = curve_sections(records, out)
    for index, name in select_layers(layers, layer) if layers else []:
        sections += layer_sections(records, index, name, expert, out)
    title = f"Run report: {records.strategy} ({records.folder.name})"
    atomic_write_text(out / "index.html", render_html(title, records, sections, out))
    atomic_write_text(out / "report.md", render_markdown(title, records, sections, out))
    return out / "index.html"


def render_html(title: str, records: RunRecords, sections: Sequence[Section], out: Path) -> str:
    """A self-contained page (images referenced relative to ``out``)."""
    escape = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
        "color:#222}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;"
        "text-align:left}nav a{margin-right:1em}</style>",
        "</head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>Run folder: <code>{escape(str(records.folder))}</code></p>",
        "<table>",
        *(
            f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>"
            for name, value in summary_rows(records)
        ),
        "</table>",
        "<nav>",
        *(f'<a href="#s{i}">{escape(section.title)}</a>' for i, section in enumerate(sections)),
        "</nav>",
    ]
    for i, section in enumerate(sections):
        parts.append(f'<h2 id="s{i}">{escape(section.title)}</h2>')
        parts.append(f"<p>{escape(section.text)}</p>")
        for image in section.images:
            relative = image.relative_to(out).as_posix()
            parts.append(
                f'<a href="{escape(relative)}"><img src="{escape(relative)}" '
                f'alt="{escape(section.title)}"></a>'
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(title: str, records: RunRecords, sections: Sequence[Section], out: Path) -> str:
    """The same page as Markdown."""
    lines = [f"# {title}", "", f"Run folder: `{records.folder}`", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in summary_rows(records)]
    for section in sections:
        lines += ["", f"## {section.title}", "", section.text, ""]
        lines += [
            f"![{section.title}]({image.relative_to(out).as_posix()})" for image in section.images
        ]
    return "\n".join(lines) + "\n"


def build_reports(
    folder: Path,
    *,
    expert: int | None = None,
    layer: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Report one run folder, or every run folder below ``folder`` plus an index page.

    Raises
    ------
    ConfigError
        When ``folder`` does not exist or holds no run folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"report: {str(folder)!r} is not a folder")
    runs = find_run_folders(folder)
    if not runs:
        raise ConfigError(
            f"report: {str(folder)!r} is not a run folder (no metrics.jsonl) and holds none; "
            "give the --out folder of 'fedalign run', 'compare' or 'benchmark'"
        )
    if runs == [folder]:
        page = build_report(folder, expert=expert, layer=layer)
        log(f"report: {page}")
        return page
    pages = []
    for run in runs:
        page = build_report(run, expert=expert, layer=layer)
        log(f"report: {page}")
        pages.append(page)
    index = write_index(folder, pages)
    log(f"index: {index}")
    return index


def write_index(folder: Path, pages: Sequence[Path]) -> Path:
    """``folder/report/index.html``: links to the run reports below ``folder``."""
    out = folder / REPORT_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    items = "\n".join(
        f'<li><a href="{html.escape(Path("..", p.relative_to(folder)).as_posix())}">'
        f"{html.escape(p.parent.parent.relative_to(folder).as_posix())}</a></li>"
        for p in pages
    )
    index = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Reports: {html.escape(folder.name)}</title></head><body>"
        f"<h1>Run reports in {html.escape(str(folder))}</h1><ul>\n{items}\n</ul></body></html>\n"
    )
    atomic_write_text(out / "index.html", index)
    return out / "index.html"
