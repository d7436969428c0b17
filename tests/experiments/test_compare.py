"""``fedalign compare``: the comparison table (final round, censored rounds) and the command."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedalign.cli import main
from fedalign.experiments.compare import comparison_table
from fedalign.records import RunSummary
from tests.helpers import TINY_CLI as TINY


def _summary(strategy: str, final: float) -> RunSummary:
    return RunSummary(
        strategy=strategy,
        rounds=3,
        final_accuracy=final,
        final_loss=1.0,
        local_accuracy_p10=float("nan"),  # as a run without p10 records writes it
        mean_local_accuracy=final - 0.125,
        worst_local_accuracy=final - 0.25,
        seconds=3.0,
        seconds_per_round=1.0,
        bytes_sent=0,
        bytes_received=3 * 2**20,
        peak_memory_mib=1.0,
    )


def _lines(*accuracies: float, p10: bool = False) -> list[dict[str, object]]:
    return [
        {"round": r, "global_accuracy": a, **({"local_accuracy_p10": a - 0.0625} if p10 else {})}
        for r, a in enumerate(accuracies, start=1)
    ]


def test_comparison_table_final_round_and_censoring() -> None:
    summaries = [_summary("fedavg", 0.5), _summary("x", 0.625), _summary("fedprox", 0.375)]
    metrics = [_lines(0.3, 0.5, 0.5), _lines(0.5, 0.4, 0.625), _lines(0.25, 0.5, 0.375)]
    rows = comparison_table(summaries, metrics, ["fedavg", "fedalign-consistency", "fedprox"])
    assert [r["strategy"] for r in rows] == ["fedavg", "fedalign-consistency", "fedprox"]
    assert all("best_accuracy" not in r for r in rows)  # no selection on the test set
    assert [r["minus_fedavg"] for r in rows] == [0.0, 0.125, -0.125]
    # fedavg reaches its own final at round 2 and stays; the second run dips at round 2
    assert [r["rounds_to_fedavg_final"] for r in rows] == [2, 3, ">3 (censored)"]
    assert [r["worst_local_accuracy"] for r in rows] == [0.25, 0.375, 0.125]
    assert rows[0]["mib_up_per_round"] == 1.0
    # every run recorded the 10th percentile: that column instead of the worst client
    metrics = [_lines(0.5, p10=True), _lines(0.625, p10=True), _lines(0.375, p10=True)]
    rows = comparison_table(summaries, metrics)
    assert "worst_local_accuracy" not in rows[0]
    assert [r["local_accuracy_p10"] for r in rows] == [0.4375, 0.5625, 0.3125]
    assert comparison_table([], []) == []


@pytest.mark.usefixtures("torch_one_thread")
def test_compare_writes_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    code = main(
        ["compare", *TINY, "--strategies", "fedavg,fedalign:consistency", "--out", str(out)]
    )
    assert code == 0
    table = (out / "results.md").read_text()
    assert "fedavg" in table and "fedalign-consistency" in table
    assert "rounds_to_fedavg_final" in table and "minus_fedavg" in table
    assert "best_accuracy" not in table
    assert (out / "convergence.png").exists() and (out / "results.csv").exists()
    assert (out / "fedavg" / "summary.json").exists()
    assert (out / "fedalign-consistency" / "summary.json").exists()
    assert "final_accuracy" in capsys.readouterr().out
