"""Where a run ran: the machine and software behind its numbers (``provenance.json``).

Float results differ in the last bits between CPUs (torch picks its CPU kernels by the
processor's features) and rounds of training amplify that into points of accuracy, so
every run folder records:

* ``cpu``: the CPU model and the flags that select kernels (:data:`KERNEL_FLAGS`, read from
  ``/proc/cpuinfo`` when present, else only :mod:`platform`'s processor name), and torch's
  CPU capability (``torch.backends.cpu.get_cpu_capability()``: the kernel path in use,
  which ``ATEN_CPU_CAPABILITY`` can lower);
* ``gpu``: the GPU's name when the run's device is a GPU (``None`` on the CPU);
* ``threads``, ``python``, ``platform``, ``arch`` and ``versions`` (torch, transformers,
  numpy, flwr when installed, fedalign);
* ``machine``: a short identifier (SHA-256 of the CPU model, kernel flags, torch capability
  and GPU name), ``machine_label`` (``"AMD EPYC, AVX2 kernels"``) and ``software`` (SHA-256
  of the versions and Python's);
* ``sessions``: one entry per process that ran rounds of the run (``from_round``, its
  ``machine``, label and software, when it started): a run resumed on another machine keeps
  the first one, and ``spans_machines`` / ``note`` say so.

The top-level fields describe the latest session. The configuration never holds any of
this: a run that differs only by machine is the same experiment.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import fedalign

CPUINFO = Path("/proc/cpuinfo")
"""Where Linux describes the processor."""

KERNEL_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "asimdhp",
    "asimddp",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)
"""CPU flags (x86 ``flags``, ARM ``Features``) that decide which kernels torch and its BLAS
run; the others (sse, aes, ...) do not change results and are left out."""

PACKAGES = ("torch", "transformers", "numpy", "flwr")
"""Packages whose versions are recorded (those installed); fedalign's own is added."""

UNKNOWN_MACHINE = "unknown"
"""The machine of a run recorded before provenance existed."""

UNKNOWN_LABEL = "unknown (recorded before provenance)"
"""Its label."""

FILE_NAME = "provenance.json"
"""The file in the run folder."""


def _short_hash(payload: object) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """The CPU model and its :data:`KERNEL_FLAGS` from the text of ``/proc/cpuinfo``.

    The model is x86's ``model name``, else ARM's ``Model name`` / ``Hardware`` / ``Model``,
    else ``ARM implementer <I> part <P>``; empty when none is there. Flags come from the first
    ``flags`` (x86) or ``Features`` (ARM) line, in :data:`KERNEL_FLAGS` order.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() not in fields:
            fields[key.strip().lower()] = value.strip()
    model = next((fields[k] for k in ("model name", "hardware", "model") if fields.get(k)), "")
    if not model and fields.get("cpu implementer"):
        model = f"ARM implementer {fields['cpu implementer']} part {fields.get('cpu part', '?')}"
    present = set((fields.get("flags") or fields.get("features") or "").split())
    return model, [flag for flag in KERNEL_FLAGS if flag in present]


def cpu_description(cpuinfo: Path | None = None) -> dict[str, Any]:
    """``model``, ``kernel_flags``, ``torch_capability`` and ``source`` of this CPU.

    ``source`` is the path read (``cpuinfo``, default :data:`CPUINFO`), or ``"platform"``
    when it cannot be read (no flags then: the model is :func:`platform.processor` or the
    architecture's name).
    """
    cpuinfo = CPUINFO if cpuinfo is None else cpuinfo
    try:
        model, flags = parse_cpuinfo(cpuinfo.read_text(errors="replace"))
        source = str(cpuinfo)
    except OSError:
        model, flags, source = "", [], "platform"
    if not model:
        model = platform.processor() or platform.machine() or "unknown CPU"
    return {
        "model": model,
        "kernel_flags": flags,
        "torch_capability": torch_capability(),
        "source": source,
    }


def torch_capability() -> str:
    """torch's CPU kernel path (``AVX2``, ``AVX512``, ``DEFAULT``, ...; ``unknown`` when this
    torch cannot say)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def gpu_name(device: str) -> str | None:
    """The name of the GPU ``device`` (``run.device``) runs on; None for the CPU, or when
    no GPU is visible (``auto`` then runs on the CPU)."""
    if device == "cpu" or not torch.cuda.is_available():
        return None
    index = int(device.split(":", 1)[1]) if device.startswith("cuda:") else None
    return str(torch.cuda.get_device_name(index))


