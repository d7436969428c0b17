"""Loading a run folder for ``fedalign report``: its records, or the run folders below one."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedalign.config import ConfigError, run_label
from fedalign.records import read_jsonl

REPORT_FOLDER = "report"
"""Sub-folder of the run folder that receives the report."""


@dataclass
class RunRecords:
    """Everything the report reads from one run folder."""

    folder: Path
    metrics: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    routing: list[dict[str, Any]]
    summary: dict[str, Any] | None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def strategy(self) -> str:
        if self.summary and self.summary.get("strategy"):
            return str(self.summary["strategy"])
        strategy = self.config.get("strategy", {})
        return run_label(str(strategy.get("name", "?")), str(strategy.get("ablation", "full")))

    @property
    def layers(self) -> list[str]:
        """MoE layer names, in the order the records list them."""
        for rows, key in (
            (self.routing, "layers"),
            (self.decisions, "layers"),
            (self.metrics, "routing_divergence"),
        ):
            for row in rows:
                layers = row.get(key)
                if isinstance(layers, Mapping) and layers:
                    return list(layers)
        return []


def is_run_folder(folder: Path) -> bool:
    """A run folder has ``metrics.jsonl`` (and usually ``config.toml``)."""
    return (folder / "metrics.jsonl").is_file()


def load_run(folder: Path) -> RunRecords:
    """Read a run folder.

    Raises
    ------
    ConfigError
        When ``folder`` does not exist, is not a run folder or has no recorded round.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"report: {str(folder)!r} is not a folder")
    if not is_run_folder(folder):
        raise ConfigError(
            f"report: {str(folder)!r} is not a run folder (no metrics.jsonl); "
            "give the --out folder of 'fedalign run', 'compare' or 'benchmark'"
        )
    try:
        metrics = read_jsonl(folder / "metrics.jsonl")
        decisions = read_jsonl(folder / "decisions.jsonl")
        routing = read_jsonl(folder / "routing.jsonl")
    except json.JSONDecodeError as error:
        raise ConfigError(f"report: unreadable records in {str(folder)!r}: {error}") from error
    if not metrics:
        raise ConfigError(f"report: {str(folder)!r} has no finished round yet")
    summary = None
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
    config: dict[str, Any] = {}
    if (folder / "config.toml").is_file():
        try:
            with (folder / "config.toml").open("rb") as handle:
                config = tomllib.load(handle)
        except tomllib.TOMLDecodeError:
            config = {}
    return RunRecords(folder, metrics, decisions, routing, summary, config)


def find_run_folders(folder: Path) -> list[Path]:
    """Run folders at or below ``folder`` (sorted), skipping ``report`` folders."""
    if is_run_folder(folder):
        return [folder]
    return sorted(
        path.parent
        for path in folder.rglob("metrics.jsonl")
        if REPORT_FOLDER not in path.parent.relative_to(folder).parts
    )
