"""Where a model runs and in which precision: ``run.device`` and ``run.precision``.

:func:`resolve_device` turns ``cpu | auto | cuda | cuda:N`` into a :class:`torch.device`
(``auto``: a GPU when one is visible), :func:`resolve_precision` turns
``fp32 | bf16 | auto`` into the autocast dtype (``None`` for float32) and
:func:`autocast` is the context every forward pass runs in. bfloat16 runs as autocast
(mixed precision): parameters, gradients and AdamW state stay float32, so what a client
uploads and what the server aggregates keep their dtype, and no loss scaling is needed.

Seeding: ``torch.manual_seed`` seeds the CPU and every CUDA generator, so dropout and
initialisation repeat on a GPU. Bitwise-repeatable GPU *kernels* are a separate matter:
scatter/index-add reductions (the MoE expert dispatch), some cuBLAS paths and atomics-based
backward passes are nondeterministic unless :func:`set_deterministic` is on
(``run.deterministic``), and a few ops have no deterministic CUDA kernel at all (torch
then warns, naming the op). CPU runs are deterministic either way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from fedalign.config import ConfigError, check_device_name

Device = torch.device


def resolve_device(name: str) -> Device:
    """The :class:`torch.device` ``run.device`` names.

    Parameters
    ----------
    name : str
        ``cpu``, ``auto`` (``cuda`` when ``torch.cuda.is_available()``, else ``cpu``),
        ``cuda`` or ``cuda:N``.

    Returns
    -------
    torch.device

    Raises
    ------
    ConfigError
        For a malformed name, or a GPU that is not there (naming the GPUs visible).
    """
    check_device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda") if available else torch.device("cpu")
    count = torch.cuda.device_count() if available else 0
    index = int(name.split(":", 1)[1]) if ":" in name else 0
    if index >= count:
        visible = [f"cuda:{i}" for i in range(count)]
        raise ConfigError(
            f"run.device {name!r} is not available (visible GPUs: {visible or 'none'}); "
            "accepted here: ['cpu', 'auto']" + (f" or one of {visible}" if visible else "")
        )
    return torch.device(name)


def bf16_supported(device: Device) -> bool:
    """Whether bfloat16 autocast runs on ``device`` (CPU: always; CUDA: Ampere or newer)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu"


def resolve_precision(name: str, device: Device) -> torch.dtype | None:
    """The autocast dtype of ``run.precision`` on ``device`` (``None``: plain float32).

    Parameters
    ----------
    name : str
        ``fp32``; ``bf16`` (bfloat16 autocast; on a CPU it runs, slowly unless the CPU has
        bfloat16 instructions); ``auto`` (``bf16`` on a GPU that supports it, else ``fp32``).
    device : torch.device

    Raises
    ------
    ConfigError
        For an unknown name, or ``bf16`` on a device without bfloat16 support.
    """
    if name == "fp32":
        return None
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and bf16_supported(device) else None
    if name == "bf16":
        if not bf16_supported(device):
            raise ConfigError(
                f"run.precision 'bf16' is not supported on {device} (a GPU older than Ampere "
                "has no bfloat16); accepted here: ['fp32', 'auto']"
            )
        return torch.bfloat16
    raise ConfigError(f"run.precision must be one of ['fp32', 'bf16', 'auto'] (got {name!r})")


@contextlib.contextmanager
def autocast(device: Device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device``; nothing at all when ``dtype`` is None (float32
    runs execute exactly the operations they always did)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def set_deterministic(enabled: bool) -> None:
    """``run.deterministic``: ask torch for deterministic kernels (warn where none exists).

    Sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when unset (cuBLAS needs it for repeatable
    results; it must be set before the first cuBLAS call). Off: nothing changes.
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
