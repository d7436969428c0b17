"""The report's "Where accuracy goes" section, from the diagnostics in ``metrics.jsonl``.

* ``diagnostics.png``: per round, the expert merges' mean total variation from the clients'
  data shares, the mean share of each class's data that reached a merge, the mean gain
  in local accuracy a client would have from its own router (experts global), and each MoE
  layer's expert specialisation (normalised mutual information of expert and class on the
  global test set; falling = experts blurring);
* the text: the final global accuracy per class (names from ``partition.json``).

Runs recorded before these diagnostics get no section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedalign.experiments.report.drawing import integer_rounds, pyplot, save
from fedalign.experiments.report.load import RunRecords


def _series(records: RunRecords, pick: Any) -> tuple[list[int], list[float]]:
    rounds, values = [], []
    for row in records.metrics:
        value = pick(row)
        if isinstance(value, int | float):
            rounds.append(int(row["round"]))
            values.append(float(value))
    return rounds, values


def plot_diagnostics(records: RunRecords, path: Path) -> Path:
    """Merge total variation, class coverage, own-router gain and expert specialisation per
    round."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    merge = axes[0]
    for key, label in (
        ("tv_mean", "merge weights vs data shares (TV, mean)"),
        ("class_coverage_mean", "class data reaching a merge (mean)"),
        ("class_coverage_min", "class data reaching a merge (min)"),
    ):
        rounds, values = _series(
            records, lambda r, k=key: (r.get("merge_diagnostics") or {}).get(k)
        )
        if rounds:
            merge.plot(rounds, values, marker="o", markersize=3, label=label)
    merge.set_xlabel("round")
    merge.set_ylim(-0.02, 1.02)
    merge.legend(fontsize=7)
    merge.set_title("Expert merges")
    gain = axes[1]
    rounds, values = _series(records, lambda r: r.get("own_router_gain_mean"))
    if rounds:
        gain.plot(rounds, values, marker="o", markersize=3)
    gain.axhline(0.0, color="grey", linewidth=0.8)
    gain.set_xlabel("round")
    gain.set_title("Local accuracy: own router minus global router")
    special = axes[2]
    layers = sorted({k for r in records.metrics for k in (r.get("expert_specialisation") or {})})
    for layer in layers:
        rounds, values = _series(
            records, lambda r, k=layer: (r.get("expert_specialisation") or {}).get(k)
        )
        if rounds:
            special.plot(rounds, values, marker="o", markersize=3, label=layer)
    if layers:
        special.legend(fontsize=7)
    special.set_xlabel("round")
    special.set_title("Expert specialisation: NMI(expert; class)")
    for axis in axes:
        integer_rounds(axis)
    return save(figure, path)


def class_accuracy_text(records: RunRecords) -> str:
    """The last evaluated round's global accuracy per class, worst first."""
    rows = [r for r in records.metrics if r.get("class_accuracy")]
    if not rows:
        return ""
    accuracy = rows[-1]["class_accuracy"]
    names = _label_names(records.folder, len(accuracy))
    pairs = sorted(
        ((names[i], a) for i, a in enumerate(accuracy) if a is not None), key=lambda p: p[1]
    )
    cells = ", ".join(f"{name} {value:.3f}" for name, value in pairs)
    return f"Global test accuracy per class, round {rows[-1]['round']} (worst first): {cells}."


def _label_names(folder: Path, count: int) -> list[str]:
    try:
        names = json.loads((folder / "partition.json").read_text()).get("label_names", [])
    except (OSError, ValueError):
        names = []
    return [str(n) for n in names] if len(names) == count else [str(i) for i in range(count)]


def diagnostics_section_parts(records: RunRecords, out: Path) -> tuple[str, list[Path]] | None:
    """The section's text and figure; None for runs without the diagnostics."""
    if not any("merge_diagnostics" in r or "class_accuracy" in r for r in records.metrics):
        return None
    text = (
        "Expert merges: total variation between each merge's client weights and the "
        "clients' data shares (0 = FedAvg), and the share of each class's training data "
        "held by the clients a merge kept (1 = every class reached it); strategies that "
        "merge by data share sit at 0 and 1. Right: each client's local accuracy with its "
        "own trained router against the global router, experts global (above 0: gating "
        "divergence costs the client accuracy). Far right: per MoE layer, how much the "
        "experts the global test set's tokens go to say about their class (normalised "
        "mutual information, 0 = every class routed alike; falling over rounds = experts "
        "blurring). "
    )
    return text + class_accuracy_text(records), [plot_diagnostics(records, out / "diagnostics.png")]
