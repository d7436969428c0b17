"""Result files of the bench suites: a page, its rows as JSON, the command that made them."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any


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
