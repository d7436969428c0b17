"""Routing math: statistics accumulator, privacy noise, regularisers and divergences."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from fedalign.protocol import LayerRoutingStatistics
from fedalign.routing import (
    RoutingStatisticsAccumulator,
    jensen_shannon,
    load_balancing_loss,
    privatize_mean_hidden,
    routing_divergence,
    routing_regularizer,
    semantic_dispersion,
)


def logits_for(probabilities: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly (up to float rounding) the given rows."""
    return torch.tensor(probabilities).log()


def layer_stats(mean_hidden: list[list[float]], token_count: list[float]) -> LayerRoutingStatistics:
    num_experts = len(token_count)
    return LayerRoutingStatistics(
        routing_distribution=torch.full((num_experts,), 1.0 / num_experts),
        usage=torch.zeros(num_experts),
        margin=torch.zeros(num_experts),
        mean_hidden=torch.tensor(mean_hidden),
        token_count=torch.tensor(token_count),
        num_tokens=10,
    )


# ------------------------------------------------------------------------- accumulator
def test_accumulator_hand_computed_top1() -> None:
    # Token 1: p = [0.5, 0.3, 0.2] -> expert 0, runner-up 0.3, margin 0.2, hidden [1, 0].
    # Token 2: p = [0.1, 0.6, 0.3] -> expert 1, runner-up 0.3, margin 0.3, hidden [0, 2].
    accumulator = RoutingStatisticsAccumulator(num_experts=3, hidden_size=2, top_k=1)
    accumulator.update(
        logits_for([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    )
    stats = accumulator.result()
    assert_close(stats.routing_distribution, torch.tensor([0.3, 0.45, 0.25]))
    assert_close(stats.usage, torch.tensor([0.5, 0.5, 0.0]))
    assert_close(stats.margin, torch.tensor([0.2, 0.3, 0.0]))
    assert_close(stats.mean_hidden, torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    assert_close(stats.token_count, torch.tensor([1.0, 1.0, 0.0]))
    assert stats.num_tokens == 2
    assert stats.routing_distribution.dtype == torch.float32


def test_accumulator_top2_margin_uses_best_unselected_expert() -> None:
    # p = [0.4, 0.35, 0.25]: experts 0 and 1 selected, runner-up 0.25.
    accumulator = RoutingStatisticsAccumulator(num_experts=3, hidden_size=1, top_k=2)
    accumulator.update(logits_for([[0.4, 0.35, 0.25]]), torch.ones(1, 1))
    stats = accumulator.result()
    assert_close(stats.margin, torch.tensor([0.15, 0.10, 0.0]))
    assert_close(stats.usage, torch.tensor([1.0, 1.0, 0.0]))


def test_accumulator_top_k_equal_to_num_experts_uses_zero_runner_up() -> None:
    accumulator = RoutingStatisticsAccumulator(num_experts=2, hidden_size=1, top_k=2)
    accumulator.update(logits_for([[0.7, 0.3]]), torch.ones(1, 1))
    assert_close(accumulator.result().margin, torch.tensor([0.7, 0.3]))


def test_accumulator_batches_equal_one_big_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(100, 5, generator=generator)
    hidden = torch.randn(100, 7, generator=generator)
    whole = RoutingStatisticsAccumulator(5, 7, top_k=2)
    whole.update(logits, hidden)
    split = RoutingStatisticsAccumulator(5, 7, top_k=2)
    for start, stop in [(0, 10), (10, 67), (67, 67), (67, 100)]:
        split.update(logits[start:stop], hidden[start:stop])
    for key, value in whole.result().to_tensors().items():
        assert torch.equal(value, split.result().to_tensors()[key]), key


def test_accumulator_accepts_bfloat16_and_grad_tensors_and_empty() -> None:
    accumulator = RoutingStatisticsAccumulator(3, 2, top_k=1)
    assert accumulator.result().num_tokens == 0
    assert_close(accumulator.result().routing_distribution, torch.zeros(3))
    logits = torch.randn(4, 3, requires_grad=True)
    accumulator.update(logits.bfloat16(), torch.randn(4, 2).bfloat16())
    stats = accumulator.result()
    assert stats.mean_hidden.dtype == torch.float32
    assert_close(float(stats.routing_distribution.sum()), 1.0)


def test_accumulator_rejects_mismatched_tokens_and_bad_top_k() -> None:
    with pytest.raises(ValueError, match="top_k"):
        RoutingStatisticsAccumulator(3, 2, top_k=4)
    accumulator = RoutingStatisticsAccumulator(3, 2, top_k=1)
    with pytest.raises(ValueError, match="tokens"):
        accumulator.update(torch.zeros(2, 3), torch.zeros(3, 2))


# ----------------------------------------------------------------------------- privacy
def test_privatize_zero_noise_returns_input() -> None:
    mean_hidden = torch.randn(3, 4)
    assert privatize_mean_hidden(mean_hidden, 0.0, None) is mean_hidden


def test_privatize_scales_noise_by_row_norm() -> None:
    mean_hidden = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 10.0]])  # norms 5, 0, 10
    noisy = privatize_mean_hidden(mean_hidden, 0.1, torch.Generator().manual_seed(3))
    expected_noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(3))
    norms = torch.tensor([[5.0], [0.0], [10.0]])
    assert_close(noisy, mean_hidden + 0.1 * norms * expected_noise)
    assert torch.equal(noisy[1], torch.zeros(2))  # experts without tokens stay zero


