"""Write (or check) ``[tool.flwr.app.config]`` in pyproject.toml from the config dataclasses.

Flower only accepts ``--run-config`` overrides of keys listed in pyproject.toml, so every
key of :class:`fedalign.config.ExperimentConfig` (and the Flower options) is listed there,
with the dataclasses' defaults: one source of defaults, so ``fedalign run`` and ``flwr run
.`` run the same experiment. ``tests/flower/test_messages.py`` fails when the two differ.

Usage::

    python scripts/flower_run_config.py --write   # regenerate the section
    python scripts/flower_run_config.py           # exit 1 if it is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedalign.config import ExperimentConfig, toml_value
from fedalign.flower.messages import FlowerOptions, run_config_from_config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
HEADER = "[tool.flwr.app.config]"


def section_text() -> str:
    """The section as it should be: every key with its default."""
    flat = run_config_from_config(ExperimentConfig(), FlowerOptions())
    lines = [HEADER] + [f"{key} = {toml_value(value)}" for key, value in flat.items()]
    return "\n".join(lines) + "\n"


def rewritten(text: str) -> str:
    """``text`` (pyproject.toml) with the section replaced; it must be the file's last table."""
    start = text.index(HEADER)
    rest = text[start + len(HEADER) :]
    if "\n[" in rest:
        raise SystemExit(f"{HEADER} must be the last table of pyproject.toml")
    return text[:start] + section_text()


def main(argv: list[str]) -> int:
    text = PYPROJECT.read_text()
    wanted = rewritten(text)
    if "--write" in argv:
        PYPROJECT.write_text(wanted)
        return 0
    if wanted != text:
        print(f"{HEADER} in pyproject.toml is out of date: run {Path(__file__).name} --write")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
