"""SIGKILL ``fedalign run`` at seeded random moments, resume, compare bitwise (slow)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_script() -> object:
    spec = importlib.util.spec_from_file_location(
        "kill_resume_trials", REPO / "scripts" / "kill_resume_trials.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_state(tmp_path: Path) -> None:
    script = load_script()
    lines: list[str] = []
    trials = script.run_trials(3, seed=1, workdir=tmp_path, log=lines.append)  # type: ignore[attr-defined]
    assert all(t.passed for t in trials), lines
    assert any(t.killed for t in trials), lines