def package_versions() -> dict[str, str]:
    """Versions of :data:`PACKAGES` that are installed, and fedalign's."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    versions["fedalign"] = fedalign.__version__
    return versions


def machine_id(cpu: Mapping[str, Any], gpu: str | None) -> str:
    """12 hex digits of SHA-256 over the CPU model, kernel flags, torch capability and GPU."""
    return _short_hash(
        {
            "model": cpu.get("model"),
            "kernel_flags": list(cpu.get("kernel_flags", [])),
            "torch_capability": cpu.get("torch_capability"),
            "gpu": gpu,
        }
    )


def machine_label(cpu: Mapping[str, Any], gpu: str | None) -> str:
    """``"AMD EPYC, AVX2 kernels"`` (``", GPU <name>"`` appended on a GPU)."""
    label = f"{cpu.get('model', 'unknown CPU')}, {cpu.get('torch_capability', '?')} kernels"
    return f"{label}, GPU {gpu}" if gpu else label


def software_id(versions: Mapping[str, str], python: str) -> str:
    """12 hex digits of SHA-256 over the package versions and Python's."""
    return _short_hash({"versions": dict(versions), "python": python})


def describe_environment(device: str = "cpu", transport: str = "simulator") -> dict[str, Any]:
    """This process's machine and software (the top level of ``provenance.json``).

    Parameters
    ----------
    device : str, default "cpu"
        ``run.device``: a GPU's name is recorded only when the run uses one.
    transport : str, default "simulator"
        ``simulator`` (every client trained here) or ``flower`` (the ServerApp's machine:
        aggregation and evaluation; clients train on their SuperNodes).
    """
    cpu = cpu_description()
    gpu = gpu_name(device)
    versions = package_versions()
    python = platform.python_version()
    return {
        "machine": machine_id(cpu, gpu),
        "machine_label": machine_label(cpu, gpu),
        "software": software_id(versions, python),
        "cpu": cpu,
        "gpu": gpu,
        "device": device,
        "transport": transport,
        "threads": torch.get_num_threads(),
        "python": python,
        "platform": platform.platform(),
        "arch": platform.machine(),
        "versions": versions,
    }


def current_machine(device: str = "cpu") -> tuple[str, str]:
    """(machine id, label) of this process for a run on ``device`` (``run.device``)."""
    cpu = cpu_description()
    gpu = gpu_name(device)
    return machine_id(cpu, gpu), machine_label(cpu, gpu)


def _session(record: Mapping[str, Any], from_round: int, started: str) -> dict[str, Any]:
    return {
        "from_round": from_round,
        "machine": record.get("machine", UNKNOWN_MACHINE),
        "machine_label": record.get("machine_label", UNKNOWN_LABEL),
        "software": record.get("software"),
        "started": started,
    }


