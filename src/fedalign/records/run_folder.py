"""A run folder: what every run, by any transport, leaves behind.

Layout::

    config.toml              the resolved configuration
    partition.md/.csv/.json  client x class counts
    layout.json              where routers and experts live
    metrics.jsonl            one line per round: accuracies, losses, seconds, bytes, divergences
    decisions.jsonl          one line per round: the strategy's decision record
    routing.jsonl            per round: clients x experts usage and routing, semantic similarity
    provenance.json          where it ran: CPU model and kernel flags, torch capability, GPU,
                             threads, versions; one session per machine that ran rounds
    summary.json             final numbers (and the provenance)
    final_state.safetensors  global trainable parameters after the last round
    checkpoint/state.pt      the last finished round (written atomically), for resuming
    convergence.png          accuracy and loss per round

:class:`RunFolder` turns :class:`~fedalign.federation.RoundOutcome` objects into these
lines; the simulator and the Flower ServerApp both write through it.

A folder that holds a run (a ``config.toml`` or ``metrics.jsonl``) is never replaced
silently: :func:`claim_run_folder` refuses it unless the caller resumes or overwrites. The
checkpoint records the package version and :func:`config_fingerprint`, and
:meth:`RunFolder.resume` refuses a checkpoint written by an incompatible version or for a
different configuration, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedalign
from fedalign.config import ExperimentConfig
from fedalign.data import PartitionReport
from fedalign.errors import RunFolderError
from fedalign.federation import RoundOutcome
from fedalign.moe.layout import MoELayout
from fedalign.protocol import RoutingStatistics
from fedalign.records.diagnostics import merge_diagnostics
from fedalign.records.files import RunRecorder, save_state
from fedalign.records.plots import plot_convergence
from fedalign.records.provenance import (
    describe_environment,
    finish_sessions,
    read_provenance,
    start_session,
)
from fedalign.routing import routing_divergence, semantic_dispersion

Tensor = torch.Tensor

RUN_MARKERS = ("config.toml", "metrics.jsonl")
"""Files whose presence means a folder holds a run."""

REPLACED_ON_OVERWRITE = (
    "checkpoint",
    "summary.json",
    "provenance.json",
    "final_state.safetensors",
    "convergence.png",
    "report",
)
"""What ``--overwrite`` deletes besides the JSON-lines records (which are emptied)."""


# ----------------------------------------------------------------- folder guard
def run_marker(folder: Path) -> str | None:
    """The first of :data:`RUN_MARKERS` present in ``folder`` (None: it holds no run)."""
    folder = Path(folder)
    return next((name for name in RUN_MARKERS if (folder / name).exists()), None)


def claim_run_folder(
    folder: Path, *, resume: bool = False, overwrite: bool = False, command: str = "run"
) -> None:
    """Refuse to write a run into a folder that holds another one.

    Parameters
    ----------
    folder : Path
        The output folder (need not exist).
    resume : bool, default False
        The caller continues the run in ``folder`` from its checkpoint.
    overwrite : bool, default False
        The caller replaces the run in ``folder``.
    command : str, default "run"
        The command named in the message (``run``, ``compare``).

    Raises
    ------
    RunFolderError
        When both flags are given, or ``folder`` holds a run (a ``config.toml`` or
        ``metrics.jsonl``) and neither is.
    """
    if resume and overwrite:
        raise RunFolderError(f"fedalign {command}: give --resume or --overwrite, not both")
    marker = run_marker(folder)
    if marker is not None and not (resume or overwrite):
        raise RunFolderError(
            f"output folder {str(folder)!r} already holds a run ({marker} found); give "
            "--resume to continue it from its checkpoint or --overwrite to replace it"
        )


# ------------------------------------------------------------ resume identity
NOT_IDENTITY = ("federated.rounds",)
"""Keys outside the ``[run]`` section that a resume may change (it may extend the rounds)."""

NUMERIC_RUN_KEYS = {"precision": "fp32", "frozen-dtype": "fp32"}
"""``[run]`` keys that change a run's numbers, with their defaults: part of a run's identity
when set to anything else (so runs and checkpoints made before they existed keep theirs)."""


def numeric_run_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The :data:`NUMERIC_RUN_KEYS` of ``config`` that differ from their default, as
    ``run.<key>``: the only part of the ``[run]`` section that makes two runs differ."""
    values = config.to_dict().get("run", {})
    return {
        f"run.{key}": values.get(key, default)
        for key, default in NUMERIC_RUN_KEYS.items()
        if values.get(key, default) != default
    }


