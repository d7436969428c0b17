"""Fixtures shared by the experiments tests (compare, benchmark, report)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def assert_png() -> Callable[[Path], None]:
    """Check that a path is a PNG file (by its magic bytes)."""

    def check(path: Path) -> None:
        assert path.is_file(), path
        assert path.read_bytes()[:8] == PNG_MAGIC, path

    return check
