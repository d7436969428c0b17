"""Compressed uploads: a client's update (its parameters minus the round's global ones) as
bf16, int8 or top-k sparse tensors, with error feedback.

``federated.upload-compression`` picks the method (``none``, the default, uploads full
float32 parameters exactly as before):

``bf16``
    The delta rounded to bfloat16 (round to nearest even): 2 bytes a value. Error per
    value at most ``2^-8 |d|`` (8 significant bits) for normal numbers.
``int8``
    Symmetric absmax quantisation with one float32 scale per row (the tensor viewed as
    ``(R, C)``, ``C`` its last dimension; a vector is one row): ``q = round(d / s)``,
    ``s = max |row| / 127``; 1 byte a value plus 4 bytes a row. Error per value at most
    ``s / 2 = max |row| / 254``. Per row rather than per tensor because a tensor's rows
    move at very different sizes (a fused expert tensor ``(E, 2I, H)`` holds every
    expert; an expert that saw no token has a zero update): one scale per tensor lets the
    largest row flatten the small ones to zero. A row of MiniLM's experts is
    ``C = 384`` values, so the scales cost about 1%.
``topk``
    The ``federated.topk-fraction`` largest magnitudes of each tensor
    (``k = max(1, round(fraction * numel))``), as int32 indices into the flattened tensor
    and float32 values: 8 bytes a kept value.

Error feedback (Seide et al. 2014; Karimireddy et al., "Error Feedback Fixes SignSGD",
ICML 2019), ``federated.error-feedback``: each client keeps the residual ``r`` (what
compression dropped) and adds it to its next delta: ``e = d + r``, upload ``C(e)``, keep
``r' = e - D(C(e))``. Over rounds, what was sent plus the final residual equals the sum of
the true deltas, so nothing is lost for good, only delayed.

Pure functions: :func:`compress_tensor` / :func:`decompress_tensor` for one tensor,
:func:`compress_update` (with feedback) for a client's state, :func:`restore_parameters`
for the server (global + decompressed delta, in the global dtypes). What travels is a
:class:`~fedalign.protocol.CompressedTensor` per tensor; its bytes (``tensor_bytes``) are
the payload's real size.

Shapes: ``R`` rows, ``C`` last dimension, ``k`` kept values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedalign.config import UPLOAD_COMPRESSIONS as COMPRESSIONS
from fedalign.protocol import CompressedTensor

Tensor = torch.Tensor

INT8_LEVELS = 127
"""Largest int8 magnitude used (symmetric: -127..127)."""


def topk_count(numel: int, fraction: float) -> int:
    """Values kept by ``topk`` of a tensor of ``numel`` values: ``max(1, round(f * n))``."""
    if numel == 0:
        return 0
    return min(numel, max(1, round(fraction * numel)))


def row_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(R, C)`` of a tensor of ``shape`` for ``int8``: ``C`` the last dimension (a scalar
    or a vector is one row)."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return math.prod(shape[:-1]), shape[-1]


def compress_tensor(tensor: Tensor, method: str, fraction: float = 0.1) -> CompressedTensor:
    """One float tensor in the ``method``'s parts (see the module docstring).

    Parameters
    ----------
    tensor : Tensor
        Any shape; read as float32.
    method : str
        ``"bf16"``, ``"int8"`` or ``"topk"``.
    fraction : float, default 0.1
        ``topk`` only: the fraction of values kept.

    Raises
    ------
    ValueError
        For an unknown method.
    """
    values = tensor.detach().float()
    shape = tuple(int(s) for s in values.shape)
    if method == "bf16":
        return CompressedTensor("bf16", shape, {"values": values.to(torch.bfloat16)})
    if method == "int8":
        rows = values.reshape(row_shape(shape))  # (R, C)
        # (R,); an empty tensor has no maximum
        scale = rows.abs().amax(dim=1) / INT8_LEVELS if rows.numel() else torch.zeros(rows.shape[0])
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        quantised = (rows / safe[:, None]).round().clamp(-INT8_LEVELS, INT8_LEVELS)
        return CompressedTensor(
            "int8", shape, {"values": quantised.to(torch.int8), "scale": scale.contiguous()}
        )
    if method == "topk":
        flat = values.reshape(-1)
        keep = topk_count(flat.numel(), fraction)
        indices = flat.abs().topk(keep).indices.sort().values  # (k,)
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        return CompressedTensor(
            "topk",
            shape,
            {"indices": indices.to(index_dtype), "values": flat[indices].contiguous()},
        )
    raise ValueError(f"unknown compression {method!r}; accepted: {list(COMPRESSIONS[1:])}")


def _expect(name: str, tensor: Tensor | None, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    if tensor is None:
        raise ValueError(f"part {name!r} is missing")
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise ValueError(
            f"part {name!r} must be {dtype} of shape {shape} "
            f"(got {tensor.dtype} of shape {tuple(tensor.shape)})"
        )
    return tensor


def decompress_tensor(compressed: CompressedTensor) -> Tensor:
    """The float32 tensor that ``compressed`` stands for.

    Raises
    ------
    ValueError
        For an unknown method or parts of the wrong dtype, shape or range (an upload is
        checked before it is used).
    """
    shape = tuple(int(s) for s in compressed.shape)
    numel = math.prod(shape)
    parts = compressed.parts
    method = compressed.method
    if method == "bf16":
        values = _expect("values", parts.get("values"), torch.bfloat16, shape)
        return values.float()
    if method == "int8":
        rows, columns = row_shape(shape)
        quantised = _expect("values", parts.get("values"), torch.int8, (rows, columns))
        scale = _expect("scale", parts.get("scale"), torch.float32, (rows,))
        return (quantised.float() * scale[:, None]).reshape(shape)
    if method == "topk":
        indices = parts.get("indices")
        kept = parts.get("values")
        if indices is None or kept is None:
            raise ValueError("parts 'indices' and 'values' are both needed")
        if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
            raise ValueError(
                f"part 'indices' must be a 1-d int32/int64 tensor (got {indices.dtype})"
            )
        _expect("values", kept, torch.float32, (int(indices.numel()),))
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise ValueError(f"part 'indices' must lie in [0, {numel})")
        dense = torch.zeros(numel, dtype=torch.float32)
        dense[indices.long()] = kept
        return dense.reshape(shape)
    raise ValueError(f"unknown compression {method!r}; accepted: {list(COMPRESSIONS[1:])}")


def parameter_delta(
    parameters: Mapping[str, Tensor], global_parameters: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``parameters - global_parameters`` per tensor, in float32."""
    return {
        name: value.detach().float() - global_parameters[name].detach().float()
        for name, value in parameters.items()
    }


