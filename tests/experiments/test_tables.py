"""Table cells and formats shared by compare and benchmark."""

from __future__ import annotations

from fedalign.experiments.stats import CensoredRounds
from fedalign.experiments.tables import (
    P10,
    WORST,
    censored_cell,
    client_key,
    client_value,
    paired_cell,
    pm,
    to_csv,
    to_markdown,
    wins_cell,
)


def test_cells() -> None:
    assert pm(0.5, 0.25) == "0.5000 ± 0.2500"
    assert pm(0.5) == "0.5000" and pm(None, 0.1) == "-"
    assert paired_cell(0.0125, -0.005, 0.03) == "+0.0125 [-0.0050, +0.0300]"
    assert paired_cell(0.25, None, None) == "+0.2500"
    assert paired_cell(None, None, None) == "-"
    assert wins_cell(3, 5) == "3/5" and wins_cell(0, 0) == "-"


def test_censored_cell() -> None:
    assert censored_cell(CensoredRounds(4, 5, 12.0, 2.0, 25)) == (
        "12.0 ± 2.0 (4/5 reached; 1 censored at >25)"
    )
    assert censored_cell(CensoredRounds(1, 1, 7.0, 0.0, None)) == "7.0 (1/1 reached)"
    assert censored_cell(CensoredRounds(0, 3, None, None, 5)) == (
        "- (0/3 reached; 3 censored at >5)"
    )


def test_client_figure_is_p10_only_when_every_run_has_it() -> None:
    new = ({P10: 0.5, WORST: 0.25}, {})
    old = ({WORST: 0.125}, {})
    from_metrics = ({WORST: 0.0}, {P10: 0.375})
    assert client_key([new, from_metrics]) == P10
    assert client_key([new, old]) == WORST
    assert client_key([]) == WORST
    assert client_value(P10, *from_metrics) == 0.375
    assert client_value(P10, *old) is None


def test_markdown_and_csv() -> None:
    rows = [{"strategy": "fedavg", "final_accuracy": 0.5, "rounds": None}]
    assert to_markdown(rows) == (
        "| strategy | final_accuracy | rounds |\n|---|---|---|\n| fedavg | 0.5000 | - |"
    )
    assert to_csv(rows).splitlines() == ["strategy,final_accuracy,rounds", "fedavg,0.5,"]
    assert to_markdown([]) == "" and to_csv([]) == ""
