"""Which machines a suite's runs came from, and which paired comparisons mix them.

Float results differ in the last bits between CPUs and a run amplifies that into points of
accuracy, so a comparison is sound only between runs of one machine. Each finished run's
machine is read from its ``provenance.json``
(:func:`~fedalign.records.provenance.recorded_machine`; runs recorded before provenance
are machine ``unknown``, labelled so). A row *mixes machines* when its runs and its
reference's runs at the same alpha (the seeds it is paired with) come from more than one
machine; the page then says so beside the table, naming the machines and their runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

MIXED_MARK = " †"
"""Appended to the strategy cell of a row whose paired comparison mixes machines."""

RERUN_FLAG = "--rerun-other-machines"
"""The ``fedalign benchmark`` flag that re-runs the runs of other machines on this one."""


def machine_counts(per_run: Sequence[Mapping[str, object]]) -> dict[str, int]:
    """Runs per machine id (most runs first, ties by id)."""
    counts = Counter(str(r["machine"]) for r in per_run)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def machine_table(per_run: Sequence[Mapping[str, object]]) -> dict[str, dict[str, object]]:
    """``results.json``'s ``machines``: machine id -> ``{"label", "runs"}``."""
    labels = {str(r["machine"]): str(r["machine_label"]) for r in per_run}
    return {
        machine: {"label": labels[machine], "runs": runs}
        for machine, runs in machine_counts(per_run).items()
    }


def counts_text(counts: Mapping[str, int]) -> str:
    """``"a840b0b8c4e0:3;unknown:1"``: a row's machines as one CSV-friendly cell."""
    return ";".join(f"{machine}:{runs}" for machine, runs in counts.items())


def row_machines(
    cell: Sequence[Mapping[str, object]], reference: Sequence[Mapping[str, object]]
) -> dict[str, object]:
    """A row's machine columns: ``machines`` (its own runs, :func:`counts_text`) and
    ``mixed_machines`` (its runs and the reference's span more than one machine)."""
    paired = {str(r["machine"]) for r in [*cell, *reference]}
    return {"machines": counts_text(machine_counts(cell)), "mixed_machines": len(paired) > 1}


def _machine_list(machines: Mapping[str, Mapping[str, object]]) -> str:
    return "; ".join(
        f"`{machine}` {info['label']}: {info['runs']} run{'s' if info['runs'] != 1 else ''}"
        for machine, info in machines.items()
    )


def _mixed_rows(rows: Sequence[Mapping[str, object]], reference: str) -> list[str]:
    items = []
    for row in rows:
        if not row.get("mixed_machines"):
            continue
        alpha = row["alpha"]
        what = f"{row['name']} at alpha {alpha:g}" if isinstance(alpha, float) else row["name"]
        is_reference = row.get("strategy") == row.get("reference")
        items.append(f"{what} ({'across seeds' if is_reference else f'vs {reference}'})")
    return items


def machines_markdown(
    machines: Mapping[str, Mapping[str, object]],
    rows: Sequence[Mapping[str, object]],
    reference: str,
) -> str:
    """The paragraph beside the table: the machines the runs came from and, when a paired
    comparison mixes them, a notice naming the rows (marked :data:`MIXED_MARK`).

    Parameters
    ----------
    machines : mapping
        :func:`machine_table` of the table's runs.
    rows : sequence of mapping
        The aggregated rows (with ``mixed_machines``).
    reference : str
        The reference's display name.
    """
    if not machines:
        return ""
    total = sum(int(str(info["runs"])) for info in machines.values())
    mixed = _mixed_rows(rows, reference)
    if len(machines) == 1:
        machine, info = next(iter(machines.items()))
        return f"Machine: all {total} runs ran on `{machine}` ({info['label']})."
    listing = f"Machines: {_machine_list(machines)}."
    if not mixed:
        return f"{listing} Each paired comparison stays on one machine."
    return (
        f"**Mixed machines: {len(mixed)} paired comparison(s) combine runs from different "
        f"machines** (rows marked{MIXED_MARK}: {'; '.join(mixed)}). Single runs move by "
        "several points of accuracy between machines (CPU kernels differ in the last bits "
        "and training amplifies that), so these rows are not a claim made on one machine; "
        f"re-run them on one machine with `fedalign benchmark ... {RERUN_FLAG}`. {listing}"
    )
