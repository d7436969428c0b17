"""Tests for fedalign.moe.lora: LoRA product algebra and the LoRA expert view."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedalign.moe import ExpertSlice, LoRAExpertSlice, LoRAFactors, MoELayerLayout, MoELayout
from fedalign.moe.lora import (
    factor_mean,
    lora_delta,
    product_mean,
    refactorise,
    relative_error,
)

Tensor = torch.Tensor
OUT, IN, R, C = 6, 5, 2, 3


def _shared_subspace_clients(seed: int = 0) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """``B_i = U M_i``, ``A_i = N_i V^T``: every product lies in one rank-``R`` subspace, so
    the product mean has rank <= R, yet ``mean(M) mean(N) != mean(M N)``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(OUT, R, generator=g)
    v = torch.randn(IN, R, generator=g)
    bs = [u @ torch.randn(R, R, generator=g) for _ in range(C)]
    as_ = [torch.randn(R, R, generator=g) @ v.T for _ in range(C)]
    weights = torch.tensor([0.5, 0.3, 0.2])
    return bs, as_, weights


def test_product_svd_is_exact_when_the_mean_has_rank_at_most_r() -> None:
    bs, as_, weights = _shared_subspace_clients()
    exact = sum(w * b @ a for w, b, a in zip(weights.tolist(), bs, as_, strict=True))
    mean = product_mean(bs, as_, weights)
    assert torch.allclose(mean, exact, atol=1e-6)
    b, a = refactorise(mean, R)
    assert torch.allclose(b @ a, exact, atol=1e-5)
    assert relative_error(exact, b @ a) < 1e-5
    # factor averaging (FedIT) is not exact on the same clients
    fb, fa = factor_mean(bs, as_, weights)
    assert relative_error(exact, fb @ fa) > 0.05


def test_factor_mean_is_exact_when_clients_share_a() -> None:
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(R, IN, generator=g)
    bs = [torch.randn(OUT, R, generator=g) for _ in range(C)]
    weights = torch.tensor([0.2, 0.2, 0.6])
    fb, fa = factor_mean(bs, [shared] * C, weights)
    assert torch.allclose(fa, shared)
    assert relative_error(product_mean(bs, [shared] * C, weights), fb @ fa) < 1e-6


def test_refactorise_shapes_and_square_root_split() -> None:
    g = torch.Generator().manual_seed(2)
    product = torch.randn(OUT, IN, generator=g)
    b, a = refactorise(product, R)
    assert b.shape == (OUT, R) and a.shape == (R, IN)
    singular = torch.linalg.svdvals(product)[:R]
    # singular values split square-root-wise: ||B[:, j]|| = ||A[j]|| = sqrt(s_j)
    assert torch.allclose(b.norm(dim=0), singular.sqrt(), atol=1e-5)
    assert torch.allclose(a.norm(dim=1), singular.sqrt(), atol=1e-5)
    # the best rank-R approximation: error^2 = sum of the dropped singular values^2
    dropped = torch.linalg.svdvals(product)[R:]
    assert torch.linalg.norm(product - b @ a) == pytest.approx(float(dropped.norm()), rel=1e-4)
    # a rank larger than min(out, in) pads with zero directions
    wide_b, wide_a = refactorise(product, 8)
    assert wide_b.shape == (OUT, 8) and wide_a.shape == (8, IN)
    assert torch.allclose(wide_b @ wide_a, product, atol=1e-5)


def test_refactorise_keeps_zero_directions_alive() -> None:
    """A zero singular value gets a unit row of A and a zero column of B."""
    b, a = refactorise(torch.zeros(OUT, IN), R)
    assert torch.count_nonzero(b) == 0
    assert torch.allclose(a.norm(dim=1), torch.ones(R))
    rank_one = torch.outer(torch.arange(1.0, OUT + 1), torch.ones(IN))
    b, a = refactorise(rank_one, R)
    assert torch.allclose(b @ a, rank_one, atol=1e-5)
    assert float(a[1].norm()) == pytest.approx(1.0, abs=1e-5) and float(b[:, 1].norm()) < 1e-6
    with pytest.raises(ValueError, match="rank"):
        refactorise(rank_one, 0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), clients=st.integers(1, 4), rank=st.integers(1, 3))
def test_svd_error_never_exceeds_factor_averaging(seed: int, clients: int, rank: int) -> None:
    """Eckart-Young: the truncated SVD is the best rank-r product, FedIT's is one of them."""
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(OUT, rank, generator=g) for _ in range(clients)]
    as_ = [torch.randn(rank, IN, generator=g) for _ in range(clients)]
    weights = torch.rand(clients, generator=g) + 0.1
    weights = weights / weights.sum()
    exact = product_mean(bs, as_, weights)
    b, a = refactorise(exact, rank)
    fb, fa = factor_mean(bs, as_, weights)
    assert relative_error(exact, b @ a) <= relative_error(exact, fb @ fa) + 1e-5
    if clients == 1:
        assert relative_error(exact, fb @ fa) < 1e-5


