"""FedAlign-MoE's bounded-memory step D (``sketch_dim > 0``): sketches, decisions, merge."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from fedalign.config import ConfigError, ExperimentConfig
from fedalign.errors import OptionError
from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult
from fedalign.strategies import FedAlignMoE, build_strategy
from fedalign.strategies.fedalign.semantic import (
    cosine_gram,
    fold_sketch,
    sketch_buckets,
    sketch_signs,
    sketch_vector,
)
from tests.helpers import ROUTER_WEIGHT, toy_layout
from tests.strategies.test_fedalign import (
    FUSED,
    LAYOUTS,
    PER_EXPERT,
    THETA_0,
    THETA_1,
    V,
    build,
    expert,
    semantic_round,
    stats,
)


def test_sketch_is_exact_when_every_value_has_its_own_bucket() -> None:
    # k >= P: y_p = s_p v_p with s_p = +-1, so inner products (and cosines) are unchanged.
    vectors = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0], [-1.0, 2.0, -0.5]])
    signs = sketch_signs(3)
    assert set(signs.tolist()) <= {-1.0, 1.0}
    sketches = torch.stack([sketch_vector(v, signs, 8) for v in vectors])  # (3, 8)
    assert_close(cosine_gram(sketches), cosine_gram(vectors))
    assert sketches[:, 3:].abs().sum() == 0


def test_sketch_is_linear_and_seeded() -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1000, generator=generator)
    signs = sketch_signs(1000)
    assert torch.equal(signs, sketch_signs(1000))  # the same signs on every client
    assert_close(
        sketch_vector(x - y, signs, 64), sketch_vector(x, signs, 64) - sketch_vector(y, signs, 64)
    )


@pytest.mark.parametrize("sketch_dim", [256, 1024, 4096])
def test_sketch_cosines_within_tolerance_of_exact(sketch_dim: int) -> None:
    # Hand-built cosines: y = 0.6 x_hat + 0.8 z_hat (cos 0.6), -x (cos -1), z (cos 0), over
    # P = 200,000 dense values. The sketch's standard deviation is about sqrt((1 + cos^2) / k);
    # we allow 5 / sqrt(k) (0.31, 0.16, 0.08).
    size = 200_000
    generator = torch.Generator().manual_seed(1)
    x, z = torch.randn(2, size, generator=generator)
    z -= (z @ x) / (x @ x) * x  # exactly orthogonal to x
    x_hat, z_hat = x / x.norm(), z / z.norm()
    vectors = torch.stack([x_hat, 0.6 * x_hat + 0.8 * z_hat, -x_hat, z_hat])  # (4, P)
    exact = cosine_gram(vectors)
    assert exact[0, 1] == pytest.approx(0.6, abs=1e-4)
    signs = sketch_signs(size)
    sketched = cosine_gram(torch.stack([sketch_vector(v, signs, sketch_dim) for v in vectors]))
    assert (sketched - exact).abs().max() <= 5 / math.sqrt(sketch_dim)
    assert sketched[0, 2] == pytest.approx(-1.0, abs=1e-6)  # a sketch is linear: S(-x) = -S(x)


@LAYOUTS
@pytest.mark.parametrize("personalized", [False, True])
@pytest.mark.parametrize(
    "scales, hidden, counts",
    [
        ((1.0, 2.0, -1.0), [(1.0, 0.0)] * 3, (10.0, 10.0, 10.0)),  # opposite update excluded
        ((1.0, 2.0, 3.0), [(1.0, 0.0), (2.0, 0.0), (0.0, 1.0)], (10.0, 10.0, 10.0)),
        ((1.0, 2.0, 1000.0), [(1.0, 0.0)] * 3, (10.0, 10.0, 0.0)),  # inactive client
        ((1.0, 2.0, -1.0), [(1.0, 0.0)] * 3, (0.0, 10.0, 0.0)),  # single active client
    ],
)
def test_sketch_as_long_as_the_expert_reproduces_the_exact_path(
    layout: MoELayout,
    personalized: bool,
    scales: tuple[float, ...],
    hidden: list[tuple[float, float]],
    counts: tuple[float, ...],
) -> None:
    # Experts have 4 values: a sketch of 8 values keeps every cosine (see above), so the
    # decisions, records and merged experts equal the exact path's (up to float rounding).
    exact, global_parameters, results = semantic_round(
        layout, scales, hidden, counts=counts, personalized=personalized
    )
    sketched = FedAlignMoE(layout, ablation="full", personalized_experts=personalized, sketch_dim=8)
    expected = exact.aggregate(1, global_parameters, results, {})
    got = sketched.aggregate(1, global_parameters, results, {})
    assert got.record.pop("sketch_dim") == 8
    assert got.record == expected.record
    assert got.parameters.keys() == expected.parameters.keys()
    for name in expected.parameters:
        assert_close(got.parameters[name], expected.parameters[name])
    assert set(got.client_parameters) == set(expected.client_parameters)
    for cid, personal in expected.client_parameters.items():
        for name in personal:
            assert_close(got.client_parameters[cid][name], personal[name])


def test_sketch_dim_zero_is_bitwise_the_exact_path() -> None:
    _, global_parameters, results = semantic_round(FUSED, (1.0, 2.0, -1.0), [(1.0, 0.0)] * 3)
    default = FedAlignMoE(FUSED).aggregate(1, global_parameters, results, {})
    zero = build_strategy("fedalign", {"sketch_dim": 0}, FUSED).aggregate(
        1, global_parameters, results, {}
    )
    assert zero.record == default.record
    assert "sketch_dim" not in zero.record
    for name, tensor in default.parameters.items():
        assert torch.equal(zero.parameters[name], tensor)


@pytest.mark.parametrize("layout", [FUSED, PER_EXPERT], ids=["fused", "per-expert"])
def test_identical_clients_get_their_common_update_with_a_small_sketch(layout: MoELayout) -> None:
    # Four clients with the same expert 0 (a 4-value expert sketched to 2 values: cosines are
    # no longer exact in general, but identical updates have identical sketches, cosine 1):
    # everyone is aligned and the merge is their common value.
    common = (torch.tensor(THETA_0) + 0.7 * V).tolist()
    results = [
        ClientResult(
            cid,
            cid + 1,
            build(layout, (common, [9.0 + cid] * 4)),
            stats(usage=(0.1 * (cid + 1), 0.0), token_count=(10.0, 0.0)),
        )
        for cid in range(4)
    ]
    strategy = FedAlignMoE(layout, ablation="full", sketch_dim=2)
    aggregated = strategy.aggregate(1, build(layout, (THETA_0, THETA_1)), results, {})
    assert_close(expert(aggregated.parameters, layout, 0), torch.tensor(common))
    assert_close(expert(aggregated.parameters, layout, 1), torch.tensor(THETA_1))
    assert aggregated.record["layers"]["moe"]["experts"][0]["aligned"] == [0, 1, 2, 3]


def test_large_identical_updates_merge_to_the_common_update() -> None:
    # Same property on a 20,000-value expert with a 64-value sketch and 5 clients.
    layout = toy_layout(per_expert=True, router_params=ROUTER_WEIGHT, expert_tensors=("w",))
    generator = torch.Generator().manual_seed(0)
    previous = {
        "moe.router.weight": torch.randn(2, 2, generator=generator),
        "moe.experts.0.w": torch.randn(100, 200, generator=generator),
        "moe.experts.1.w": torch.randn(100, 200, generator=generator),
    }
    moved = {n: t + 0.01 * torch.randn(t.shape, generator=generator) for n, t in previous.items()}
    results = [
        ClientResult(
            cid, 10, {n: t.clone() for n, t in moved.items()}, stats(token_count=(5.0, 5.0))
        )
        for cid in range(5)
    ]
    aggregated = FedAlignMoE(layout, sketch_dim=64).aggregate(1, previous, results, {})
    for name in ("moe.experts.0.w", "moe.experts.1.w"):
        assert_close(aggregated.parameters[name], moved[name])


def test_sketch_dim_validation_and_config() -> None:
    with pytest.raises(OptionError, match="sketch_dim"):
        build_strategy("fedalign", {"sketch_dim": -1}, FUSED)
    with pytest.raises(OptionError, match="sketch_dim"):
        build_strategy("fedalign", {"sketch_dim": 1.5}, FUSED)
    config = ExperimentConfig()
    config.apply_overrides(["strategy.sketch-dim=256"])
    config.validate()
    assert config.strategy.sketch_dim == 256
    assert ExperimentConfig().strategy.sketch_dim == 0
    config.apply_overrides(["strategy.sketch-dim=-4"])
    with pytest.raises(ConfigError, match=r"strategy\.sketch-dim"):
        config.validate()


def test_prime_buckets_spread_a_column_over_every_bucket() -> None:
    # An update living in one column of a (2048, 384) matrix (an outlier hidden dimension),
    # flattened row by row: with 1024 buckets (gcd 128 with the row length) it lands in 8
    # buckets; with sketch_buckets(1024) = 1021 (prime) in all of them.
    assert [sketch_buckets(k) for k in (1, 2, 8, 64, 1024, 4096)] == [1, 2, 7, 61, 1021, 4093]
    update = torch.zeros(2048, 384)
    update[:, 0] = torch.randn(2048, generator=torch.Generator().manual_seed(0))
    flat = update.reshape(-1)
    signed = flat * sketch_signs(flat.numel())
    assert int((fold_sketch(signed, 1024) != 0).sum()) == 8
    assert int((sketch_vector(flat, sketch_signs(flat.numel()), 1024) != 0).sum()) == 1021