def compress_update(
    delta: Mapping[str, Tensor],
    method: str,
    *,
    fraction: float = 0.1,
    residual: Mapping[str, Tensor] | None = None,
    error_feedback: bool = True,
) -> tuple[dict[str, CompressedTensor], dict[str, Tensor] | None]:
    """Compress a client's delta, with error feedback.

    Parameters
    ----------
    delta : mapping of str to Tensor
        The client's parameters minus the round's global parameters.
    method : str
        ``"bf16"``, ``"int8"`` or ``"topk"``.
    fraction : float, default 0.1
        ``topk`` only.
    residual : mapping of str to Tensor or None, default None
        What compression dropped in the client's previous round (None: nothing yet).
    error_feedback : bool, default True
        Add ``residual`` to the delta and return the new residual.

    Returns
    -------
    update : dict of str to CompressedTensor
        ``C(delta + residual)``, what the client uploads.
    residual : dict of str to Tensor or None
        ``delta + residual - D(update)`` (float32, the delta's shapes); None without
        error feedback.
    """
    if not error_feedback:
        return {n: compress_tensor(d, method, fraction) for n, d in delta.items()}, None
    if residual is not None and set(residual) != set(delta):
        raise ValueError(
            f"the error-feedback residual holds other tensors than the update "
            f"({sorted(set(residual) ^ set(delta))[:3]}...)"
        )
    update: dict[str, CompressedTensor] = {}
    kept: dict[str, Tensor] = {}
    for name, value in delta.items():
        corrected = value.float() if residual is None else value.float() + residual[name]
        update[name] = compress_tensor(corrected, method, fraction)
        kept[name] = corrected - decompress_tensor(update[name])
    return update, kept


def decompress_update(update: Mapping[str, CompressedTensor]) -> dict[str, Tensor]:
    """Every tensor of an upload, decompressed (float32)."""
    return {name: decompress_tensor(value) for name, value in update.items()}


def restore_parameters(
    global_parameters: Mapping[str, Tensor], update: Mapping[str, CompressedTensor]
) -> dict[str, Tensor]:
    """The server's view of a compressed upload: ``global + D(update)`` per tensor.

    Each tensor keeps the dtype of its global counterpart. Tensors absent from ``update``
    are absent from the result (the screening that follows reports them missing).

    Raises
    ------
    ValueError
        For a tensor the global state does not have, a shape that differs from the global
        one, or malformed parts (the message names the tensor).
    """
    restored: dict[str, Tensor] = {}
    for name, compressed in update.items():
        if name not in global_parameters:
            raise ValueError(f"compressed tensor {name!r} is not a trainable parameter")
        reference = global_parameters[name]
        if tuple(compressed.shape) != tuple(reference.shape):
            raise ValueError(
                f"compressed tensor {name!r} has shape {tuple(compressed.shape)}, the global "
                f"one {tuple(reference.shape)}"
            )
        try:
            delta = decompress_tensor(compressed)
        except ValueError as error:
            raise ValueError(f"compressed tensor {name!r}: {error}") from error
        # in place on the fresh decompressed tensor: no second float32 copy per tensor
        restored[name] = delta.add_(reference.float()).to(reference.dtype)
    return restored
