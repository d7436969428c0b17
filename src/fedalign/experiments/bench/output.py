"""Result files of the bench suites (a page, its rows as JSON, the command that made them),
and interleaved repeated runs of one configuration."""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedalign.config import ExperimentConfig
from fedalign.experiments.bench.registry import BenchRequest

RunResult = dict[str, Any]


def write_page(folder: Path, stem: str, page: str, data: Any) -> None:
    """``<stem>.md`` (the page) and ``<stem>.json`` (``data``, indented) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text(page)
    (folder / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")


def append_command(folder: Path, command: str, seconds: float, note: str = "") -> None:
    """Append ``command`` to ``folder/COMMAND.txt`` with when it finished, how long it took,
    the machine and ``note``; a blank line ends the entry."""
    finished = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "COMMAND.txt").open("a", encoding="utf-8") as handle:
        handle.write(
            f"{command}\nfinished {finished} after {seconds:.0f} s; {machine}"
            + (f"; {note}" if note else "")
            + "\n\n"
        )


def write_results(
    request: BenchRequest, stem: str, page: str, data: Any, started: float, note: str = ""
) -> None:
    """With ``--out-dir``: :func:`write_page` there and :func:`append_command` (the request's
    command, ``time.time() - started`` seconds, ``note``); without it, nothing."""
    if request.options.get("out_dir") is None:
        return
    folder = Path(request.options["out_dir"])
    write_page(folder, stem, page, data)
    append_command(folder, request.command, time.time() - started, note)


def interleaved_runs(
    config: ExperimentConfig,
    settings: Sequence[Any],
    repeats: int,
    run: Callable[[Any, Path, Path], RunResult],
    describe: Callable[[RunResult], str],
    log: Callable[[str], None],
) -> list[RunResult]:
    """``repeats`` passes over ``settings``, one ``run(setting, config_file, work)`` each.

    ``config`` is saved once as ``config_file`` in a temporary folder; ``work`` is a fresh
    folder of it per pass. Each result gets its ``repeat`` and is logged with ``describe``.
    Interleaving lets each repeat see the machine's load in turn.
    """
    results = []
    with tempfile.TemporaryDirectory(prefix="fedalign-bench-") as folder:
        config_file = Path(folder) / "config.toml"
        config.save(config_file)
        for repeat in range(repeats):
            for setting in settings:
                result = run(setting, config_file, Path(folder) / f"r{repeat}")
                result["repeat"] = repeat
                log(describe(result))
                results.append(result)
    return results