# -------------------------------------------------------------------------- regulariser
def test_regularizer_zero_when_routing_equals_global() -> None:
    global_routing = torch.tensor([0.5, 0.3, 0.2])
    logits = global_routing.log().repeat(4, 1)  # softmax(logits) = p_g for every token
    loss = routing_regularizer(logits, global_routing, torch.ones(3), top_k=2)
    assert_close(loss, torch.tensor(0.0), atol=1e-7, rtol=0)


def test_regularizer_hand_value_and_gradient_sign() -> None:
    # Top-1: p = [0.5, 0.3, 0.2] selects expert 0, which is over-used (p_g(0) = 0.25).
    # L = alpha(0) * 0.5 * ln(0.5 / 0.25) = 0.5 * 0.5 * ln 2.
    logits = logits_for([[0.5, 0.3, 0.2]]).requires_grad_(True)
    global_routing = torch.tensor([0.25, 0.5, 0.25])
    alpha = torch.tensor([0.5, 1.0, 1.0])
    loss = routing_regularizer(logits, global_routing, alpha, top_k=1)
    assert_close(loss, torch.tensor(0.25 * math.log(2.0)))
    assert loss > 0
    loss.backward()
    assert logits.grad is not None
    # dL/dz_0 = alpha_0 * p_0 * (1 - p_0) * (ln(p_0 / p_g0) + 1) > 0: raising the over-used
    # expert's logit raises the loss.
    expected = 0.5 * 0.5 * 0.5 * (math.log(2.0) + 1.0)
    assert_close(float(logits.grad[0, 0]), expected)
    assert logits.grad[0, 0] > 0


def test_regularizer_ignores_experts_outside_top_k() -> None:
    logits = logits_for([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]])  # top-1 is expert 0 for both
    alpha = torch.ones(3)
    base = routing_regularizer(logits, torch.tensor([0.4, 0.3, 0.3]), alpha, top_k=1)
    changed = routing_regularizer(logits, torch.tensor([0.4, 0.01, 0.59]), alpha, top_k=1)
    assert_close(base, changed)


def test_regularizer_empty_and_zero_global_floor() -> None:
    empty = routing_regularizer(torch.zeros(0, 3), torch.ones(3) / 3, torch.ones(3), top_k=1)
    assert float(empty) == 0.0
    # p_g = 0 for a selected expert is clamped: the loss stays finite.
    loss = routing_regularizer(
        logits_for([[0.5, 0.3, 0.2]]), torch.tensor([0.0, 0.5, 0.5]), torch.ones(3), top_k=1
    )
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------ load balancing
def test_load_balancing_loss_is_one_when_balanced() -> None:
    # Token 1 -> expert 0, token 2 -> expert 1: f = [1/2, 1/2], P = [1/2, 1/2], 2 * 1/2 = 1.
    loss = load_balancing_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), top_k=1)
    assert_close(loss, torch.tensor(1.0))


def test_load_balancing_loss_penalises_collapse() -> None:
    # Both tokens -> expert 0: f = [1, 0], P_0 = sigmoid(1): loss = 2 * sigmoid(1).
    loss = load_balancing_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), top_k=1)
    assert_close(loss, torch.tensor(2.0 * torch.sigmoid(torch.tensor(1.0)).item()))
    assert float(load_balancing_loss(torch.zeros(0, 2), top_k=1)) == 0.0


