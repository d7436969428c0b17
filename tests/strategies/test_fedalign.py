"""FedAlign-MoE: consistency weights, p_g, router rows, semantic expert aggregation, state.

Every expected value is computed by hand in the comments next to it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Sequence

import pytest
import torch
from torch.testing import assert_close

from fedalign.config import ConfigError
from fedalign.errors import OptionError
from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult, LayerRoutingStatistics
from fedalign.strategies import (
    FedAlignMoE,
    FedAvg,
    build_strategy,
)
from fedalign.strategies.fedalign import semantic_alignment
from tests.helpers import (
    FUSED_LAYOUT,
    PER_EXPERT_LAYOUT,
    expert_alpha,
    global_routing,
    proximal_mu,
    routing_lambda,
)

# Two experts of 4 values each, stored fused ((E, 2, 2), rows [e, e+1)) or one tensor pair
# per expert (w (3,), b (1,)).
FUSED = FUSED_LAYOUT
PER_EXPERT = PER_EXPERT_LAYOUT
LAYOUTS = pytest.mark.parametrize("layout", [FUSED, PER_EXPERT], ids=["fused", "per-expert"])


def build(
    layout: MoELayout,
    experts: Sequence[Sequence[float]] = ((0.0,) * 4, (0.0,) * 4),
    router_weight: Sequence[Sequence[float]] = ((0.0, 0.0), (0.0, 0.0)),
    router_bias: Sequence[float] = (0.0, 0.0),
    head: Sequence[float] = (0.0, 0.0),
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    if layout is FUSED:
        state = {"moe.experts.w": torch.zeros(2, 2, 2)}
    else:
        state = {
            f"moe.experts.{e}.{part}": torch.zeros(size)
            for e in range(2)
            for part, size in (("w", 3), ("b", 1))
        }
    for expert, values in enumerate(experts):
        layout.layers[0].write_expert_vector(state, expert, torch.tensor(values, dtype=torch.float))
    state["moe.router.weight"] = torch.tensor(router_weight)
    state["moe.router.bias"] = torch.tensor(router_bias)
    state["head.weight"] = torch.tensor(head)
    return {name: tensor.to(dtype) for name, tensor in state.items()}


def stats(
    routing_distribution: Sequence[float] = (0.5, 0.5),
    margin: Sequence[float] = (0.1, 0.1),
    usage: Sequence[float] = (0.5, 0.5),
    token_count: Sequence[float] = (10.0, 10.0),
    mean_hidden: Sequence[Sequence[float]] = ((1.0, 0.0), (1.0, 0.0)),
) -> dict[str, LayerRoutingStatistics]:
    return {
        "moe": LayerRoutingStatistics(
            routing_distribution=torch.tensor(routing_distribution),
            usage=torch.tensor(usage),
            margin=torch.tensor(margin),
            mean_hidden=torch.tensor(mean_hidden),
            token_count=torch.tensor(token_count),
            num_tokens=20,
        )
    }


# ---------------------------------------------------------------- A/B/C: routing side
def two_routing_clients(layout: MoELayout) -> list[ClientResult]:
    """Client 0 prefers expert 0, client 1 expert 1."""
    return [
        ClientResult(
            0,
            1,
            build(layout, ((1.0,) * 4, (2.0,) * 4), ((1, 2), (3, 4)), (1, 1), head=(2, 0)),
            stats(routing_distribution=(0.8, 0.2), margin=(0.5, 0.1)),
        ),
        ClientResult(
            1,
            1,
            build(layout, ((3.0,) * 4, (4.0,) * 4), ((5, 6), (7, 8)), (0, 3), head=(0, 4)),
            stats(routing_distribution=(0.2, 0.8), margin=(0.2, 0.4)),
        ),
    ]


@LAYOUTS
def test_consistency_weights_global_routing_and_router_rows(layout: MoELayout) -> None:
    strategy = FedAlignMoE(layout, ablation="consistency")
    aggregated = strategy.aggregate(1, build(layout), two_routing_clients(layout), {})
    # Round 1: p_g^0 = mean pbar = [0.5, 0.5]; with r = sqrt(0.1), sqrt(0.4) = 2r:
    #   o_0 = sqrt([0.4, 0.1]) = [2r, r],  s_0 = o_0 * m_0 = [2r * 0.5, r * 0.1] = [r, 0.1r]
    #   o_1 = sqrt([0.1, 0.4]) = [r, 2r],  s_1 = [r * 0.2, 2r * 0.4] = [0.2r, 0.8r]
    #   omega(e0) = [1, 0.2] / 1.2 = [5/6, 1/6];  omega(e1) = [0.1, 0.8] / 0.9 = [1/9, 8/9]
    # p_g before renormalising: e0 = 5/6 * 0.8 + 1/6 * 0.2 = 0.7 = 21/30,
    #   e1 = 1/9 * 0.2 + 8/9 * 0.8 = 6.6 / 9 = 22/30  ->  p_g = [21/43, 22/43].
    p_g = torch.tensor([21 / 43, 22 / 43])
    assert_close(aggregated.state["global_routing"]["moe"], p_g)
    # Router rows: row 0 = 5/6 [1, 2] + 1/6 [5, 6]; row 1 = 1/9 [3, 4] + 8/9 [7, 8].
    assert_close(
        aggregated.parameters["moe.router.weight"],
        torch.tensor([[10 / 6, 16 / 6], [59 / 9, 68 / 9]]),
    )
    assert_close(aggregated.parameters["moe.router.bias"], torch.tensor([5 / 6, 25 / 9]))
    # Experts and head: FedAvg with n = [1, 1].
    moe = layout.layers[0]
    assert_close(moe.expert_vector(aggregated.parameters, 0), torch.full((4,), 2.0))
    assert_close(moe.expert_vector(aggregated.parameters, 1), torch.full((4,), 3.0))
    assert_close(aggregated.parameters["head.weight"], torch.tensor([1.0, 2.0]))

    layer_record = aggregated.record["layers"]["moe"]
    assert layer_record["routing_reference"] == "client-mean"
    assert layer_record["expert_aggregation"] == "fedavg"
    assert layer_record["global_routing"] == pytest.approx([21 / 43, 22 / 43], abs=1e-6)
    expert_0 = layer_record["experts"][0]
    assert expert_0["omega"] == pytest.approx({"0": 5 / 6, "1": 1 / 6}, abs=1e-6)
    assert expert_0["p_g"] == pytest.approx(21 / 43, abs=1e-6)
    assert expert_0["tau"] is None and expert_0["aligned"] is None
    json.dumps(aggregated.record)


@pytest.mark.parametrize(
    ("ablation", "omega_0", "omega_1"),
    [
        ("uniform-align", [1 / 2, 1 / 2], [1 / 2, 1 / 2]),
        # s = o: e0 [2r, r] -> [2/3, 1/3]; e1 [r, 2r] -> [1/3, 2/3].
        ("overlap-only", [2 / 3, 1 / 3], [1 / 3, 2 / 3]),
        # s = m: e0 [0.5, 0.2] -> [5/7, 2/7]; e1 [0.1, 0.4] -> [1/5, 4/5].
        ("margin-only", [5 / 7, 2 / 7], [1 / 5, 4 / 5]),
    ],
)
def test_consistency_score_variants(
    ablation: str, omega_0: list[float], omega_1: list[float]
) -> None:
    strategy = FedAlignMoE(FUSED, ablation=ablation)
    aggregated = strategy.aggregate(1, build(FUSED), two_routing_clients(FUSED), {})
    weights = aggregated.state["client_weights"]
    assert_close(weights[0]["omega"]["moe"], torch.tensor([omega_0[0], omega_1[0]]))
    assert_close(weights[1]["omega"]["moe"], torch.tensor([omega_0[1], omega_1[1]]))
    # Router row 0 = omega(e0) . [[1, 2], [5, 6]].
    row_0 = omega_0[0] * torch.tensor([1.0, 2.0]) + omega_0[1] * torch.tensor([5.0, 6.0])
    assert_close(aggregated.parameters["moe.router.weight"][0], row_0)


def test_eps_floor_gives_uniform_weights_for_unscored_expert() -> None:
    # Zero margins everywhere: every s is floored to eps -> omega = 1/2 for both experts.
    results = [
        ClientResult(0, 1, build(FUSED), stats((0.8, 0.2), margin=(0.0, 0.0))),
        ClientResult(1, 3, build(FUSED), stats((0.2, 0.8), margin=(0.0, 0.0))),
    ]
    aggregated = FedAlignMoE(FUSED, ablation="consistency").aggregate(1, build(FUSED), results, {})
    assert_close(aggregated.state["client_weights"][0]["omega"]["moe"], torch.tensor([0.5, 0.5]))
    # p_g = 0.5 * pbar_0 + 0.5 * pbar_1 = [0.5, 0.5].
    assert_close(aggregated.state["global_routing"]["moe"], torch.tensor([0.5, 0.5]))


# ------------------------------------------------------------ client instructions, alpha
def test_instructions_and_alpha_across_rounds() -> None:
    strategy = FedAlignMoE(FUSED, ablation="adaptive-reg", routing_lambda=0.1)
    # Round 1: no p_g yet -> no regulariser; alpha = 1; statistics requested.
    first = strategy.configure_train(1, [0, 1], strategy.initial_state())
    assert routing_lambda(first[0]) == 0.0
    assert global_routing(first[0]) == {}
    assert first[0].collect_statistics
    assert first[0].loss_terms == []
    assert_close(strategy.expert_alpha(0, strategy.initial_state())["moe"], torch.ones(2))

    state = strategy.aggregate(1, build(FUSED), two_routing_clients(FUSED), {}).state
    second = strategy.configure_train(2, [0, 1, 2], state)
    assert routing_lambda(second[0]) == 0.1
    assert_close(global_routing(second[0])["moe"], torch.tensor([21 / 43, 22 / 43]))
    # alpha = clip(|S_1| * omega, 0, 1) with |S_1| = 2:
    #   client 0: 2 * [5/6, 1/9] = [5/3, 2/9] -> [1, 2/9]
    #   client 1: 2 * [1/6, 8/9] = [1/3, 16/9] -> [1/3, 1]
    #   client 2 never participated -> ones.
    assert_close(expert_alpha(second[0])["moe"], torch.tensor([1.0, 2 / 9]))
    assert_close(expert_alpha(second[1])["moe"], torch.tensor([1 / 3, 1.0]))
    assert_close(expert_alpha(second[2])["moe"], torch.ones(2))

    # Round 2 with client 0 alone: omega = 1 and |S_2| = 1 -> alpha = 1; client 1 keeps its
    # weights from round 1.
    only_client_0 = two_routing_clients(FUSED)[:1]
    state = strategy.aggregate(2, build(FUSED), only_client_0, state).state
    third = strategy.configure_train(3, [0, 1], state)
    assert_close(expert_alpha(third[0])["moe"], torch.ones(2))
    assert_close(expert_alpha(third[1])["moe"], torch.tensor([1 / 3, 1.0]))
    assert state["client_weights"][1]["round"] == 1
    assert_close(
        state["client_weights"][0],
        {"round": 2, "num_selected": 1, "omega": {"moe": torch.ones(2)}},
    )


def test_client_proximal_term_sits_beside_the_regulariser() -> None:
    strategy = FedAlignMoE(FUSED, ablation="full-sound", client_proximal_mu=0.02)
    first = strategy.configure_train(1, [0, 1], strategy.initial_state())
    assert [t.name for t in first[0].loss_terms] == ["proximal"]  # no p_g yet
    assert proximal_mu(first[0]) == 0.02 and first[1].loss_terms[0].coefficient == 0.01
    state = strategy.aggregate(1, build(FUSED), two_routing_clients(FUSED), {}).state
    second = strategy.configure_train(2, [0], state)
    assert [t.name for t in second[0].loss_terms] == ["proximal", "routing-alignment"]
    # off in the paper's method, and never in row 1 (plain averaging)
    assert FedAlignMoE(FUSED, ablation="full").configure_train(1, [0], {})[0].loss_terms == []
    # the default row (full-sound-prox) takes mu 0.01 unless given another value
    default = FedAlignMoE(FUSED)
    assert default.options.ablation == "full-sound-prox"
    assert proximal_mu(default.configure_train(1, [0], {})[0]) == 0.01
    assert default.method_options() == FedAlignMoE(FUSED, ablation="full-sound").method_options()
    tuned = FedAlignMoE(FUSED, client_proximal_mu=0.1)
    assert proximal_mu(tuned.configure_train(1, [0], {})[0]) == 0.1
    # the decision record says which mu the clients used, and only when one is on
    record = default.aggregate(1, build(FUSED), two_routing_clients(FUSED), {}).record
    assert record["client_proximal_mu"] == 0.01 and record["ablation"] == "full-sound-prox"
    paper = FedAlignMoE(FUSED, ablation="full")
    assert (
        "client_proximal_mu"
        not in paper.aggregate(1, build(FUSED), two_routing_clients(FUSED), {}).record
    )
    row_1 = FedAlignMoE(FUSED, ablation="fedavg", client_proximal_mu=0.02)
    assert row_1.configure_train(1, [0], {})[0].loss_terms == []
    with pytest.raises(OptionError, match="client_proximal_mu"):
        FedAlignMoE(FUSED, client_proximal_mu=-1.0)


def test_alpha_is_one_below_adaptive_reg() -> None:
    strategy = FedAlignMoE(FUSED, ablation="consistency")
    state = strategy.aggregate(1, build(FUSED), two_routing_clients(FUSED), {}).state
    assert_close(expert_alpha(strategy.configure_train(2, [0], state)[0])["moe"], torch.ones(2))


@LAYOUTS
def test_fedavg_ablation_equals_fedavg(layout: MoELayout) -> None:
    strategy = FedAlignMoE(layout, ablation="fedavg")
    assert not strategy.needs_routing_statistics
    results = two_routing_clients(layout)
    results[1].num_examples = 3
    state = {"global_routing": {"moe": torch.tensor([0.9, 0.1])}}
    instruction = strategy.configure_train(2, [0], state)[0]
    assert routing_lambda(instruction) == 0.0
    assert not instruction.collect_statistics
    ours = strategy.aggregate(1, build(layout), results, {})
    reference = FedAvg(layout).aggregate(1, build(layout), results, {})
    assert ours.parameters.keys() == reference.parameters.keys()
    for name, tensor in reference.parameters.items():
        assert_close(ours.parameters[name], tensor)
    assert ours.record["layers"] == {}


# --------------------------------------------------------------- D: semantic aggregation
THETA_0 = [1.0, 1.0, 1.0, 1.0]  # previous global expert 0
THETA_1 = [5.0, 5.0, 5.0, 5.0]  # previous global expert 1 (nobody routes to it)
V = torch.tensor([1.0, -1.0, 2.0, 0.0])  # update direction


def semantic_round(
    layout: MoELayout,
    update_scales: Sequence[float],
    hidden: Sequence[Sequence[float]],
    usage: Sequence[float] = (0.5, 0.5, 0.5),
    counts: Sequence[float] = (10.0, 10.0, 10.0),
    num_examples: Sequence[int] = (1, 1, 1),
    personalized: bool = False,
) -> tuple[FedAlignMoE, dict[str, torch.Tensor], list[ClientResult]]:
    """Three clients whose expert 0 moved by ``scale_i * V`` with ``mu_i(0) = hidden[i]``."""
    results = []
    for cid in range(3):
        expert_0 = (torch.tensor(THETA_0) + update_scales[cid] * V).tolist()
        results.append(
            ClientResult(
                cid,
                num_examples[cid],
                build(layout, (expert_0, [9.0 + cid] * 4)),
                stats(
                    usage=(usage[cid], 0.0),
                    token_count=(counts[cid], 0.0),
                    mean_hidden=(hidden[cid], (float(cid), 1.0)),
                ),
            )
        )
    strategy = FedAlignMoE(layout, ablation="full", personalized_experts=personalized)
    return strategy, build(layout, (THETA_0, THETA_1)), results


def expert(parameters: dict[str, torch.Tensor], layout: MoELayout, index: int) -> torch.Tensor:
    return layout.layers[0].expert_vector(parameters, index).float()


@LAYOUTS
def test_opposite_update_is_excluded(layout: MoELayout) -> None:
    # Updates +V, +2V, -V with the same routed hidden states: D = [[1,1,-1],[1,1,-1],[-1,-1,1]]
    # gamma_01 = 1, gamma_02 = gamma_12 = 0 -> c = [1/2, 1/2, 0], M = 1/3,
    # Sigma (population) = sqrt(((1/6)^2 * 2 + (1/3)^2) / 3) = sqrt(1/18), tau = 1/3 - sqrt(1/18)
    # ~ 0.0976 -> A = {0, 1}; w = n * u = [0.5, 0.5] -> theta = theta0 + (1 + 2) / 2 V.
    strategy, global_parameters, results = semantic_round(
        layout, (1.0, 2.0, -1.0), [(1.0, 0.0)] * 3
    )
    aggregated = strategy.aggregate(1, global_parameters, results, {})
    assert_close(expert(aggregated.parameters, layout, 0), torch.tensor(THETA_0) + 1.5 * V)
    record = aggregated.record["layers"]["moe"]["experts"][0]
    assert record["consensus"] == pytest.approx({"0": 0.5, "1": 0.5, "2": 0.0}, abs=1e-6)
    assert record["tau"] == pytest.approx(1 / 3 - math.sqrt(1 / 18), abs=1e-6)
    assert record["aligned"] == [0, 1]
    assert record["active"] == [0, 1, 2]
    assert record["aggregation_weights"] == pytest.approx({"0": 0.5, "1": 0.5}, abs=1e-6)
    assert record["fallback"] is None
    # Expert 1: no client routed a token to it -> previous global value kept.
    assert_close(expert(aggregated.parameters, layout, 1), torch.tensor(THETA_1))
    expert_1 = aggregated.record["layers"]["moe"]["experts"][1]
    assert expert_1["fallback"] == "no-active-client"
    assert expert_1["active"] == []
    assert aggregated.record["layers"]["moe"]["expert_aggregation"] == "semantic"
    json.dumps(aggregated.record)


@LAYOUTS
def test_client_with_different_routed_hidden_states_is_excluded(layout: MoELayout) -> None:
    # Same update direction (V, 2V, 3V: D = 1) but client 2's mu points elsewhere (S_02 = S_12
    # = 0): gamma as in the opposite-update case -> A = {0, 1}, theta = theta0 + 1.5 V.
    strategy, global_parameters, results = semantic_round(
        layout, (1.0, 2.0, 3.0), [(1.0, 0.0), (2.0, 0.0), (0.0, 1.0)]
    )
    aggregated = strategy.aggregate(1, global_parameters, results, {})
    assert_close(expert(aggregated.parameters, layout, 0), torch.tensor(THETA_0) + 1.5 * V)
    assert aggregated.record["layers"]["moe"]["experts"][0]["aligned"] == [0, 1]


@LAYOUTS
def test_identical_clients_reduce_to_usage_weighted_mean(layout: MoELayout) -> None:
    # gamma = 1 for every pair -> c = [1, 1, 1], Sigma = 0, tau = 1, A = everyone.
    # w = n * u = [1 * 0.2, 1 * 0.4, 2 * 0.4] = [0.2, 0.4, 0.8] -> [1/7, 2/7, 4/7];
    # theta = theta0 + (1 * 1 + 2 * 2 + 4 * 3) / 7 V = theta0 + 17/7 V.
    strategy, global_parameters, results = semantic_round(
        layout,
        (1.0, 2.0, 3.0),
        [(1.0, 0.0)] * 3,
        usage=(0.2, 0.4, 0.4),
        num_examples=(1, 1, 2),
    )
    aggregated = strategy.aggregate(1, global_parameters, results, {})
    expected = torch.tensor(THETA_0) + 17 / 7 * V
    assert_close(expert(aggregated.parameters, layout, 0), expected)
    usage_weighted = sum(
        w * expert(r.parameters, layout, 0)
        for w, r in zip([1 / 7, 2 / 7, 4 / 7], results, strict=True)
    )
    assert_close(expert(aggregated.parameters, layout, 0), usage_weighted)
    record = aggregated.record["layers"]["moe"]["experts"][0]
    assert record["aligned"] == [0, 1, 2]
    assert record["tau"] == pytest.approx(1.0, abs=1e-6)


@LAYOUTS
def test_single_active_client_falls_back(layout: MoELayout) -> None:
    strategy, global_parameters, results = semantic_round(
        layout, (1.0, 2.0, -1.0), [(1.0, 0.0)] * 3, counts=(0.0, 10.0, 0.0)
    )
    aggregated = strategy.aggregate(1, global_parameters, results, {})
    # Usage-weighted mean over the active clients = client 1's expert.
    assert_close(expert(aggregated.parameters, layout, 0), torch.tensor(THETA_0) + 2 * V)
    record = aggregated.record["layers"]["moe"]["experts"][0]
    assert record["fallback"] == "single-active-client"
    assert record["aligned"] == [1]
    assert record["tau"] is None
    assert record["consensus"] == {}


@LAYOUTS
def test_inactive_clients_contribute_nothing(layout: MoELayout) -> None:
    # Client 2 routed no token to expert 0: its wild expert (theta0 + 1000 V) and its mu are
    # ignored. Two active clients: c_0 = c_1 = gamma_01 = 1 -> both aligned, theta0 + 1.5 V.
    strategy, global_parameters, results = semantic_round(
        layout,
        (1.0, 2.0, 1000.0),
        [(1.0, 0.0), (1.0, 0.0), (-1.0, 0.0)],
        usage=(0.5, 0.5, 0.0),
        counts=(10.0, 10.0, 0.0),
    )
    aggregated = strategy.aggregate(1, global_parameters, results, {})
    assert_close(expert(aggregated.parameters, layout, 0), torch.tensor(THETA_0) + 1.5 * V)
    record = aggregated.record["layers"]["moe"]["experts"][0]
    assert record["active"] == [0, 1]
    assert record["aligned"] == [0, 1]
    assert set(record["consensus"]) == {"0", "1"}


def test_semantic_alignment_sample_std_option() -> None:
    # c = [1/2, 1/2, 0]: sample std = sqrt((1/36 + 1/36 + 1/9) / 2) = sqrt(1/12).
    gamma_pattern = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    decision = semantic_alignment(
        torch.ones(3, 3), gamma_pattern, torch.ones(3, dtype=torch.bool), threshold_std="sample"
    )
    assert decision.threshold == pytest.approx(1 / 3 - math.sqrt(1 / 12))
    assert decision.aligned.tolist() == [True, True, False]
    assert_close(decision.consensus, torch.tensor([0.5, 0.5, 0.0]))


@LAYOUTS
def test_personalized_experts_follow_semantic_regions(layout: MoELayout) -> None:
    # Opposite-update case: gamma_01 = 1 >= tau, gamma_02 = gamma_12 = 0.
    # Client 0's region {0 (gamma_00 = 1), 1}: weights [1/2, 1/2] -> theta0 + 1.5 V (same for 1).
    # Client 2's region is itself alone -> its own expert theta0 - V.
    strategy, global_parameters, results = semantic_round(
        layout, (1.0, 2.0, -1.0), [(1.0, 0.0)] * 3, personalized=True
    )
    aggregated = strategy.aggregate(1, global_parameters, results, {})
    personal = aggregated.client_parameters
    assert set(personal) == {0, 1, 2}
    assert_close(expert(personal[0], layout, 0), torch.tensor(THETA_0) + 1.5 * V)
    assert_close(expert(personal[1], layout, 0), torch.tensor(THETA_0) + 1.5 * V)
    assert_close(expert(personal[2], layout, 0), torch.tensor(THETA_0) - V)
    # Expert 1 had no active client: everyone starts from the global value.
    assert_close(expert(personal[2], layout, 1), torch.tensor(THETA_1))
    assert set(personal[2]) == layout.expert_param_names()
    start = strategy.configure_train(2, [2], aggregated.state)[2].start_parameters
    assert start is not None
    assert_close(expert(start, layout, 0), torch.tensor(THETA_0) - V)


def test_personalized_experts_need_full_ablation() -> None:
    with pytest.raises(OptionError, match="personalized_experts"):
        FedAlignMoE(FUSED, ablation="consistency", personalized_experts=True)
    with pytest.raises(OptionError, match="'ablation'"):
        FedAlignMoE(FUSED, ablation="nope")


# -------------------------------------------------------------------- state, dtype, build
def test_state_round_trip_through_torch_save() -> None:
    strategy, global_parameters, results = semantic_round(
        FUSED, (1.0, 2.0, -1.0), [(1.0, 0.0)] * 3, personalized=True
    )
    first = strategy.aggregate(1, global_parameters, results, {})
    buffer = io.BytesIO()
    torch.save(first.state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    def second_round(state: dict) -> tuple:
        instructions = strategy.configure_train(2, [0, 1, 2], state)
        aggregated = strategy.aggregate(2, first.parameters, results, state)
        return instructions, aggregated

    original_instructions, original = second_round(first.state)
    loaded_instructions, reloaded = second_round(loaded)
    for cid in (0, 1, 2):
        a, b = original_instructions[cid], loaded_instructions[cid]
        assert routing_lambda(a) == routing_lambda(b)
        assert_close(expert_alpha(a), expert_alpha(b))
        assert_close(global_routing(a), global_routing(b))
        assert_close(a.start_parameters, b.start_parameters)
    assert_close(original.parameters, reloaded.parameters)
    assert_close(original.state, reloaded.state)
    assert original.record == reloaded.record
    assert original.record["layers"]["moe"]["routing_reference"] == "previous-global"


def test_bfloat16_parameters_keep_their_dtype() -> None:
    strategy = FedAlignMoE(FUSED, ablation="full")
    results = two_routing_clients(FUSED)
    for result in results:
        result.parameters = {k: v.bfloat16() for k, v in result.parameters.items()}
    global_parameters = build(FUSED, dtype=torch.bfloat16)
    aggregated = strategy.aggregate(1, global_parameters, results, {})
    assert all(t.dtype == torch.bfloat16 for t in aggregated.parameters.values())
    # Router bias row 0 = 5/6 * 1 + 1/6 * 0 (as in the float32 case), rounded to bfloat16.
    assert_close(
        aggregated.parameters["moe.router.bias"],
        torch.tensor([5 / 6, 25 / 9]).bfloat16(),
    )


def test_overlap_definitions_by_hand() -> None:
    """The three overlap options on two clients and two experts, margins 1.

    pbar_1 = (0.8, 0.2), pbar_2 = (0.2, 0.8), previous p_g = (0.5, 0.5).
    geometric: o = sqrt(pbar * 0.5) -> per expert the factor sqrt(0.5) cancels:
      omega(e=0) = sqrt(.8) / (sqrt(.8) + sqrt(.2)) = 2/3.
    bhattacharyya: BC_1 = BC_2 = sqrt(.4) + sqrt(.1) -> omega = 1/2 everywhere.
    intersection: o = min(pbar, 0.5) -> e=0: (0.5, 0.2) -> omega = (5/7, 2/7).
    """
    from fedalign.strategies.fedalign import consistency_weights

    pbar = torch.tensor([[0.8, 0.2], [0.2, 0.8]])
    margin = torch.ones(2, 2)
    previous = torch.tensor([0.5, 0.5])
    geometric = consistency_weights(pbar, margin, previous, overlap="geometric")
    assert_close(geometric[:, 0], torch.tensor([2 / 3, 1 / 3]))
    bhattacharyya = consistency_weights(pbar, margin, previous, overlap="bhattacharyya")
    assert_close(bhattacharyya, torch.full((2, 2), 0.5))
    intersection = consistency_weights(pbar, margin, previous, overlap="intersection")
    assert_close(intersection[:, 0], torch.tensor([5 / 7, 2 / 7]))
    # with a different previous p_g only the geometric definition stays the same
    skewed = torch.tensor([0.9, 0.1])
    assert_close(consistency_weights(pbar, margin, skewed, overlap="geometric"), geometric)
    assert not torch.allclose(
        consistency_weights(pbar, margin, skewed, overlap="intersection"), intersection
    )
    with pytest.raises(ValueError, match="overlap"):
        consistency_weights(pbar, margin, previous, overlap="cosine")


@LAYOUTS
def test_unknown_overlap_names_the_field(layout: MoELayout) -> None:
    with pytest.raises(OptionError, match="'overlap'") as error:
        FedAlignMoE(layout, overlap="cosine")
    assert "geometric" in str(error.value) and "cosine" in str(error.value)


# ------------------------------------------------- step A: routing signal, count weighting
# Three experts, top-2: usage sums to 2 over experts, shares u / 2 sum to 1.
USAGE = torch.tensor([[1.0, 0.6, 0.4], [0.2, 0.8, 1.0]])  # shares [.5, .3, .2], [.1, .4, .5]
SHARES = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.4, 0.5]])
REFERENCE = torch.tensor([0.3, 0.35, 0.35])  # round 1: the plain mean of the shares
COUNTS = torch.tensor([[100.0, 60.0, 40.0], [5.0, 20.0, 25.0]])


def test_consistency_signal_softmax_and_usage() -> None:
    from fedalign.strategies.fedalign import consistency_signal

    pbar = torch.tensor([[0.4, 0.3, 0.3], [0.2, 0.2, 0.6]])
    assert consistency_signal(pbar, USAGE, 2, "softmax") is pbar
    assert_close(consistency_signal(pbar, USAGE, 2, "usage"), SHARES)
    with pytest.raises(ValueError, match="routing signal"):
        consistency_signal(pbar, USAGE, 2, "logits")


def test_overlaps_on_the_usage_signal_by_hand() -> None:
    from fedalign.strategies.fedalign import consistency_weights

    margin = torch.ones(2, 3)
    # intersection: o = min(share, ref): [.3, .3, .2] and [.1, .35, .35]
    #   e0: [.3, .1] -> [3/4, 1/4]; e1: [.3, .35] -> [6/13, 7/13]; e2: [.2, .35] -> [4/11, 7/11]
    intersection = consistency_weights(SHARES, margin, REFERENCE, overlap="intersection")
    assert_close(intersection, torch.tensor([[3 / 4, 6 / 13, 4 / 11], [1 / 4, 7 / 13, 7 / 11]]))
    # bhattacharyya: one coefficient per client, BC_i = sum_e sqrt(share_i(e) ref(e)).
    bc_0 = math.sqrt(0.15) + math.sqrt(0.105) + math.sqrt(0.07)
    bc_1 = math.sqrt(0.03) + math.sqrt(0.14) + math.sqrt(0.175)
    bhattacharyya = consistency_weights(SHARES, margin, REFERENCE, overlap="bhattacharyya")
    assert_close(bhattacharyya[0], torch.full((3,), bc_0 / (bc_0 + bc_1)))
    # geometric: the reference cancels: e0 = sqrt(.5) / (sqrt(.5) + sqrt(.1)).
    geometric = consistency_weights(SHARES, margin, REFERENCE, overlap="geometric")
    assert_close(float(geometric[0, 0]), math.sqrt(0.5) / (math.sqrt(0.5) + math.sqrt(0.1)))


def test_count_weighted_consistency_by_hand() -> None:
    from fedalign.strategies.fedalign import consistency_weights

    margin = torch.ones(2, 3)
    # intersection * count: e0 [.3 * 100, .1 * 5] = [30, .5] -> [60/61, 1/61];
    #   e1 [.3 * 60, .35 * 20] = [18, 7] -> [18/25, 7/25];
    #   e2 [.2 * 40, .35 * 25] = [8, 8.75] -> [32/67, 35/67].
    weights = consistency_weights(
        SHARES, margin, REFERENCE, overlap="intersection", token_count=COUNTS
    )
    assert_close(weights, torch.tensor([[60 / 61, 18 / 25, 32 / 67], [1 / 61, 7 / 25, 35 / 67]]))
    # Softmax signal, geometric, margins [1, 1]: pbar (0.8, 0.2) / (0.2, 0.8), counts (1, 4) /
    # (3, 4): e0 ∝ [sqrt(.8) * 1, sqrt(.2) * 3] = [2r, 3r] -> [2/5, 3/5]; e1 ∝ [4r, 8r].
    pbar = torch.tensor([[0.8, 0.2], [0.2, 0.8]])
    counted = consistency_weights(
        pbar,
        torch.ones(2, 2),
        torch.tensor([0.5, 0.5]),
        token_count=torch.tensor([[1.0, 4.0], [3.0, 4.0]]),
    )
    assert_close(counted, torch.tensor([[2 / 5, 1 / 3], [3 / 5, 2 / 3]]))
    # Nobody routed to an expert (counts 0): every s is floored to eps -> uniform.
    zero = consistency_weights(
        pbar,
        torch.ones(2, 2),
        torch.tensor([0.5, 0.5]),
        token_count=torch.tensor([[0.0, 4.0], [0.0, 4.0]]),
    )
    assert_close(zero[:, 0], torch.tensor([0.5, 0.5]))
    # One client without tokens: s = 0 -> eps; the other takes (almost) all the weight.
    one = consistency_weights(
        pbar,
        torch.ones(2, 2),
        torch.tensor([0.5, 0.5]),
        eps=1e-6,
        token_count=torch.tensor([[2.0, 4.0], [0.0, 4.0]]),
    )
    s_0 = math.sqrt(0.4) * 2.0
    assert_close(float(one[0, 0]), s_0 / (s_0 + 1e-6))
    # "uniform" ignores counts.
    uniform = consistency_weights(pbar, torch.ones(2, 2), pbar[0], "uniform", token_count=COUNTS)
    assert_close(uniform, torch.full((2, 2), 0.5))


def usage_clients() -> list[ClientResult]:
    """Identical softmax means, different top-1 usage: (0.9, 0.1) and (0.3, 0.7)."""
    return [
        ClientResult(
            cid,
            1,
            build(FUSED),
            stats(routing_distribution=(0.5, 0.5), margin=(1.0, 1.0), usage=usage),
        )
        for cid, usage in enumerate([(0.9, 0.1), (0.3, 0.7)])
    ]


def test_usage_signal_in_the_strategy_across_rounds() -> None:
    strategy = FedAlignMoE(
        FUSED, ablation="consistency", routing_signal="usage", overlap="intersection"
    )
    first = strategy.aggregate(1, build(FUSED), usage_clients(), {})
    # top-1: shares = usage. Reference = mean = [0.6, 0.4]; o = min(share, ref):
    #   client 0 [0.6, 0.1], client 1 [0.3, 0.4] -> omega e0 [2/3, 1/3], e1 [1/5, 4/5].
    assert_close(first.state["client_weights"][0]["omega"]["moe"], torch.tensor([2 / 3, 1 / 5]))
    # p_g from the softmax means (all 0.5): [0.5, 0.5].
    assert_close(first.state["global_routing"]["moe"], torch.tensor([0.5, 0.5]))
    # Global usage share: e0 = 2/3 * .9 + 1/3 * .3 = .7, e1 = 1/5 * .1 + 4/5 * .7 = .58,
    # renormalised: [.7, .58] / 1.28 = [35/64, 29/64].
    assert_close(first.state["global_usage"]["moe"], torch.tensor([35 / 64, 29 / 64]))
    layer = first.record["layers"]["moe"]
    assert layer["routing_reference"] == "client-mean"
    assert first.record["method_options"]["routing_signal"] == "usage"
    # The softmax signal sees no difference between these clients.
    softmax = FedAlignMoE(FUSED, ablation="consistency", overlap="intersection")
    plain = softmax.aggregate(1, build(FUSED), usage_clients(), {})
    assert_close(plain.state["client_weights"][0]["omega"]["moe"], torch.tensor([0.5, 0.5]))
    assert "global_usage" not in plain.state

    # Round 2 against the stored global usage [35/64, 29/64]:
    #   o_0 = [min(.9, 35/64), min(.1, 29/64)] = [35/64, .1], o_1 = [.3, 29/64]
    #   e0: (35/64) / (35/64 + .3) = 175/271; e1: .1 / (.1 + 29/64) = 32/177.
    second = strategy.aggregate(2, first.parameters, usage_clients(), first.state)
    assert_close(
        second.state["client_weights"][0]["omega"]["moe"], torch.tensor([175 / 271, 32 / 177])
    )
    assert second.record["layers"]["moe"]["routing_reference"] == "previous-global"


# ---------------------------------------------------------------- step D: semantic centre
def test_semantic_centre_vector_is_token_weighted_over_clients_and_experts() -> None:
    from fedalign.strategies.fedalign import semantic_centre_vector

    mean_hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 3.0], [9.0, 9.0]]])  # (2, 2, 2)
    counts = torch.tensor([[3.0, 1.0], [4.0, 0.0]])
    # (3 [1, 0] + 1 [0, 1] + 4 [3, 3]) / 8 = [15, 13] / 8; the count-0 entry is ignored.
    assert_close(semantic_centre_vector(mean_hidden, counts), torch.tensor([15 / 8, 13 / 8]))
    assert_close(semantic_centre_vector(mean_hidden, torch.zeros(2, 2)), torch.zeros(2))


def test_centred_cosines_of_a_shared_dominant_direction() -> None:
    from fedalign.strategies.fedalign import hidden_similarities

    # One expert, three clients: hidden states that share the direction [10, 0, 0].
    mean_hidden = torch.tensor([[[10.0, 1.0, 0.0]], [[10.0, 0.0, 1.0]], [[10.0, -1.0, -1.0]]])
    counts = torch.ones(3, 1)
    uncentred = hidden_similarities(mean_hidden, counts, "uncentred")[0]
    off_diagonal = uncentred[~torch.eye(3, dtype=torch.bool)]
    assert float(off_diagonal.min()) > 0.97  # every pair ~1: S carries no information
    assert_close(float(uncentred[0, 1]), 100 / 101)
    # Centre c = [10, 0, 0]: centred rows [0, 1, 0], [0, 0, 1], [0, -1, -1]:
    # cos = 0, -1/sqrt(2), -1/sqrt(2).
    centred = hidden_similarities(mean_hidden, counts, "centred")[0]
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[1.0, 0.0, -r], [0.0, 1.0, -r], [-r, -r, 1.0]])
    assert_close(centred, expected)
    # Entries with no routed token stay zero vectors after centring: similarity 0.
    inactive = hidden_similarities(mean_hidden, torch.tensor([[1.0], [1.0], [0.0]]), "centred")
    assert_close(inactive[0, 2], torch.zeros(3))
    with pytest.raises(ValueError, match="semantic centre"):
        hidden_similarities(mean_hidden, counts, "whitened")


def with_options(strategy: FedAlignMoE, **changes: object) -> FedAlignMoE:
    """The same strategy with some options changed."""
    return FedAlignMoE(strategy.layout, dataclasses.replace(strategy.options, **changes))


@LAYOUTS
def test_centred_semantic_consensus_in_the_strategy(layout: MoELayout) -> None:
    # Same update direction (V, 2V, 3V: D = 1). mu(0) = [10, 1], [10, 1], [10, -2]; expert 1
    # has no tokens, so the centre is the mean of the expert-0 entries: [10, 0].
    # Centred: [0, 1], [0, 1], [0, -2] -> S_01 = 1, S_02 = S_12 = -1 -> gamma = S.
    # c = [(1 - 1)/2, (1 - 1)/2, -1] = [0, 0, -1].
    strategy, global_parameters, results = semantic_round(
        layout, (1.0, 2.0, 3.0), [(10.0, 1.0), (10.0, 1.0), (10.0, -2.0)]
    )
    strategy = with_options(strategy, semantic_centre="centred")
    aggregated = strategy.aggregate(1, global_parameters, results, {})
    record = aggregated.record["layers"]["moe"]["experts"][0]
    assert record["consensus"] == pytest.approx({"0": 0.0, "1": 0.0, "2": -1.0}, abs=1e-6)
    assert record["aligned"] == [0, 1]
    assert aggregated.record["method_options"]["semantic_centre"] == "centred"
    # Uncentred, every consensus is close to 1 (cos([10, 1], [10, -2]) = 98 / sqrt(101 * 104)).
    strategy = with_options(strategy, semantic_centre="uncentred")
    plain = strategy.aggregate(1, global_parameters, results, {})
    cross = 98 / math.sqrt(101 * 104)
    assert plain.record["layers"]["moe"]["experts"][0]["consensus"] == pytest.approx(
        {"0": (1 + cross) / 2, "1": (1 + cross) / 2, "2": cross}, abs=1e-6
    )
    assert "method_options" not in plain.record


# ------------------------------------------------------------------ step D: soft selection
@LAYOUTS
def test_soft_selection_keeps_every_active_client(layout: MoELayout) -> None:
    # Opposite-update case: c = [1/2, 1/2, 0], M = 1/3, Sigma = sqrt(1/18), tau = M - Sigma.
    # (c - tau) / Sigma = 1 + (c - M) / Sigma: 1 + sqrt(2)/2 for clients 0, 1 and
    # 1 - sqrt(2) for client 2. n = [1, 1, 2], u = 0.5: w ∝ [f_a, f_a, 2 f_b].
    strategy, global_parameters, results = semantic_round(
        layout, (1.0, 2.0, -1.0), [(1.0, 0.0)] * 3, num_examples=(1, 1, 2)
    )
    strategy = with_options(strategy, selection="soft")
    aggregated = strategy.aggregate(1, global_parameters, results, {})

    def sigmoid(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    f_a, f_b = sigmoid(1 + math.sqrt(2) / 2), sigmoid(1 - math.sqrt(2))
    total = 2 * f_a + 2 * f_b
    w = [f_a / total, f_a / total, 2 * f_b / total]
    expected = torch.tensor(THETA_0) + (w[0] * 1 + w[1] * 2 - w[2]) * V
    assert_close(expert(aggregated.parameters, layout, 0), expected)
    record = aggregated.record["layers"]["moe"]["experts"][0]
    assert record["selection"] == "soft"
    assert record["soft_membership"] == pytest.approx({"0": f_a, "1": f_a, "2": f_b}, abs=1e-6)
    assert record["aggregation_weights"] == pytest.approx(
        {"0": w[0], "1": w[1], "2": w[2]}, abs=1e-6
    )
    assert record["aligned"] == [0, 1]  # the hard set, for reference
    assert record["tau"] == pytest.approx(1 / 3 - math.sqrt(1 / 18), abs=1e-6)
    assert aggregated.record["method_options"]["selection"] == "soft"
    # Expert 1 has no active client: unchanged, no soft record.
    assert_close(expert(aggregated.parameters, layout, 1), torch.tensor(THETA_1))
    assert "selection" not in aggregated.record["layers"]["moe"]["experts"][1]
    json.dumps(aggregated.record)


def test_soft_selection_weights_edge_cases() -> None:
    from fedalign.strategies.fedalign import selection_weights

    ones = torch.ones(3, dtype=torch.bool)
    counts = torch.tensor([1.0, 1.0, 2.0])
    usage = torch.tensor([0.2, 0.4, 0.4])
    # All c equal (Sigma = 0): every factor sigmoid(0) = 1/2 -> the usage-weighted mean
    # n * u = [0.2, 0.4, 0.8] / 1.4.
    equal = semantic_alignment(torch.ones(3, 3), torch.ones(3, 3), ones)
    weights, membership = selection_weights(equal, ones, counts, usage, "soft")
    assert_close(membership, torch.full((3,), 0.5))
    assert_close(weights, torch.tensor([1 / 7, 2 / 7, 4 / 7]))
    hard, hard_membership = selection_weights(equal, ones, counts, usage, "hard")
    assert_close(hard, weights)
    assert_close(hard_membership, torch.ones(3))
    # One active client: no threshold; soft = hard = that client alone.
    single = torch.tensor([False, True, False])
    decision = semantic_alignment(torch.ones(3, 3), torch.ones(3, 3), single)
    weights, membership = selection_weights(decision, single, counts, usage, "soft")
    assert_close(weights, torch.tensor([0.0, 1.0, 0.0]))
    assert_close(membership, torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="selection"):
        selection_weights(decision, single, counts, usage, "top-half")


# ------------------------------------------------------------- options, presets, wiring
def test_default_options_leave_records_as_they_were() -> None:
    strategy, global_parameters, results = semantic_round(FUSED, (1.0, 2.0, -1.0), [(1.0, 0.0)] * 3)
    assert strategy.method_options() == {
        "routing_form": "literal",
        "routing_signal": "softmax",
        "overlap": "geometric",
        "count_weighted": False,
        "semantic_centre": "uncentred",
        "selection": "hard",
    }
    record = strategy.aggregate(1, global_parameters, results, {}).record
    assert "method_options" not in record
    assert "selection" not in record["layers"]["moe"]["experts"][0]


def test_full_sound_preset_and_conflicts() -> None:
    from fedalign.strategies.fedalign import ABLATION_PRESETS, resolve_method_options

    sound = FedAlignMoE(FUSED, ablation="full-sound")
    assert sound.method_options() == ABLATION_PRESETS["full-sound"]
    assert sound.method_options() == {
        "routing_form": "batch-kl",
        "routing_signal": "usage",
        "overlap": "intersection",
        "count_weighted": True,
        "semantic_centre": "centred",
        "selection": "soft",
    }
    assert sound.semantic_aggregation and sound.ablation_level == 4
    # Options equal to the preset's are fine; a third value conflicts.
    FedAlignMoE(FUSED, ablation="full-sound", routing_form="batch-kl", personalized_experts=True)
    with pytest.raises(OptionError, match=r"'routing_form' conflicts .* \(got 'topk-kl'\)"):
        FedAlignMoE(FUSED, ablation="full-sound", routing_form="topk-kl")
    with pytest.raises(OptionError, match="'overlap'"):
        resolve_method_options("full-sound", {"overlap": "bhattacharyya"})
    # Paper rows keep whatever is given.
    assert resolve_method_options("full", {"selection": "soft"})["selection"] == "soft"
    assert resolve_method_options("full", {})["routing_form"] == "literal"
    with pytest.raises(OptionError, match="'routing_form'"):
        FedAlignMoE(FUSED, routing_form="kl")
    with pytest.raises(OptionError, match="'selection'"):
        FedAlignMoE(FUSED, selection="top-half")


def test_ablation_overrides_spell_out_the_preset() -> None:
    from fedalign.config import ExperimentConfig
    from fedalign.federation import strategy_from_config
    from fedalign.strategies import ablation_overrides

    assert ablation_overrides("consistency") == {
        "strategy.name": "fedalign",
        "strategy.ablation": "consistency",
    }
    overrides = ablation_overrides("full-sound")
    assert overrides["strategy.ablation"] == "full"
    assert overrides["strategy.selection"] == "soft"
    # The spelled-out keys and the preset row give the same strategy options.
    spelled = ExperimentConfig()
    for key, value in overrides.items():
        spelled.set(key, value)
    spelled.validate()
    preset = ExperimentConfig()
    preset.set("strategy.name", "fedalign")
    preset.set("strategy.ablation", "full-sound")
    preset.validate()
    a = strategy_from_config(spelled, FUSED)
    b = strategy_from_config(preset, FUSED)
    assert isinstance(a, FedAlignMoE) and isinstance(b, FedAlignMoE)
    assert a.method_options() == b.method_options()
    with pytest.raises(OptionError, match="'ablation'"):
        ablation_overrides("best")


def test_config_validates_the_new_keys() -> None:
    from fedalign.config import ExperimentConfig

    for key, bad in [
        ("routing-form", "kl"),
        ("routing-signal", "logits"),
        ("semantic-centre", "whitened"),
        ("selection", "top-half"),
    ]:
        config = ExperimentConfig()
        config.set(f"strategy.{key}", bad)
        with pytest.raises(ConfigError, match=rf"strategy\.{key}"):
            config.validate()
    config = ExperimentConfig()
    config.set("strategy.name", "fedalign")
    config.set("strategy.ablation", "full-sound")
    config.set("strategy.semantic-centre", "uncentred")  # the default: takes the preset's
    config.validate()
    config.set("strategy.count-weighted", "true")
    config.validate()
    config.set("strategy.routing-form", "topk-kl")
    with pytest.raises(ConfigError, match=r"strategy\.routing-form conflicts"):
        config.validate()


def test_build_strategy_and_instructions_carry_the_options() -> None:
    options = {
        "ablation": "adaptive-reg",
        "routing_form": "topk-kl",
        "routing_signal": "usage",
        "count_weighted": True,
        "semantic_centre": "centred",
        "selection": "soft",
        "overlap": "bhattacharyya",
    }
    strategy = build_strategy("fedalign", options, FUSED)
    assert isinstance(strategy, FedAlignMoE)
    assert strategy.method_options() == {
        "routing_form": "topk-kl",
        "routing_signal": "usage",
        "overlap": "bhattacharyya",
        "count_weighted": True,
        "semantic_centre": "centred",
        "selection": "soft",
    }
    state = {"global_routing": {"moe": torch.tensor([0.5, 0.5])}}
    term = strategy.configure_train(2, [0], state)[0].term("routing-alignment")
    assert term is not None and term.options == {"form": "topk-kl"}
    paper = build_strategy("fedalign", {"ablation": "full"}, FUSED)
    term = paper.configure_train(2, [0], state)[0].term("routing-alignment")
    assert term is not None and term.options == {"form": "literal"}
    default = build_strategy("fedalign", {}, FUSED)
    term = default.configure_train(2, [0], state)[0].term("routing-alignment")
    assert term is not None and term.options == {"form": "batch-kl"}


@pytest.mark.slow
@pytest.mark.usefixtures("torch_one_thread")
def test_routing_form_reaches_the_client_loss(tmp_path: object) -> None:
    """Tiny runs: the round-2 routing loss differs between forms; batch-kl is >= 0."""
    from pathlib import Path

    from fedalign.config import ExperimentConfig
    from fedalign.experiments.run import run_experiment
    from fedalign.records import read_jsonl

    losses = {}
    for form in ("literal", "batch-kl", "topk-kl"):
        config = ExperimentConfig()
        for key, value in {
            "model.name": "tiny-upcycled",
            "model.max-length": 24,
            "data.max-train-examples": 120,
            "data.max-test-examples": 40,
            "partition.num-clients": 2,
            "partition.min-client-size": 10,
            "federated.rounds": 2,
            "train.local-steps": 2,
            "train.batch-size": 8,
            "strategy.name": "fedalign",
            "strategy.ablation": "full",  # the row that takes every form (no preset)
            "strategy.routing-lambda": 1.0,
            "strategy.stats-max-examples": 16,
            "strategy.routing-form": form,
            "run.progress": False,
        }.items():
            config.set(key, value)
        folder = Path(str(tmp_path)) / form
        run_experiment(config, folder, log=None)
        losses[form] = read_jsonl(folder / "metrics.jsonl")[-1]["routing_loss"]
    assert len(set(losses.values())) == 3
    assert losses["batch-kl"] >= 0 and losses["topk-kl"] >= 0


# ------------------------------------------------------------- merge strength (not the paper's)
@LAYOUTS
def test_merge_strength_zero_merges_like_fedavg(layout: MoELayout) -> None:
    """Opposite updates leave client 2 out of A_0 at full strength; at strength 0 expert 0,
    the router and the head are the data-share averages FedAvg gives (expert 1, which no
    client routed to, keeps its value: trained clients leave such an expert unchanged)."""
    strategy, global_parameters, results = semantic_round(
        layout, (1.0, 2.0, -1.0), [(1.0, 0.0)] * 3, num_examples=(1, 1, 2)
    )
    full = strategy.aggregate(1, global_parameters, results, {})
    assert full.record["layers"]["moe"]["experts"][0]["aligned"] == [0, 1]
    plain = with_options(strategy, merge_strength=0.0).aggregate(1, global_parameters, results, {})
    fedavg = FedAvg(layout).aggregate(1, global_parameters, results, {})
    torch.testing.assert_close(
        expert(plain.parameters, layout, 0), expert(fedavg.parameters, layout, 0)
    )
    for name in ("moe.router.weight", "moe.router.bias", "head.weight"):
        torch.testing.assert_close(plain.parameters[name], fedavg.parameters[name])
    assert plain.record["merge_strength"] == 0.0
    assert plain.record["layers"]["moe"]["experts"][0]["aggregation_weights"] == {
        "0": 0.25,
        "1": 0.25,
        "2": 0.5,
    }
    assert "merge_strength" not in full.record


@LAYOUTS
def test_half_merge_strength_bounds_the_distance_from_data_shares(layout: MoELayout) -> None:
    strategy, global_parameters, results = semantic_round(
        layout, (1.0, 2.0, -1.0), [(1.0, 0.0)] * 3, num_examples=(1, 1, 2)
    )
    shares = {"0": 0.25, "1": 0.25, "2": 0.5}
    for strength in (1.0, 0.5):
        half = with_options(strategy, merge_strength=strength)
        weights = half.aggregate(1, global_parameters, results, {}).record["layers"]["moe"][
            "experts"
        ][0]["aggregation_weights"]
        tv = 0.5 * sum(abs(weights.get(c, 0.0) - s) for c, s in shares.items())
        assert tv <= strength * 0.5 + 1e-6  # TV(full merge, shares) = 0.5 here
        assert (tv > 0.49) is (strength == 1.0)
    with pytest.raises(OptionError, match="merge_strength"):
        FedAlignMoE(layout, merge_strength=1.5)
