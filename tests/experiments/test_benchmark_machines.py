"""A suite's page names the machines its runs came from; --rerun-other-machines.

The simulator is the fake of ``test_benchmark.py`` (it writes no ``provenance.json``: its
runs count as recorded before provenance); tests write the provenance of two fake machines
into the finished run folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedalign.cli import build_parser
from fedalign.config import ExperimentConfig
from fedalign.experiments.benchmark import PlannedRun, run_status
from fedalign.records import UNKNOWN_LABEL, current_machine
from fedalign.records.provenance import describe_environment, start_session
from tests.experiments.test_benchmark import FakeSimulator
from tests.experiments.test_benchmark import _run as run_benchmark

A = ("aaaaaaaaaaaa", "Intel Xeon, AVX512 kernels")
B = ("bbbbbbbbbbbb", "AMD EPYC, AVX2 kernels")


pytestmark = pytest.mark.usefixtures("no_plots")


def _run(suite_file: Path, out: Path, *extra: str) -> int:
    return run_benchmark(suite_file, out, "--no-report", *extra)


def ran_on(folder: Path, machine: tuple[str, str]) -> None:
    """Write the provenance of a run made on ``machine`` (id, label) into ``folder``."""
    environment = {**describe_environment(), "machine": machine[0], "machine_label": machine[1]}
    record = start_session(None, environment, 1, "2026-12-03T00:00:00")
    (folder / "provenance.json").write_text(json.dumps(record))


def run_folders(out: Path) -> list[Path]:
    return sorted(path.parent for path in (out / "runs").glob("alpha*/seed*/*/summary.json"))


def test_the_page_says_when_a_paired_comparison_mixes_machines(
    fake: FakeSimulator, suite_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    assert _run(suite_file, out) == 0
    # the fake writes no provenance: every run is from before provenance
    payload = json.loads((out / "results.json").read_text())
    assert payload["machines"] == {"unknown": {"label": UNKNOWN_LABEL, "runs": 18}}
    assert "Machine: all 18 runs ran on `unknown`" in (out / "results.md").read_text()

    for folder in run_folders(out):
        ran_on(folder, A)
    assert _run(suite_file, out, "--no-run") == 0
    markdown = (out / "results.md").read_text()
    assert f"Machine: all 18 runs ran on `{A[0]}` ({A[1]})." in markdown
    assert "Mixed machines" not in markdown

    ran_on(out / "runs/alpha0.1/seed2/fedalign", B)  # one seed of a row elsewhere
    (out / "runs/alpha1/seed0/fedavg/provenance.json").unlink()  # a reference run: unknown
    assert _run(suite_file, out, "--no-run") == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["machines"] == {
        A[0]: {"label": A[1], "runs": 16},
        B[0]: {"label": B[1], "runs": 1},
        "unknown": {"label": UNKNOWN_LABEL, "runs": 1},
    }
    rows = {(r["strategy"], r["alpha"]): r for r in payload["rows"]}
    assert rows[("fedalign", 0.1)]["machines"] == f"{A[0]}:2;{B[0]}:1"
    assert rows[("fedalign", 0.1)]["mixed_machines"] is True
    assert rows[("fedavg", 0.1)]["mixed_machines"] is False
    assert rows[("fedalign-consistency", 0.1)]["mixed_machines"] is False
    # at alpha 1 the reference itself mixes: every row paired with it does
    assert rows[("fedavg", 1.0)]["machines"] == f"{A[0]}:2;unknown:1"
    assert all(rows[(label, 1.0)]["mixed_machines"] for label in ("fedavg", "fedalign"))
    markdown = (out / "results.md").read_text()
    notice = next(line for line in markdown.splitlines() if "Mixed machines" in line)
    assert "4 paired comparison(s)" in notice
    assert "fedalign at alpha 0.1 (vs fedavg)" in notice
    assert "fedavg at alpha 1 (across seeds)" in notice
    assert f"`{A[0]}` {A[1]}: 16 runs; `{B[0]}` {B[1]}: 1 run; `unknown`" in notice
    assert "--rerun-other-machines" in notice
    assert "| fedalign † | 0.1 |" in markdown and "| fedavg | 0.1 |" in markdown
    # the table comes before the notice, the notice before the column explanations
    assert markdown.index("| fedalign † | 0.1 |") < markdown.index(notice)
    assert markdown.index(notice) < markdown.index("*final accuracy* is")
    runs_csv = (out / "runs.csv").read_text().splitlines()
    assert runs_csv[0].endswith(",machine,machine_label,software")
    assert sum(B[0] in line for line in runs_csv) == 1


def test_rerun_other_machines_replaces_their_runs(
    fake: FakeSimulator, suite_file: Path, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "results"
    narrow = ("--alphas", "0.1", "--seeds", "2")
    assert _run(suite_file, out, *narrow) == 0
    here = current_machine()
    folders = run_folders(out)
    assert len(folders) == 6
    for folder in folders:
        ran_on(folder, here)
    ran_on(out / "runs/alpha0.1/seed1/fedalign", B)
    (out / "runs/alpha0.1/seed0/fedavg/provenance.json").unlink()
    capsys.readouterr()

    assert _run(suite_file, out, *narrow, "--dry-run", "--rerun-other-machines") == 0
    lines = capsys.readouterr().out.splitlines()
    rerun = sorted(line.split()[-1] for line in lines if line.strip().startswith("rerun"))
    assert rerun == [
        str(out / "runs/alpha0.1/seed0/fedavg"),
        str(out / "runs/alpha0.1/seed1/fedalign"),
    ]
    assert sum(line.strip().startswith("finished") for line in lines) == 4

    fake.calls.clear()
    assert _run(suite_file, out, *narrow) == 0  # without the flag: reused
    assert fake.calls == []
    assert _run(suite_file, out, *narrow, "--rerun-other-machines") == 0
    assert sorted(fake.calls) == [("fedalign", 0.1, 1, False), ("fedavg", 0.1, 0, False)]
    assert "re-run from other machines 2" in (out / "COMMAND.txt").read_text()
    args = build_parser().parse_args(["benchmark", "--rerun-other-machines"])
    assert args.rerun_other_machines is True


def test_an_interrupted_run_of_another_machine_is_rerun(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    config = ExperimentConfig()
    config.run.out = str(folder)
    folder.mkdir()
    config.save(folder / "config.toml")
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "state.pt").write_bytes(b"state")
    run = PlannedRun("fedavg", 0.5, 0, config, folder)
    ran_on(folder, B)
    assert run_status(run) == "resume"
    assert run_status(run, B[0]) == "resume"
    assert run_status(run, A[0]) == "rerun"
