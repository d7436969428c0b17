"""Compressed uploads: bounds of each method, exact top-k counts, error feedback, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedalign.compression import (
    LOW_BITS,
    compress_tensor,
    compress_update,
    decompress_tensor,
    decompress_update,
    pack_codes,
    parameter_delta,
    restore_parameters,
    topk_count,
    unpack_codes,
)
from fedalign.config import ConfigError, ExperimentConfig
from fedalign.protocol import CompressedTensor, tensor_bytes

SHAPES = [(), (7,), (5, 3), (4, 6, 9), (2, 3, 4, 5)]


def random_delta(shape: tuple[int, ...], seed: int, scale: float = 1e-3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes, as an update's rows are
    values = torch.randn(shape, generator=generator) * scale
    if len(shape) >= 2:
        values = values * torch.logspace(-3, 0, shape[-2]).reshape(-1, 1)
    return values


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_error_at_most_one_unit_roundoff(shape: tuple[int, ...]) -> None:
    """bf16 keeps 8 significant bits: |d - D(C(d))| <= 2^-8 |d| per value."""
    delta = random_delta(shape, 0)
    packed = compress_tensor(delta, "bf16")
    restored = decompress_tensor(packed)
    assert restored.dtype == torch.float32 and restored.shape == delta.shape
    assert bool(((restored - delta).abs() <= 2.0**-8 * delta.abs()).all())
    assert tensor_bytes(packed) == 2 * delta.numel()


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_error_at_most_half_a_step_of_its_row(shape: tuple[int, ...]) -> None:
    """int8 per row: |d - D(C(d))| <= max |row| / 254 (half a quantisation step)."""
    delta = random_delta(shape, 1)
    packed = compress_tensor(delta, "int8")
    restored = decompress_tensor(packed)
    rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() >= 2 else delta.reshape(1, -1)
    bound = rows.abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-5)  # float rounding slack
    error = (restored.reshape(rows.shape) - rows).abs()
    assert bool((error <= bound).all())
    # per row, not per tensor: the smallest row is not flattened to zero by the largest
    if delta.dim() >= 2:
        assert bool((restored.reshape(rows.shape)[0] != 0).any())
    assert tensor_bytes(packed) == delta.numel() + 4 * rows.shape[0]
    assert packed.parts["values"].dtype == torch.int8


def test_int8_of_zeros_is_zeros() -> None:
    restored = decompress_tensor(compress_tensor(torch.zeros(3, 4), "int8"))
    assert torch.equal(restored, torch.zeros(3, 4))


@given(bits=st.integers(1, 7), count=st.integers(0, 70), seed=st.integers(0, 2**16))
@settings(max_examples=80, deadline=None)
def test_codes_pack_into_bits_and_back(bits: int, count: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (count,), generator=generator)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == ((count * bits + 7) // 8,)
    assert torch.equal(unpack_codes(packed, bits, count), codes)


@pytest.mark.parametrize("method", sorted(LOW_BITS))
@pytest.mark.parametrize("shape", SHAPES)
def test_low_bit_error_at_most_half_a_step_of_its_row(method: str, shape: tuple[int, ...]) -> None:
    """b bits per row: |d - D(C(d))| <= max |row| / (2^b - 1) (the scale rounded up to
    bfloat16 adds under 1.2%); b bits a value plus a bfloat16 scale a row."""
    bits = LOW_BITS[method]
    delta = random_delta(shape, 2)
    packed = compress_tensor(delta, method)
    restored = decompress_tensor(packed)
    assert restored.dtype == torch.float32 and restored.shape == delta.shape
    rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() >= 2 else delta.reshape(1, -1)
    peak = rows.abs().amax(dim=1, keepdim=True)
    error = (restored.reshape(rows.shape) - rows).abs()
    assert bool((error <= peak / (2**bits - 1) * 1.012).all())
    # the extreme levels are the row's peaks, within the rounding of the scale
    assert bool(
        (restored.reshape(rows.shape).abs().amax(dim=1, keepdim=True) <= peak * 1.012).all()
    )
    numel = delta.numel()
    assert tensor_bytes(packed) == (numel * bits + 7) // 8 + 2 * rows.shape[0]
    assert packed.parts["scale"].dtype == torch.bfloat16


def test_low_bit_of_zeros_is_zeros_and_int3_is_under_a_tenth() -> None:
    for method in LOW_BITS:
        restored = decompress_tensor(compress_tensor(torch.zeros(3, 4), method))
        assert torch.equal(restored, torch.zeros(3, 4))
    # an expert matrix of MiniLM's MoEfied FFN: 3 bits a value plus 2 bytes a row of 384
    packed = compress_tensor(torch.randn(192, 384), "int3")
    assert tensor_bytes(packed) / (4 * 192 * 384) == pytest.approx(0.0951, abs=1e-4)


@given(
    numel=st.integers(1, 400),
    fraction=st.floats(0.001, 1.0),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_topk_keeps_exactly_k_largest(numel: int, fraction: float, seed: int) -> None:
    delta = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    packed = compress_tensor(delta.reshape(1, numel), "topk", fraction)
    k = topk_count(numel, fraction)
    assert k == min(numel, max(1, round(fraction * numel)))
    assert packed.parts["indices"].shape == (k,) and packed.parts["values"].shape == (k,)
    assert packed.parts["indices"].dtype == torch.int32
    assert tensor_bytes(packed) == 8 * k
    restored = decompress_tensor(packed).reshape(-1)
    kept = restored != 0
    assert int(kept.sum()) == k  # randn values are nonzero and distinct
    assert torch.equal(restored[kept], delta[kept])  # kept values travel exactly
    if k < numel:
        assert float(delta[kept].abs().min()) >= float(delta[~kept].abs().max())


def test_error_feedback_loses_nothing_over_rounds() -> None:
    """sum_t D(C(d_t + r_t)) + r_T == sum_t d_t (up to float error), for each method."""
    shapes = {"a": (6, 10), "b": (13,), "c": (2, 3, 8)}
    for method in ("bf16", "int8", *LOW_BITS, "topk"):
        residual = None
        sent = {n: torch.zeros(s) for n, s in shapes.items()}
        truth = {n: torch.zeros(s) for n, s in shapes.items()}
        for round_ in range(6):
            delta = {n: random_delta(s, 10 * round_ + i) for i, (n, s) in enumerate(shapes.items())}
            update, residual = compress_update(delta, method, fraction=0.2, residual=residual)
            assert residual is not None
            for name, value in decompress_update(update).items():
                sent[name] += value
                truth[name] += delta[name]
        for name in shapes:
            torch.testing.assert_close(sent[name] + residual[name], truth[name], rtol=0, atol=1e-6)
        if method == "topk":  # topk drops most values each round: the residual is not small
            assert max(float(r.abs().max()) for r in residual.values()) > 1e-4


def test_without_error_feedback_no_residual() -> None:
    delta = {"w": random_delta((4, 5), 3)}
    update, residual = compress_update(delta, "topk", fraction=0.1, error_feedback=False)
    assert residual is None
    assert int((decompress_update(update)["w"] != 0).sum()) == 2


def test_restore_adds_the_delta_in_the_global_dtype() -> None:
    global_parameters = {"w": torch.ones(3, 4), "h": torch.ones(4, dtype=torch.bfloat16)}
    local = {"w": torch.full((3, 4), 1.5), "h": torch.full((4,), 2.0, dtype=torch.bfloat16)}
    delta = parameter_delta(local, global_parameters)
    assert delta["h"].dtype == torch.float32
    update, _ = compress_update(delta, "int8")
    restored = restore_parameters(global_parameters, update)
    assert restored["h"].dtype == torch.bfloat16
    assert torch.equal(restored["w"], local["w"]) and torch.equal(restored["h"], local["h"])


@pytest.mark.parametrize(
    ("packed", "message"),
    [
        (CompressedTensor("gzip", (2,), {}), "unknown compression 'gzip'"),
        (CompressedTensor("bf16", (2,), {"values": torch.zeros(2)}), "part 'values' must be"),
        (
            CompressedTensor("int8", (2, 3), {"values": torch.zeros(2, 3, dtype=torch.int8)}),
            "'scale' is missing",
        ),
        (
            CompressedTensor(
                "int3",
                (2, 3),
                {"values": torch.zeros(2, dtype=torch.uint8), "scale": torch.ones(2)},
            ),
            "part 'values' must be torch.uint8 of shape (3,)",
        ),
        (
            CompressedTensor(
                "topk",
                (4,),
                {"indices": torch.tensor([9], dtype=torch.int32), "values": torch.ones(1)},
            ),
            "must lie in [0, 4)",
        ),
    ],
)
def test_malformed_parts_are_named(packed: CompressedTensor, message: str) -> None:
    with pytest.raises(
        ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        decompress_tensor(packed)


def test_restore_names_the_tensor() -> None:
    update = {"w": compress_tensor(torch.zeros(3, 4), "int8")}
    with pytest.raises(ValueError, match=r"'w' has shape \(3, 4\), the global one \(4, 3\)"):
        restore_parameters({"w": torch.zeros(4, 3)}, update)
    with pytest.raises(ValueError, match="'w' is not a trainable parameter"):
        restore_parameters({"v": torch.zeros(3, 4)}, update)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("federated.upload-compression=gzip", "federated.upload-compression must be one of"),
        ("federated.topk-fraction=0", "federated.topk-fraction must be in (0, 1]"),
        ("federated.topk-fraction=1.5", "federated.topk-fraction must be in (0, 1]"),
    ],
)
def test_bad_config_values_are_named(override: str, named: str) -> None:
    config = ExperimentConfig()
    config.apply_overrides([override])
    with pytest.raises(ConfigError) as error:
        config.validate()
    assert named in str(error.value)
    if "upload-compression" in override:
        accepted = "'none', 'bf16', 'int8', 'int4', 'int3', 'int2', 'topk'"
        assert accepted in str(error.value) and "'gzip'" in str(error.value)


def test_defaults_keep_uploads_uncompressed() -> None:
    federated = ExperimentConfig().federated
    assert federated.upload_compression == "none"
    assert federated.error_feedback is True and federated.topk_fraction == 0.1
