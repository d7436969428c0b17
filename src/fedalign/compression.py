"""Compressed uploads: a client's update (its parameters minus the round's global ones) as
bf16, int8, 4/3/2-bit or top-k sparse tensors, with error feedback.

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
``int4``, ``int3``, ``int2``
    ``b``-bit codes per value with one bfloat16 scale per row (rows as for ``int8``): the
    ``2^b`` levels ``(c - (2^b - 1) / 2) s``, ``c = 0 .. 2^b - 1``, span ``[-max |row|,
    max |row|]`` (``s = 2 max |row| / (2^b - 1)``, every code used; no level is exactly
    zero, error feedback carries the half step). Codes are packed ``b`` bits each, eight
    values in ``b`` bytes (:func:`pack_codes`): ``b / 8`` bytes a value plus 2 a row, i.e.
    0.125x (``int4``), 0.094x (``int3``) and 0.063x (``int2``) of float32 before the
    scales (1% or less on rows of 192 or more values). Error per value at most ``s / 2 =
    max |row| / (2^b - 1)`` (the scale is rounded up to bfloat16, so no value clamps).
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

LOW_BITS = {"int4": 4, "int3": 3, "int2": 2}
"""Bits a value of each low-bit method."""


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack ``codes`` (any shape, integers in ``[0, 2^bits)``, ``bits`` in 1..7) ``bits`` bits
    each into ``ceil(n bits / 8)`` bytes (uint8, 1-d): eight codes fill ``bits`` bytes,
    little-endian within each group."""
    flat = codes.reshape(-1).to(torch.int64)
    count = flat.numel()
    groups = torch.cat([flat, flat.new_zeros((-count) % 8)]).reshape(-1, 8)  # (G, 8)
    words = (groups << (torch.arange(8, dtype=torch.int64) * bits)).sum(dim=1)  # (G,)
    shifts = torch.arange(bits, dtype=torch.int64) * 8
    packed = ((words[:, None] >> shifts) & 0xFF).to(torch.uint8).reshape(-1)  # (G * bits,)
    return packed[: (count * bits + 7) // 8].contiguous()


def unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """The ``count`` codes (int64, 1-d) that :func:`pack_codes` packed into ``packed``."""
    groups = (count + 7) // 8
    padded = torch.cat(
        [
            packed.to(torch.int64),
            packed.new_zeros(groups * bits - packed.numel(), dtype=torch.int64),
        ]
    )
    shifts = torch.arange(bits, dtype=torch.int64) * 8
    words = (padded.reshape(groups, bits) << shifts).sum(dim=1)  # (G,)
    codes = (words[:, None] >> (torch.arange(8, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count]


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` bits packed by :func:`pack_codes`."""
    return (count * bits + 7) // 8


def _low_bit(values: Tensor, shape: tuple[int, ...], method: str) -> CompressedTensor:
    """``values`` as ``b``-bit codes and a bfloat16 scale per row (see the module)."""
    bits = LOW_BITS[method]
    half = ((1 << bits) - 1) / 2  # (2^b - 1) / 2: the largest level in steps
    rows = values.reshape(row_shape(shape))  # (R, C)
    peak = rows.abs().amax(dim=1) if rows.numel() else torch.zeros(rows.shape[0])  # (R,)
    # rounded up to bfloat16 (1 + 2^-7 covers round-to-nearest): no value exceeds the levels
    scale = (peak / half * (1 + 2.0**-7)).to(torch.bfloat16)  # (R,)
    step = scale.float()
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = (rows / safe[:, None] + half).round().clamp(0, 2 * half)
    return CompressedTensor(
        method, shape, {"values": pack_codes(codes, bits), "scale": scale.contiguous()}
    )


def topk_count(numel: int, fraction: float) -> int:
    """Values kept by ``topk`` of a tensor of ``numel`` values: ``max(1, round(f * n))``."""
    if numel == 0:
        return 0
    return min(numel, max(1, round(fraction * numel)))


def row_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(R, C)`` of a tensor of ``shape`` for ``int8`` and the low-bit methods: ``C`` the last
    dimension (a scalar or a vector is one row)."""
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
        ``"bf16"``, ``"int8"``, ``"int4"``, ``"int3"``, ``"int2"`` or ``"topk"``.
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
    if method in LOW_BITS:
        return _low_bit(values, shape, method)
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
    if method in LOW_BITS:
        bits = LOW_BITS[method]
        rows, columns = row_shape(shape)
        packed = _expect("values", parts.get("values"), torch.uint8, (packed_size(numel, bits),))
        scale = _expect("scale", parts.get("scale"), torch.bfloat16, (rows,))
        half = ((1 << bits) - 1) / 2
        codes = unpack_codes(packed, bits, numel).reshape(rows, columns).float()
        return ((codes - half) * scale.float()[:, None]).reshape(shape)
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
        One of :data:`COMPRESSIONS` but ``none``.
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
