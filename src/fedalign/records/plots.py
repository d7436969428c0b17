"""Plots written into run folders."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_convergence(
    series: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str = ""
) -> None:
    """Global test accuracy and loss per round, one line per run (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in series.items():
        evaluated = [r for r in rows if r.get("global_accuracy") is not None]
        rounds = [r["round"] for r in evaluated]
        accuracy_axis.plot(
            rounds, [r["global_accuracy"] for r in evaluated], marker="o", label=label
        )
        loss_axis.plot(rounds, [r["global_loss"] for r in evaluated], marker="o", label=label)
    accuracy_axis.set_xlabel("round")
    accuracy_axis.set_ylabel("global test accuracy")
    loss_axis.set_xlabel("round")
    loss_axis.set_ylabel("global test loss")
    accuracy_axis.grid(alpha=0.3)
    loss_axis.grid(alpha=0.3)
    accuracy_axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
