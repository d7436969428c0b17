"""Files of a run folder: atomic writes, JSON lines, safetensors, the checkpoint.

Layout of a run folder::

    config.toml            the resolved configuration
    partition.md / .csv / .json   client x class counts
    metrics.jsonl          one line per round: accuracies, losses, seconds, bytes, divergences
    decisions.jsonl        one line per round: the strategy's decision record
    provenance.json        where it ran (machine, kernel flags, versions, sessions)
    summary.json           final numbers
    final_state.safetensors  global trainable parameters after the last round
    checkpoint/            the last finished round (written atomically) for --resume
    convergence.png        accuracy and loss per round

Every write that a resume depends on goes to a temporary file first and is renamed into
place, so a crash mid-write never leaves a corrupt checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

Tensor = torch.Tensor


def to_jsonable(value: Any) -> Any:
    """Tensors become lists, NaN becomes None, tuples lists; everything else as is."""
    if isinstance(value, Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_state(path: Path, state: Mapping[str, Tensor]) -> None:
    """Save tensors as safetensors (contiguous CPU copies), atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary))
    os.replace(temporary, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file ([] when it is missing).

    A last line that does not parse (a write torn by a kill mid-append) is dropped; a bad
    line anywhere else raises ``json.JSONDecodeError``.
    """
    if not path.exists():
        return []
    lines = [line for line in path.read_text().split("\n") if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # torn last line
            raise
    return rows


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(to_jsonable(r)) + "\n" for r in rows))


class RunRecorder:
    """Writes one run folder.

    Parameters
    ----------
    folder : Path
        The run folder (created if missing).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics: list[dict[str, Any]] = read_jsonl(self.metrics_path)
        self.decisions: list[dict[str, Any]] = read_jsonl(self.decisions_path)
        self.routing: list[dict[str, Any]] = read_jsonl(self.routing_path)

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.jsonl"

    @property
    def decisions_path(self) -> Path:
        return self.folder / "decisions.jsonl"

    @property
    def routing_path(self) -> Path:
        return self.folder / "routing.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / "checkpoint" / "state.pt"

    def truncate(self, last_round: int) -> None:
        """Forget rounds after ``last_round`` (a resume continues from the checkpoint)."""
        self.metrics = [m for m in self.metrics if int(m["round"]) <= last_round]
        self.decisions = [d for d in self.decisions if int(d["round"]) <= last_round]
        # routing snapshots include round 0 (the initial model): keep it on resume
        keep_routing = last_round if last_round > 0 else -1
        self.routing = [r for r in self.routing if int(r["round"]) <= keep_routing]
        write_jsonl(self.metrics_path, self.metrics)
        write_jsonl(self.decisions_path, self.decisions)
        write_jsonl(self.routing_path, self.routing)

    def add_round(self, metrics: Mapping[str, Any], decision: Mapping[str, Any]) -> None:
        self.metrics.append(dict(to_jsonable(metrics)))
        self.decisions.append(dict(to_jsonable(decision)))
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps(self.metrics[-1]) + "\n")
        with self.decisions_path.open("a") as stream:
            stream.write(json.dumps(self.decisions[-1]) + "\n")

    def add_routing(self, snapshot: Mapping[str, Any]) -> None:
        self.routing.append(dict(to_jsonable(snapshot)))
        with self.routing_path.open("a") as stream:
            stream.write(json.dumps(self.routing[-1]) + "\n")

    def save_checkpoint(self, payload: Mapping[str, Any]) -> None:
        """Atomically replace the checkpoint (torch.save of tensors and plain values)."""
        path = self.checkpoint_path
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save(dict(payload), temporary)
        os.replace(temporary, path)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.exists():
            return None
        payload: dict[str, Any] = torch.load(self.checkpoint_path, weights_only=False)
        return payload

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_text(self.folder / name, json.dumps(to_jsonable(data), indent=2) + "\n")

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.folder / name, text)