def config_identity(config: ExperimentConfig) -> dict[str, Any]:
    """``config.to_dict()`` without the ``[run]`` section (but with its
    :func:`numeric_run_settings`) and ``federated.rounds``, flat.

    Two configurations with the same identity produce the same rounds, so a checkpoint of
    one can be resumed with the other (a bf16 checkpoint is not resumed in fp32).
    """
    flat = {
        f"{section}.{key}": value
        for section, values in config.to_dict().items()
        if section != "run"
        for key, value in values.items()
    }
    for key in NOT_IDENTITY:
        flat.pop(key, None)
    flat.update(numeric_run_settings(config))
    return flat


def config_fingerprint(config: ExperimentConfig) -> str:
    """SHA-256 of :func:`config_identity` (sorted JSON)."""
    text = json.dumps(config_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _release(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def versions_compatible(saved: str, current: str) -> bool:
    """Whether a checkpoint of version ``saved`` resumes under ``current``: same
    ``major.minor`` (0.1.0 and 0.1.3 are compatible, 0.1.x and 0.2.0 are not)."""
    return _release(saved) == _release(current)


def check_resumable(
    payload: Mapping[str, Any], config: ExperimentConfig, folder: Path | str = ""
) -> None:
    """Raise :class:`RunFolderError` unless ``payload`` (a checkpoint) fits ``config``.

    Parameters
    ----------
    payload : mapping
        The checkpoint, with ``fedalign_version``, ``config_fingerprint`` and
        ``config_identity`` (written by :meth:`RunFolder.save_checkpoint`).
    config : ExperimentConfig
        The configuration of the resumed run.
    folder : Path or str, default ""
        Named in the messages.

    Raises
    ------
    RunFolderError
        When the checkpoint records no version, an incompatible version
        (:func:`versions_compatible`) or another configuration; the message names the
        versions or every differing key with both values.
    """
    where = f"checkpoint in {str(folder)!r}"
    saved_version = payload.get("fedalign_version")
    current = fedalign.__version__
    if saved_version is None:
        raise RunFolderError(
            f"{where} records no fedalign version (written before version checks); it "
            "cannot be resumed safely, give --overwrite to start again"
        )
    if not versions_compatible(str(saved_version), current):
        raise RunFolderError(
            f"{where} was written by fedalign {saved_version}, incompatible with this "
            f"fedalign {current} (major.minor must agree); give --overwrite to start again"
        )
    if payload.get("config_fingerprint") == config_fingerprint(config):
        return
    saved = dict(payload.get("config_identity") or {})
    current_identity = config_identity(config)
    differences = [
        f"{key}: checkpoint {saved.get(key, '<absent>')!r}, now "
        f"{current_identity.get(key, '<absent>')!r}"
        for key in sorted(set(saved) | set(current_identity))
        if saved.get(key, "<absent>") != current_identity.get(key, "<absent>")
    ]
    detail = "; ".join(differences) if differences else "fingerprints differ"
    raise RunFolderError(
        f"{where} was written for another configuration ({detail}); resume with the "
        "same settings (only federated.rounds and [run] may change) or give --overwrite"
    )


def peak_memory_mib() -> float:
    """Peak resident memory of this process (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def routing_snapshot(
    server_round: int, client_ids: Sequence[int], statistics: Sequence[RoutingStatistics]
) -> dict[str, Any]:
    """Per layer: clients x experts usage and routing distribution, and per expert the
    clients x clients cosine similarity of their mean routed hidden states."""
    layers: dict[str, Any] = {}
    names = sorted({name for stats in statistics for name in stats})
    for name in names:
        present = [s[name] for s in statistics if name in s]
        hidden = torch.stack([s.mean_hidden for s in present])  # (C, E, H)
        unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
        similarity = torch.einsum("ceh,deh->ecd", unit, unit)  # (E, C, C)
        layers[name] = {
            "usage": torch.stack([s.usage for s in present]),
            "routing_distribution": torch.stack([s.routing_distribution for s in present]),
            "semantic_similarity": similarity,
        }
    return {"round": server_round, "clients": list(client_ids), "layers": layers}


@dataclass
class RunSummary:
    """The headline numbers of a finished run (``summary.json``).

    ``final_accuracy`` is the last evaluated round's; no round is chosen on the test set.
    The three local-accuracy figures are taken over the same ``local_clients_evaluated``
    clients (:func:`fedalign.federation.evaluate_global`).
    ``final_validation_accuracy`` (the same round, on the server's validation set) is
    present only in runs with ``data.validation-examples`` > 0 (absent from
    ``summary.json`` otherwise). ``provenance`` is the run's ``provenance.json``
    (:mod:`fedalign.records.provenance`; absent when the folder was never set up).
    """

    strategy: str
    rounds: int
    final_accuracy: float
    final_loss: float
    mean_local_accuracy: float
    worst_local_accuracy: float
    local_accuracy_p10: float
    seconds: float
    seconds_per_round: float
    bytes_sent: int
    bytes_received: int
    peak_memory_mib: float
    accuracy_curve: list[float] = field(default_factory=list)
    out_dir: str = ""
    final_validation_accuracy: float | None = None
    local_clients_evaluated: int | None = None
    provenance: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        values = dict(self.__dict__)
        for optional in ("final_validation_accuracy", "local_clients_evaluated", "provenance"):
            if values[optional] is None:
                del values[optional]
        return values


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


class RunFolder:
    """Writes one run's folder and keeps its running totals.

    Parameters
    ----------
    folder : Path
    label : str
        The run's label (``fedalign-<ablation>`` style, :func:`fedalign.config.run_label`).
    """

    def __init__(self, folder: Path, label: str) -> None:
        self.recorder = RunRecorder(Path(folder))
        self.folder = self.recorder.folder
        self.label = label
        self.elapsed = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.completed_rounds = 0
        self.config: ExperimentConfig | None = None
        self.provenance: dict[str, Any] | None = None
        self.class_counts: list[list[int]] = []

    # ------------------------------------------------------------------ setup
    def write_setup(
        self,
        config: ExperimentConfig,
        report: PartitionReport,
        layout: MoELayout,
        transport: str = "simulator",
    ) -> None:
        """Write the configuration, partition, layout and ``provenance.json`` (this
        process's machine as a session from the next round, after the sessions of a resumed
        run: :func:`~fedalign.records.provenance.start_session`); later checkpoints record
        the configuration's fingerprint. ``transport``: ``simulator`` or ``flower``."""
        self.config = config
        self.provenance = start_session(
            read_provenance(self.folder) if self.completed_rounds else None,
            describe_environment(config.run.device, transport),
            self.completed_rounds + 1,
            datetime.now().isoformat(timespec="seconds"),
        )
        self.recorder.write_json("provenance.json", self.provenance)
        self.class_counts = report.counts.tolist()
        self.recorder.write_text("config.toml", config.to_toml())
        self.recorder.write_text("partition.md", report.to_markdown() + "\n")
        self.recorder.write_text("partition.csv", report.to_csv())
        self.recorder.write_json("partition.json", report.to_dict())
        self.recorder.write_json("layout.json", layout.to_dict())

    def start_fresh(self) -> None:
        """Forget every round and delete the checkpoint and final files (a new run here)."""
        for name in REPLACED_ON_OVERWRITE:
            path = self.folder / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self.recorder.truncate(0)

    def resume(self, config: ExperimentConfig | None = None) -> dict[str, Any] | None:
        """The checkpoint's payload, with the records cut back to its round (None: none).

        Parameters
        ----------
        config : ExperimentConfig or None, default None
            When given, the checkpoint must fit it (:func:`check_resumable`).

        Raises
        ------
        RunFolderError
            When the checkpoint does not fit ``config`` (nothing is changed then).
        """
        payload = self.recorder.load_checkpoint()
        if payload is None:
            self.recorder.truncate(0)
            return None
        if config is not None:
            check_resumable(payload, config, self.folder)
        self.completed_rounds = int(payload["round"])
        self.elapsed = float(payload["elapsed"])
        self.bytes_sent = int(payload["bytes_sent"])
        self.bytes_received = int(payload["bytes_received"])
        self.recorder.truncate(self.completed_rounds)
        return payload

    def add_routing(self, snapshot: Mapping[str, Any]) -> None:
        self.recorder.add_routing(snapshot)

    # ----------------------------------------------------------------- rounds
    def record_round(self, outcome: RoundOutcome, strategy_name: str) -> dict[str, Any]:
        """Append the round's metrics, decision and routing lines; returns the metrics line."""
        results = outcome.results
        statistics = [r.routing_statistics for r in results]
        line: dict[str, Any] = {
            "round": outcome.server_round,
            "clients": list(outcome.selected),
            "train_loss": float(np.mean([r.metrics["task_loss"] for r in results])),
            "routing_loss": float(np.mean([r.metrics["routing_loss"] for r in results])),
        }
        if outcome.evaluation is not None:
            line.update(outcome.evaluation)
        else:
            line.update({"global_accuracy": None, "global_loss": None})
        line["routing_divergence"] = routing_divergence(statistics, None)
        line["semantic_dispersion"] = semantic_dispersion(statistics)
        per_client = outcome.bytes_per_client
        round_sent = sum(v["sent"] for v in per_client.values())
        round_received = sum(v["received"] for v in per_client.values())
        self.bytes_sent += round_sent
        self.bytes_received += round_received
        seconds = time.perf_counter() - outcome.started
        self.elapsed += seconds
        line.update(
            {
                "seconds": seconds,
                "train_seconds": outcome.train_seconds,
                "aggregation_seconds": outcome.aggregation_seconds,
                "bytes_sent": round_sent,
                "bytes_received": round_received,
                "bytes_per_client": {k: dict(v) for k, v in per_client.items()},
                "client_state_bytes": outcome.client_state_bytes,
                **outcome.extra,
            }
        )
        decision = {
            "round": outcome.server_round,
            "strategy": strategy_name,
            **outcome.aggregation.record,
        }
        if self.class_counts:
            line["merge_diagnostics"] = merge_diagnostics(decision, self.class_counts)
        self.completed_rounds = outcome.server_round
        self.recorder.add_round(line, decision)
        self.recorder.add_routing(
            routing_snapshot(outcome.server_round, [r.client_id for r in results], statistics)
        )
        return line

    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Atomically save ``state`` (the federation's) with the folder's running totals,
        the package version and (after :meth:`write_setup`) the configuration's identity."""
        identity: dict[str, Any] = {"fedalign_version": fedalign.__version__}
        if self.config is not None:
            identity["config_fingerprint"] = config_fingerprint(self.config)
            identity["config_identity"] = config_identity(self.config)
        self.recorder.save_checkpoint(
            {
                **state,
                "elapsed": self.elapsed,
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
                **identity,
            }
        )

    # ----------------------------------------------------------------- finish
    def finish(self, global_parameters: Mapping[str, Tensor]) -> RunSummary:
        """``summary.json``, ``final_state.safetensors`` and ``convergence.png``."""
        rows = self.recorder.metrics
        evaluated = [r for r in rows if r.get("global_accuracy") is not None]
        final = evaluated[-1] if evaluated else {}
        if self.provenance is not None:
            self.provenance = finish_sessions(self.provenance, self.completed_rounds)
            self.recorder.write_json("provenance.json", self.provenance)
        summary = RunSummary(
            strategy=self.label,
            rounds=self.completed_rounds,
            final_accuracy=_number(final.get("global_accuracy")),
            final_loss=_number(final.get("global_loss")),
            mean_local_accuracy=_number(final.get("mean_local_accuracy")),
            worst_local_accuracy=_number(final.get("worst_local_accuracy")),
            local_accuracy_p10=_number(final.get("local_accuracy_p10")),
            seconds=self.elapsed,
            seconds_per_round=self.elapsed / max(self.completed_rounds, 1),
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            peak_memory_mib=peak_memory_mib(),
            accuracy_curve=[r["global_accuracy"] for r in evaluated],
            out_dir=str(self.folder),
            final_validation_accuracy=(
                None
                if final.get("validation_accuracy") is None
                else float(final["validation_accuracy"])
            ),
            local_clients_evaluated=final.get("local_clients_evaluated"),
            provenance=self.provenance,
        )
        save_state(self.folder / "final_state.safetensors", global_parameters)
        self.recorder.write_json("summary.json", summary.to_dict())
        plot_convergence(
            {summary.strategy: rows}, self.folder / "convergence.png", summary.strategy
        )
        return summary