def start_session(
    previous: Mapping[str, Any] | None,
    environment: Mapping[str, Any],
    from_round: int,
    started: str,
) -> dict[str, Any]:
    """The provenance record of a run whose session from ``from_round`` runs here.

    Parameters
    ----------
    previous : mapping or None
        The folder's record before this session (None: none was written).
    environment : mapping
        :func:`describe_environment` of this process.
    from_round : int
        The first round this session runs (1 for a fresh run).
    started : str
        When the session started (ISO time).

    Returns
    -------
    dict
        ``environment`` with ``sessions``: the previous record's sessions that started
        before ``from_round`` (a session that never finished a round is dropped), an
        ``unknown`` one from round 1 when a resumed run has no earlier record, then this one;
        ``machines`` (distinct, in order), ``spans_machines`` and, when it does, a ``note``.
    """
    earlier: list[dict[str, Any]] = []
    if from_round > 1:
        kept = [dict(s) for s in (previous or {}).get("sessions", [])]
        earlier = [s for s in kept if int(s.get("from_round", 1)) < from_round]
        if not earlier:
            earlier = [_session({}, 1, "")]
    return with_sessions(environment, [*earlier, _session(environment, from_round, started)])


def with_sessions(
    record: Mapping[str, Any],
    sessions: Sequence[Mapping[str, Any]],
    last_round: int | None = None,
) -> dict[str, Any]:
    """``record`` with ``sessions`` and what follows from them: ``machines`` (distinct, in
    order), ``spans_machines`` and, when it does, a ``note`` (:func:`spans_note`)."""
    machines = list(dict.fromkeys(str(s["machine"]) for s in sessions))
    result = {key: value for key, value in record.items() if key != "note"}
    result.update(
        sessions=[dict(s) for s in sessions], machines=machines, spans_machines=len(machines) > 1
    )
    if result["spans_machines"]:
        result["note"] = spans_note(sessions, last_round)
    return result


def finish_sessions(record: Mapping[str, Any], last_round: int) -> dict[str, Any]:
    """``record`` without the sessions that started after ``last_round`` (a resume of a run
    that had nothing left to run), keeping at least the first."""
    sessions = list(record.get("sessions", []))
    kept = [s for s in sessions if int(s.get("from_round", 1)) <= last_round] or sessions[:1]
    return with_sessions(record, kept, last_round)


def spans_note(sessions: Sequence[Mapping[str, Any]], last_round: int | None = None) -> str:
    """``"rounds 1-3 on A; rounds 4-6 on B"``: which machine ran which rounds (the last
    session's end is left open without ``last_round``)."""
    parts = []
    for index, session in enumerate(sessions):
        first = int(session["from_round"])
        end = int(sessions[index + 1]["from_round"]) - 1 if index + 1 < len(sessions) else None
        end = last_round if end is None else end
        last = "" if end is None else str(end)
        parts.append(f"rounds {first}-{last} on {session['machine_label']}")
    return "this run spans machines: " + "; ".join(parts)


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """The run folder's record: ``provenance.json``, else the ``provenance`` of its
    ``summary.json``; None when neither holds one (a run recorded before provenance) or the
    file is not valid JSON."""
    for name, key in ((FILE_NAME, None), ("summary.json", "provenance")):
        try:
            payload = json.loads((Path(folder) / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if key is not None:
            payload = payload.get(key) if isinstance(payload, dict) else None
        if isinstance(payload, dict) and payload.get("machine"):
            return payload
    return None


def recorded_machine(record: Mapping[str, Any] | None) -> tuple[str, str]:
    """(machine id, label) of a run's record, for grouping runs by machine.

    None gives (:data:`UNKNOWN_MACHINE`, :data:`UNKNOWN_LABEL`). A run that spans machines
    gets the ids joined by ``+`` and its labels joined by ``" then "``: it counts as a
    machine of its own, unlike either.
    """
    if record is None:
        return UNKNOWN_MACHINE, UNKNOWN_LABEL
    sessions = record.get("sessions") or [record]
    labels: dict[str, str] = {}
    for session in sessions:
        machine = str(session.get("machine", UNKNOWN_MACHINE))
        labels.setdefault(machine, str(session.get("machine_label", UNKNOWN_LABEL)))
    if len(labels) == 1:
        return next(iter(labels.items()))
    return "+".join(labels), " then ".join(labels.values()) + " (one run, resumed)"
