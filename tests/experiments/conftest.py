"""Fixtures shared by the experiments tests (compare, benchmark, report)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A :class:`~tests.experiments.test_benchmark.FakeSimulator` in place of the runner's
    simulation (modules with a fake of their own override this fixture)."""
    from fedalign.experiments.benchmark import runner
    from tests.experiments.test_benchmark import FakeSimulator

    simulator = FakeSimulator()
    monkeypatch.setattr(runner, "run_experiment", simulator.run)
    monkeypatch.setattr(runner, "prepare_shared_data", simulator.prepare)
    return simulator


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip drawing the benchmark page's plots, to keep tests fast."""
    from fedalign.experiments.benchmark import page

    monkeypatch.setattr(page, "plot_grid", lambda *args, **kwargs: None)


@pytest.fixture
def suite_file(tmp_path: Path) -> Path:
    """The toy suite of ``test_benchmark.py`` as a file."""
    from tests.experiments.test_benchmark import SUITE

    path = tmp_path / "toy.toml"
    path.write_text(SUITE)
    return path


@pytest.fixture
def assert_png() -> Callable[[Path], None]:
    """Check that a path is a PNG file (by its magic bytes)."""

    def check(path: Path) -> None:
        assert path.is_file(), path
        assert path.read_bytes()[:8] == PNG_MAGIC, path

    return check
