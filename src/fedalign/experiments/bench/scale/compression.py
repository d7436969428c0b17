"""Encodings of a round's update: bytes and reconstruction error, from a run folder."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedalign.config import ExperimentConfig
from fedalign.models.loading import load_moe_model

Tensor = torch.Tensor


@dataclass
class CompressionRow:
    """What one encoding of a round's update would cost and how well it reconstructs it."""

    encoding: str
    bytes: int
    ratio_to_float32: float
    relative_error: float  # |d_hat - d| / |d| over every trainable value
    max_abs_error: float


def _int8(delta: Tensor, per_row: bool) -> tuple[Tensor, int]:
    """Symmetric absmax int8 round trip of one tensor (per tensor or per row of dim 0)."""
    values = delta.float()
    if per_row and values.dim() >= 2:
        scale = values.abs().amax(dim=tuple(range(1, values.dim())), keepdim=True) / 127.0
        scales = int(values.shape[0])
    else:
        scale = values.abs().max() / 127.0
        scales = 1
    scale = scale.clamp(min=1e-30)
    restored = (values / scale).round().clamp(-127, 127) * scale
    return restored, values.numel() + 4 * scales


def delta_compression(
    initial: Mapping[str, Tensor], final: Mapping[str, Tensor], top_fraction: float = 0.1
) -> list[CompressionRow]:
    """Bytes and reconstruction error of encodings of the update ``final - initial``.

    ``float32 delta`` (the reference), ``bf16 delta``, ``int8 delta`` (absmax per tensor /
    per row, 4-byte scales counted), ``top-k delta`` (the ``top_fraction`` largest
    magnitudes per tensor as float32 value + int32 index, one shot: no error feedback) and
    ``bf16 full values`` (the new parameters in bf16, the update recovered as their difference
    with the float32 ``initial``).
    """
    names = sorted(final)
    deltas = {n: final[n].float() - initial[n].float() for n in names}
    norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in deltas.values()))
    count = sum(d.numel() for d in deltas.values())

    def row(encoding: str, restored: Mapping[str, Tensor], size: int) -> CompressionRow:
        squared = sum(
            float(((restored[n].double() - deltas[n].double()) ** 2).sum()) for n in names
        )
        worst = max(float((restored[n] - deltas[n]).abs().max()) for n in names)
        return CompressionRow(
            encoding,
            size,
            round(size / (4 * count), 4),
            float(f"{math.sqrt(squared) / max(norm, 1e-30):.4g}"),
            float(f"{worst:.4g}"),
        )

    rows = [row("float32 delta", deltas, 4 * count)]
    rows.append(row("bf16 delta", {n: d.bfloat16().float() for n, d in deltas.items()}, 2 * count))
    for per_row, label in ((False, "int8 delta (per tensor)"), (True, "int8 delta (per row)")):
        restored, size = {}, 0
        for name, delta in deltas.items():
            restored[name], nbytes = _int8(delta, per_row)
            size += nbytes
        rows.append(row(label, restored, size))
    restored, size = {}, 0
    for name, delta in deltas.items():
        keep = max(1, round(top_fraction * delta.numel()))
        flat = delta.reshape(-1)
        index = flat.abs().topk(keep).indices
        sparse = torch.zeros_like(flat)
        sparse[index] = flat[index]
        restored[name] = sparse.view_as(delta)
        size += 8 * keep
    rows.append(row(f"top-{top_fraction:.0%} delta (one shot)", restored, size))
    bf16_full = {n: final[n].bfloat16().float() - initial[n].float() for n in names}
    rows.append(row("bf16 full values", bf16_full, 2 * count))
    return rows


def compression_table(rows: Sequence[CompressionRow]) -> str:
    """Markdown table of :func:`delta_compression`'s rows."""
    header = (
        "| encoding | bytes | vs float32 | relative error | max abs error |\n"
        "|---|---|---|---|---|\n"
    )
    return header + "".join(
        f"| {r.encoding} | {r.bytes:,} | {r.ratio_to_float32:.3f} | {r.relative_error:.3g} | "
        f"{r.max_abs_error:.3g} |\n"
        for r in rows
    )


def run_folder_update(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(initial, final)`` global trainable parameters of a ``fedalign run`` folder.

    ``final`` is ``final_state.safetensors``; ``initial`` is rebuilt from the folder's
    ``config.toml`` (the model is seeded by ``federated.seed``, as :func:`prepare` loads it),
    with the classifier sized from the final state.
    """
    folder = Path(folder)
    config = ExperimentConfig.from_toml(folder / "config.toml")
    final = load_file(str(folder / "final_state.safetensors"))
    num_labels = 8
    for _ in range(2):
        model = load_moe_model(config.model, num_labels, seed=config.federated.seed)
        initial = model.trainable_state()
        wrong = [n for n in final if n in initial and initial[n].shape != final[n].shape]
        if not wrong:
            return initial, final
        num_labels = int(final[wrong[0]].shape[0])
    raise ValueError(f"cannot rebuild the initial model of {folder}: shapes differ")