def test_relative_error_edge_cases() -> None:
    zero = torch.zeros(2, 2)
    assert relative_error(zero, zero) == 0.0
    assert relative_error(zero, torch.ones(2, 2)) == float("inf")


# ------------------------------------------------------------------------ the view
E = 3


def _fused_factors(transposed: bool = False) -> LoRAFactors:
    return LoRAFactors(
        "up.lora_A",
        "up.lora_B",
        rank=R,
        scaling=0.5,
        num_experts=E,
        transposed=transposed,
        base="up",
    )


def _fused_state(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "up.lora_A": torch.randn(E * R, IN, generator=g),  # (E r, in)
        "up.lora_B": torch.randn(OUT, E * R, generator=g),  # (out, E r), columns interleaved
    }


def test_fused_blocks_follow_peft_stacking() -> None:
    """Expert e: rows [e r, (e+1) r) of A, columns e, e + E, ... of B (peft's reshape)."""
    factors = _fused_factors()
    state = _fused_state()
    a, b = state["up.lora_A"], state["up.lora_B"]
    # peft's ParamWrapper.get_delta_weight for (E, out, in) tensors
    peft_delta = (
        torch.einsum("ore,eri->eoi", b.reshape(OUT, R, E), a.reshape(E, R, IN)) * factors.scaling
    )  # (E, out, in)
    for e in range(E):
        assert torch.equal(factors.a(state, e), a[e * R : (e + 1) * R])
        assert torch.equal(factors.b(state, e), b[:, e::E])
        assert torch.allclose(factors.delta(state, e), peft_delta[e], atol=1e-6)
        view = LoRAExpertSlice(factors, e)
        assert view.numel(state) == OUT * IN
    transposed = _fused_factors(transposed=True)
    assert transposed.delta(state, 1).shape == (IN, OUT)
    assert torch.allclose(transposed.delta(state, 1), peft_delta[1].T, atol=1e-6)


def test_write_touches_only_its_block() -> None:
    factors = _fused_factors()
    state = _fused_state()
    before = {k: v.clone() for k, v in state.items()}
    new_b, new_a = torch.full((OUT, R), 7.0), torch.full((R, IN), -3.0)
    factors.write(state, 1, new_b, new_a)
    assert torch.equal(factors.b(state, 1), new_b) and torch.equal(factors.a(state, 1), new_a)
    for e in (0, 2):
        assert torch.equal(factors.b(state, e), factors.b(before, e))
        assert torch.equal(factors.a(state, e), factors.a(before, e))
    assert torch.allclose(factors.delta(state, 1), lora_delta(new_b, new_a, 0.5))
    with pytest.raises(ValueError, match="shapes"):
        factors.write(state, 0, torch.zeros(OUT, R + 1), new_a)


def _lora_layout() -> MoELayout:
    up = _fused_factors()
    attention = LoRAFactors("q.lora_A", "q.lora_B", rank=R, scaling=2.0, base="q.weight")
    layer = MoELayerLayout(
        name="moe",
        num_experts=E,
        top_k=2,
        hidden_size=IN,
        router_params=("gate.weight",),
        experts=tuple((ExpertSlice("up", e, e + 1),) for e in range(E)),
        lora_experts=tuple((LoRAExpertSlice(up, e),) for e in range(E)),
    )
    return MoELayout(layers=(layer,), lora_modules=(up, attention))


def test_layout_lora_round_trip_restrict_and_rename() -> None:
    layout = _lora_layout()
    data = json.loads(json.dumps(layout.to_dict()))
    assert MoELayout.from_dict(data) == layout
    # a layout without LoRA serialises as before (no new keys)
    plain = MoELayout(
        layers=(layout.layers[0].__class__("x", 1, 1, 2, ("g",), ((ExpertSlice("w"),),)),)
    )
    assert set(plain.to_dict()) == {"layers"}
    assert "lora_experts" not in plain.to_dict()["layers"][0]
    # restrict to the travelling tensors: base experts frozen, LoRA pairs kept when whole
    travelling = layout.restrict(["gate.weight", "up.lora_A", "up.lora_B", "q.lora_A"])
    layer = travelling.layers[0]
    assert layer.experts == ((), (), ())
    assert all(layer.has_lora_expert(e) for e in range(E))
    assert [f.base for f in travelling.lora_modules] == ["up"]  # q lost its B
    assert travelling.lora_expert_param_names() == {"up.lora_A", "up.lora_B"}
    state = _fused_state()
    assert layer.lora_delta_vector(state, 2).shape == (OUT * IN,)
    assert not layout.layers[0].has_lora_expert(0)  # its base slice is still there
    renamed = layout.rename({"up": "base.up", "gate.weight": "base.gate.weight"})
    assert renamed.layers[0].experts[1][0].param == "base.up"
    assert renamed.layers[0].router_params == ("base.gate.weight",)
    assert renamed.lora_modules == layout.lora_modules
