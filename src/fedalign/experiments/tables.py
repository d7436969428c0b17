"""Rendering shared by ``compare`` and ``benchmark``: Markdown, CSV and JSON tables and cells.

Also the one place that decides which per-client figure a table shows: the 10th percentile
of local accuracy (``local_accuracy_p10``, over clients with at least 20 local test
examples) when the run recorded it, else the single worst client (older runs), labelled so.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence

from fedalign.experiments.stats import CensoredRounds

P10 = "local_accuracy_p10"
WORST = "worst_local_accuracy"
CLIENT_HEADERS = {
    P10: "p10 client accuracy",
    WORST: "worst-client accuracy (no p10 recorded)",
}
"""Column names of the per-client figure, by metrics key."""

CLIENT_TEXT = {
    P10: "*p10 client accuracy* is the 10th percentile of local test accuracy over the "
    "clients with at least 20 local test examples",
    WORST: "*worst-client accuracy* is the lowest local test accuracy among clients (these "
    "runs predate the 10th-percentile figure)",
}
"""A sentence explaining the per-client column, by metrics key."""


def number(value: object) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    return None


def client_value(key: str, *sources: Mapping[str, object]) -> float | None:
    """The first numeric ``key`` among ``sources`` (e.g. the summary, then the last line)."""
    for source in sources:
        value = number(source.get(key))
        if value is not None:
            return value
    return None


def client_key(runs: Sequence[Sequence[Mapping[str, object]]]) -> str:
    """``local_accuracy_p10`` when every run (its record sources) has it, else the worst client.

    One key per table, so that a column never mixes the two figures.
    """
    if runs and all(client_value(P10, *sources) is not None for sources in runs):
        return P10
    return WORST


def fmt(value: object, digits: int = 4) -> str:
    """A table cell: ``-`` for None, floats to ``digits`` places."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pm(mean: object, std: object = None, digits: int = 4) -> str:
    """``mean ± std`` (just the mean when ``std`` is not a number; ``-`` without a mean)."""
    if number(mean) is None:
        return "-"
    if number(std) is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def signed(value: float, digits: int = 4) -> str:
    return f"{value:+.{digits}f}"


def paired_cell(mean: float | None, low: float | None, high: float | None, digits: int = 4) -> str:
    """``+0.0123 [-0.0040, +0.0286]``: mean paired difference and its 95% interval."""
    if mean is None:
        return "-"
    text = signed(mean, digits)
    if low is not None and high is not None:
        text += f" [{signed(low, digits)}, {signed(high, digits)}]"
    return text


def wins_cell(wins: int, pairs: int) -> str:
    """``3/5``: seeds on which the strategy beat the reference."""
    return f"{wins}/{pairs}" if pairs else "-"


def censored_cell(summary: CensoredRounds, digits: int = 1) -> str:
    """``12.0 (4/5 reached; 1 censored at >25)``; ``- (0/3 reached; 3 censored at >25)``."""
    value = pm(summary.mean, summary.std if summary.reached > 1 else None, digits)
    text = f"{summary.reached}/{summary.seeds} reached"
    if summary.censored:
        horizon = f" at >{summary.horizon}" if summary.horizon is not None else ""
        text += f"; {summary.censored} censored{horizon}"
    return f"{value} ({text})"


def to_markdown(rows: Sequence[Mapping[str, object]]) -> str:
    """A Markdown table with the keys of the first row as header."""
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row[h]) for h in header) + " |")
    return "\n".join(lines)


def to_csv(rows: Sequence[Mapping[str, object]]) -> str:
    """CSV with the keys of the first row as header."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def to_json(payload: object) -> str:
    """Indented JSON with a final newline."""
    return json.dumps(payload, indent=2) + "\n"