# --------------------------------------------------------------------------- divergences
def test_jensen_shannon_values() -> None:
    assert jensen_shannon(torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7])) == pytest.approx(0)
    assert jensen_shannon(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(
        math.log(2.0)
    )
    # p = [1/2, 1/2], q = [1, 0], m = [3/4, 1/4].
    expected = 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2.0)) + 0.5 * math.log(4 / 3)
    assert jensen_shannon(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])) == pytest.approx(
        expected
    )


def test_routing_divergence_against_mean_and_given_global() -> None:
    def stats(distribution: list[float]) -> LayerRoutingStatistics:
        return LayerRoutingStatistics(
            routing_distribution=torch.tensor(distribution),
            usage=torch.zeros(2),
            margin=torch.zeros(2),
            mean_hidden=torch.zeros(2, 1),
            token_count=torch.zeros(2),
            num_tokens=5,
        )

    clients = [{"moe": stats([1.0, 0.0])}, {"moe": stats([0.0, 1.0])}]
    against_mean = routing_divergence(clients, None)["moe"]
    half_vs_one = jensen_shannon(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))
    assert against_mean["mean_js"] == pytest.approx(half_vs_one)
    assert against_mean["max_js"] == pytest.approx(half_vs_one)
    against_global = routing_divergence(clients, {"moe": torch.tensor([1.0, 0.0])})["moe"]
    assert against_global["mean_js"] == pytest.approx(math.log(2.0) / 2)
    assert against_global["max_js"] == pytest.approx(math.log(2.0))
    assert against_global["num_clients"] == 2


def test_semantic_dispersion_pairs_of_active_clients() -> None:
    # Expert 0: all three active, mu = [1,0], [1,0], [0,1] -> pairs (0,1): 0, (0,2): 1,
    # (1,2): 1 -> mean 2/3. Expert 1: only client 0 active -> no pair (client 2's mu is
    # ignored because it routed no token there).
    clients = [
        {"moe": layer_stats([[1.0, 0.0], [1.0, 0.0]], [3.0, 2.0])},
        {"moe": layer_stats([[1.0, 0.0], [0.0, 0.0]], [1.0, 0.0])},
        {"moe": layer_stats([[0.0, 1.0], [0.0, 1.0]], [4.0, 0.0])},
    ]
    dispersion = semantic_dispersion(clients)["moe"]
    assert dispersion["per_expert"][0] == pytest.approx(2 / 3)
    assert dispersion["per_expert"][1] is None
    assert dispersion["mean_dispersion"] == pytest.approx(2 / 3)


def test_usage_divergence_sees_decisions_the_softmax_hides() -> None:
    """Two clients with the same near-uniform softmax but opposite top-1 choices."""

    def stats(usage: list[float]) -> LayerRoutingStatistics:
        return LayerRoutingStatistics(
            routing_distribution=torch.tensor([0.5, 0.5]),
            usage=torch.tensor(usage),
            margin=torch.zeros(2),
            mean_hidden=torch.zeros(2, 1),
            token_count=torch.tensor(usage) * 10,
            num_tokens=10,
        )

    metrics = routing_divergence([{"moe": stats([1.0, 0.0])}, {"moe": stats([0.0, 1.0])}], None)
    # softmax identical: no divergence; usage shares (1, 0) and (0, 1) against their mean
    # (0.5, 0.5): JS = JS((0.5, 0.5), (1, 0)) for both
    assert metrics["moe"]["mean_js"] == pytest.approx(0.0)
    expected = jensen_shannon(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))
    assert metrics["moe"]["mean_usage_js"] == pytest.approx(expected)
    assert metrics["moe"]["max_usage_js"] == pytest.approx(expected)


# ---------------------------------------------------------------- regulariser forms
SOUND_FORMS = pytest.mark.parametrize("form", ["batch-kl", "topk-kl"])


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q).log()).sum())


@SOUND_FORMS
@pytest.mark.parametrize("seed", range(5))
def test_sound_forms_are_non_negative_for_any_alpha(form: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(16, 5, generator=generator)
    global_routing = torch.softmax(torch.randn(5, generator=generator), dim=0)
    alpha = torch.rand(5, generator=generator)  # per-expert strengths in [0, 1)
    for top_k in (1, 2, 5):
        loss = routing_regularizer(logits, global_routing, alpha, top_k, form=form)
        assert float(loss) >= 0.0


def test_batch_kl_is_zero_when_the_batch_mean_equals_global() -> None:
    # Two tokens that each disagree with p_g but whose mean is p_g = [0.5, 0.3, 0.2].
    global_routing = torch.tensor([0.5, 0.3, 0.2])
    logits = logits_for([[0.7, 0.1, 0.2], [0.3, 0.5, 0.2]])
    alpha = torch.tensor([1.0, 0.3, 0.7])
    loss = routing_regularizer(logits, global_routing, alpha, top_k=1, form="batch-kl")
    assert_close(loss, torch.tensor(0.0), atol=1e-7, rtol=0)
    # The literal form is not zero on the same tokens: per-token terms never average out.
    literal = routing_regularizer(logits, global_routing, alpha, top_k=1)
    assert abs(float(literal)) > 0.05


def test_batch_kl_hand_value() -> None:
    # pbar = mean([0.6, 0.4], [0.2, 0.8]) = [0.4, 0.6], p_g = [0.5, 0.5].
    logits = logits_for([[0.6, 0.4], [0.2, 0.8]])
    global_routing = torch.tensor([0.5, 0.5])
    # alpha = 1: KL(pbar || p_g) = 0.4 ln 0.8 + 0.6 ln 1.2.
    expected_kl = 0.4 * math.log(0.8) + 0.6 * math.log(1.2)
    loss = routing_regularizer(logits, global_routing, torch.ones(2), top_k=1, form="batch-kl")
    assert_close(loss, torch.tensor(expected_kl))
    # alpha = [1, 0.5]: 1 * (0.4 ln 0.8 - 0.4 + 0.5) + 0.5 * (0.6 ln 1.2 - 0.6 + 0.5).
    expected = (0.4 * math.log(0.8) + 0.1) + 0.5 * (0.6 * math.log(1.2) - 0.1)
    loss = routing_regularizer(
        logits, global_routing, torch.tensor([1.0, 0.5]), top_k=1, form="batch-kl"
    )
    assert_close(loss, torch.tensor(expected))


def test_topk_kl_is_zero_when_renormalised_top_k_agrees() -> None:
    # p_g = [0.4, 0.2, 0.3, 0.1]. Token 1 selects {0, 2} with ratio 0.4 : 0.3 (as p_g);
    # token 2 selects {1, 3} with ratio 0.5 : 0.25 = 2 : 1 (as p_g's 0.2 : 0.1).
    global_routing = torch.tensor([0.4, 0.2, 0.3, 0.1])
    logits = logits_for([[0.4, 0.15, 0.3, 0.15], [0.1, 0.5, 0.15, 0.25]])
    alpha = torch.tensor([0.2, 1.0, 0.6, 0.9])
    loss = routing_regularizer(logits, global_routing, alpha, top_k=2, form="topk-kl")
    assert_close(loss, torch.tensor(0.0), atol=1e-7, rtol=0)
    # Neither the batch form nor the literal form is zero here.
    assert float(routing_regularizer(logits, global_routing, alpha, 2, form="batch-kl")) > 1e-3
    assert abs(float(routing_regularizer(logits, global_routing, alpha, 2))) > 1e-3


def test_topk_kl_hand_value() -> None:
    # One token p = [0.5, 0.3, 0.2], top-2 = {0, 1}: p~ = [5/8, 3/8];
    # p_g = [0.25, 0.5, 0.25] -> p_g~ = [1/3, 2/3]; alpha = 1: KL(p~ || p_g~).
    logits = logits_for([[0.5, 0.3, 0.2]])
    global_routing = torch.tensor([0.25, 0.5, 0.25])
    expected = 5 / 8 * math.log((5 / 8) / (1 / 3)) + 3 / 8 * math.log((3 / 8) / (2 / 3))
    loss = routing_regularizer(logits, global_routing, torch.ones(3), top_k=2, form="topk-kl")
    assert_close(loss, torch.tensor(expected))
    # alpha only on the chosen experts counts: changing alpha(2) changes nothing.
    other = routing_regularizer(
        logits, global_routing, torch.tensor([1.0, 1.0, 0.0]), top_k=2, form="topk-kl"
    )
    assert_close(other, loss)


def test_topk_kl_is_identically_zero_for_top_1() -> None:
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss = routing_regularizer(
        logits, torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.ones(4), 1, form="topk-kl"
    )
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert logits.grad is not None
    assert float(logits.grad.abs().max()) < 1e-6


def _batch_kl_to(logits: torch.Tensor, global_routing: torch.Tensor) -> float:
    return kl(torch.softmax(logits, dim=-1).mean(dim=0), global_routing)


def _topk_kl_to(logits: torch.Tensor, global_routing: torch.Tensor, top_k: int) -> float:
    p = torch.softmax(logits, dim=-1)
    chosen = p.topk(top_k, dim=-1).indices
    total = 0.0
    for row, idx in zip(p, chosen, strict=True):
        total += kl(row[idx] / row[idx].sum(), global_routing[idx] / global_routing[idx].sum())
    return total / p.shape[0]


@pytest.mark.parametrize(("form", "top_k"), [("batch-kl", 2), ("topk-kl", 2), ("topk-kl", 3)])
def test_one_gradient_step_moves_routing_toward_global(form: str, top_k: int) -> None:
    """A small descent step on the logits lowers the KL the form measures (alpha = 1)."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(32, 4, generator=generator)
    global_routing = torch.tensor([0.1, 0.2, 0.3, 0.4])

    def divergence(z: torch.Tensor) -> float:
        if form == "batch-kl":
            return _batch_kl_to(z, global_routing)
        return _topk_kl_to(z, global_routing, top_k)

    before = divergence(logits)
    assert before > 0.01
    variable = logits.clone().requires_grad_(True)
    loss = routing_regularizer(variable, global_routing, torch.ones(4), top_k, form=form)
    assert_close(float(loss.detach()), before, rtol=1e-5, atol=1e-6)  # alpha = 1: the KL itself
    loss.backward()
    assert variable.grad is not None
    stepped = logits - 0.05 * variable.grad / variable.grad.norm()
    assert divergence(stepped) < before


def test_literal_form_is_not_minimised_at_global_routing() -> None:
    """Why ``literal`` is not the default: its minimum is not at ``p = p_g``.

    p_g = [0.5, 0.25, 0.25], top-1. At p = p_g the loss is 0, but p = [0.4, 0.3, 0.3] (still
    selecting expert 0) gives 0.4 ln(0.4 / 0.5) < 0; and at p = p_g the gradient on the
    selected logit is p_0 (1 - p_0) (ln(p_0 / p_g0) + 1) = 0.25 > 0: a descent step lowers
    the selected expert's probability *away from* p_g.
    """
    global_routing = torch.tensor([0.5, 0.25, 0.25])
    at_global = logits_for([[0.5, 0.25, 0.25]]).requires_grad_(True)
    loss_at_global = routing_regularizer(at_global, global_routing, torch.ones(3), top_k=1)
    assert_close(loss_at_global, torch.tensor(0.0), atol=1e-7, rtol=0)
    elsewhere = routing_regularizer(
        logits_for([[0.4, 0.3, 0.3]]), global_routing, torch.ones(3), top_k=1
    )
    assert_close(elsewhere, torch.tensor(0.4 * math.log(0.8)))
    assert float(elsewhere) < float(loss_at_global.detach())
    loss_at_global.backward()
    assert at_global.grad is not None
    assert_close(float(at_global.grad[0, 0]), 0.25)
    # The sound forms are stationary at p = p_g.
    for form in ("batch-kl", "topk-kl"):
        at = logits_for([[0.5, 0.25, 0.25]]).requires_grad_(True)
        routing_regularizer(at, global_routing, torch.ones(3), top_k=2, form=form).backward()
        assert at.grad is not None
        assert float(at.grad.abs().max()) < 1e-6


def test_regularizer_forms_empty_and_unknown() -> None:
    for form in ("batch-kl", "topk-kl"):
        empty = routing_regularizer(
            torch.zeros(0, 3), torch.ones(3) / 3, torch.ones(3), 1, form=form
        )
        assert float(empty) == 0.0
    with pytest.raises(ValueError, match="routing form"):
        routing_regularizer(torch.zeros(2, 3), torch.ones(3) / 3, torch.ones(3), 1, form="kl")
