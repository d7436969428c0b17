"""LoRA pairs and LoRA experts in the strategies: factor means vs exact products + SVD."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from fedalign.config import ConfigError
from fedalign.errors import OptionError
from fedalign.federation import strategy_from_config
from fedalign.moe import LoRAExpertSlice, LoRAFactors, MoELayerLayout, MoELayout
from fedalign.moe.lora import product_mean, relative_error
from fedalign.protocol import ClientResult, LayerRoutingStatistics
from fedalign.strategies import build_strategy
from fedalign.strategies.fedalign import cosine_gram
from tests.helpers import tiny_config

Tensor = torch.Tensor
E, R, OUT, IN, C = 2, 2, 6, 5, 3
EXPERTS = LoRAFactors(
    "moe.experts.lora_A", "moe.experts.lora_B", R, 0.5, num_experts=E, base="moe.experts.up"
)
ATTENTION = LoRAFactors("attn.lora_A", "attn.lora_B", R, 2.0, base="attn.weight")
LAYOUT = MoELayout(
    layers=(
        MoELayerLayout(
            name="moe",
            num_experts=E,
            top_k=1,
            hidden_size=IN,
            router_params=("moe.router.weight",),
            experts=((), ()),
            lora_experts=tuple((LoRAExpertSlice(EXPERTS, e),) for e in range(E)),
        ),
    ),
    lora_modules=(EXPERTS, ATTENTION),
)
BLOCKS = [(EXPERTS, 0), (EXPERTS, 1), (ATTENTION, 0)]


def stats() -> dict[str, LayerRoutingStatistics]:
    return {
        "moe": LayerRoutingStatistics(
            routing_distribution=torch.tensor([0.5, 0.5]),
            usage=torch.tensor([0.5, 0.5]),
            margin=torch.tensor([0.1, 0.1]),
            mean_hidden=torch.ones(E, IN),
            token_count=torch.tensor([10.0, 10.0]),
            num_tokens=20,
        )
    }


def state_from(blocks: Sequence[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """A flat state from ``(B, A)`` of expert 0, expert 1 and the attention pair."""
    state = {
        "moe.experts.lora_A": torch.zeros(E * R, IN),
        "moe.experts.lora_B": torch.zeros(OUT, E * R),
        "attn.lora_A": torch.zeros(R, IN),
        "attn.lora_B": torch.zeros(OUT, R),
        "moe.router.weight": torch.zeros(E, IN),
    }
    for (factors, index), (b, a) in zip(BLOCKS, blocks, strict=True):
        factors.write(state, index, b, a)
    return state


def shared_subspace(generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """Per client and block ``(U M, N V^T)``: product means of rank <= R."""
    subspaces = [
        (torch.randn(OUT, R, generator=generator), torch.randn(IN, R, generator=generator))
        for _ in BLOCKS
    ]
    return [
        [
            (
                u @ torch.randn(R, R, generator=generator),
                torch.randn(R, R, generator=generator) @ v.T,
            )
            for u, v in subspaces
        ]
        for _ in range(C)
    ]


def clients(blocks_per_client: Sequence[Sequence[tuple[Tensor, Tensor]]]) -> list[ClientResult]:
    return [
        ClientResult(cid, 10 * (cid + 1), state_from(blocks), stats())
        for cid, blocks in enumerate(blocks_per_client)
    ]


def exact_mean(
    results: Sequence[ClientResult],
    factors: LoRAFactors,
    index: int,
    weights: dict[str, float] | None = None,
) -> Tensor:
    """``sum_i w_i B_i A_i``; ``w`` by ``n_i`` unless given as ``{client id: w}``."""
    if weights is None:
        n = torch.tensor([float(r.num_examples) for r in results])
        weights = {str(r.client_id): float(v) for r, v in zip(results, n / n.sum(), strict=True)}
    results = [r for r in results if str(r.client_id) in weights]
    weights = torch.tensor([weights[str(r.client_id)] for r in results])
    bs = [factors.b(r.parameters, index) for r in results]
    as_ = [factors.a(r.parameters, index) for r in results]
    return product_mean(bs, as_, weights)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedmoe", "fedalign"])
def test_product_svd_reproduces_the_exact_product_mean(name: str) -> None:
    results = clients(shared_subspace(torch.Generator().manual_seed(0)))
    global_parameters = state_from([(torch.zeros(OUT, R), torch.zeros(R, IN))] * 3)
    strategy = build_strategy(name, {}, LAYOUT, lora_aggregation="product-svd")
    outcome = strategy.aggregate(1, global_parameters, results, strategy.initial_state())
    for factors, index in BLOCKS:
        weights = None  # FedMoE's usage weights are uniform here: n_i-weighted like FedAvg
        if name == "fedalign" and factors is EXPERTS:
            # step D: the aligned clients' weights (the global joins with 1 - sum w)
            record = outcome.record["layers"]["moe"]["experts"][index]
            weights = record["aggregation_weights"]
            assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
        exact = exact_mean(results, factors, index, weights)
        written = factors.b(outcome.parameters, index) @ factors.a(outcome.parameters, index)
        assert relative_error(exact, written) < 1e-5, (name, factors.base, index)
    assert outcome.record["lora"]["aggregation"] == "product-svd"
    assert outcome.record["lora"]["product_error_max"] < 1e-5
    assert outcome.record["lora"]["blocks"] == (3 if name in ("fedavg", "fedprox") else 1)


def test_factor_averaging_is_inexact_and_recorded() -> None:
    results = clients(shared_subspace(torch.Generator().manual_seed(0)))
    global_parameters = state_from([(torch.zeros(OUT, R), torch.zeros(R, IN))] * 3)
    strategy = build_strategy("fedavg", {}, LAYOUT)  # factors by default
    outcome = strategy.aggregate(1, global_parameters, results, {})
    errors = []
    for factors, index in BLOCKS:
        exact = exact_mean(results, factors, index)
        written = factors.b(outcome.parameters, index) @ factors.a(outcome.parameters, index)
        errors.append(relative_error(exact, written))
    assert min(errors) > 0.01
    assert outcome.record["lora"]["product_error_max"] == pytest.approx(max(errors), abs=1e-5)
    # the factors themselves are the plain weighted means (FedIT), as before
    plain = build_strategy("fedavg", {}, MoELayout(layers=())).aggregate(
        1, global_parameters, results, {}
    )
    for key, tensor in plain.parameters.items():
        assert torch.equal(outcome.parameters[key], tensor)
    assert "lora" not in plain.record


def reparametrised_clients(update_signs: Sequence[float]) -> tuple[list[ClientResult], dict]:
    """Clients with the same update direction per expert but unrelated factors.

    Client ``i``'s expert ``e`` is ``(B R_i, R_i^{-1} A)`` with ``B A = sign_i * D_e`` (D_e
    fixed): their products (updates from a zero global product) are parallel, their raw
    factors are not.
    """
    g = torch.Generator().manual_seed(3)
    base = [(torch.randn(OUT, R, generator=g), torch.randn(R, IN, generator=g)) for _ in BLOCKS]
    per_client = []
    for sign in update_signs:
        blocks = []
        for b, a in base:
            mixing = torch.randn(R, R, generator=g) + 3 * torch.eye(R)
            blocks.append((sign * b @ mixing, torch.linalg.inv(mixing) @ a))
        per_client.append(blocks)
    global_parameters = state_from([(torch.zeros(OUT, R), torch.randn(R, IN, generator=g))] * 3)
    return clients(per_client), global_parameters


@pytest.mark.parametrize("aggregation", ["factors", "product-svd"])
def test_fedalign_consensus_and_merge_use_expert_updates(aggregation: str) -> None:
    results, global_parameters = reparametrised_clients([1.0, 1.0, 1.0])
    layer = LAYOUT.layers[0]
    # the raw factors disagree, the updates s B_e A_e agree exactly
    raw = torch.stack([r.parameters["moe.experts.lora_B"].reshape(-1) for r in results])
    assert float(cosine_gram(raw).min()) < 0.9
    deltas = torch.stack([layer.lora_delta_vector(r.parameters, 0) for r in results])
    assert float(cosine_gram(deltas).min()) > 1 - 1e-5

    strategy = build_strategy(
        "fedalign", {"ablation": "full"}, LAYOUT, lora_aggregation=aggregation
    )
    outcome = strategy.aggregate(1, global_parameters, results, {})
    for expert_record in outcome.record["layers"]["moe"]["experts"]:
        assert expert_record["aligned"] == [0, 1, 2]
        assert all(c == pytest.approx(1.0, abs=1e-4) for c in expert_record["consensus"].values())
        assert expert_record["lora_update_size"] == OUT * IN
        merged = layer.lora_delta_vector(outcome.parameters, expert_record["expert"])
        target = (
            deltas[0]
            if expert_record["expert"] == 0
            else layer.lora_delta_vector(results[0].parameters, 1)
        )
        error = relative_error(target, merged)
        if aggregation == "product-svd":
            assert error < 1e-5 and expert_record["lora_product_error"] < 1e-5
        else:
            # the same update reached through different factors: their means miss it
            assert error > 0.01
            assert expert_record["lora_product_error"] == pytest.approx(error, abs=1e-5)


def test_fedalign_excludes_an_opposite_update_of_a_lora_expert() -> None:
    results, global_parameters = reparametrised_clients([1.0, 1.0, 1.0, -1.0])
    strategy = build_strategy(
        "fedalign", {"ablation": "full"}, LAYOUT, lora_aggregation="product-svd"
    )
    outcome = strategy.aggregate(1, global_parameters, results, {})
    for expert_record in outcome.record["layers"]["moe"]["experts"]:
        assert 3 not in expert_record["aligned"]
        # gamma = S * max(D, 0): an opposite update has no positive cosine with anyone
        assert expert_record["consensus"]["3"] == pytest.approx(0.0, abs=1e-6)
        assert expert_record["consensus"]["0"] == pytest.approx(2 / 3, abs=1e-4)


def test_fedalign_lora_expert_without_active_client_keeps_its_factors() -> None:
    results = clients(shared_subspace(torch.Generator().manual_seed(4)))
    for result in results:
        result.routing_statistics["moe"].token_count[1] = 0.0
        result.routing_statistics["moe"].token_count[0] = 20.0
    global_parameters = state_from(shared_subspace(torch.Generator().manual_seed(5))[0])
    outcome = build_strategy("fedalign", {}, LAYOUT).aggregate(1, global_parameters, results, {})
    record = outcome.record["layers"]["moe"]["experts"][1]
    assert record["fallback"] == "no-active-client"
    assert torch.equal(EXPERTS.b(outcome.parameters, 1), EXPERTS.b(global_parameters, 1))
    assert torch.equal(EXPERTS.a(outcome.parameters, 1), EXPERTS.a(global_parameters, 1))


def test_lora_aggregation_errors_name_the_option() -> None:
    with pytest.raises(OptionError, match="lora_aggregation"):
        build_strategy("fedavg", {}, LAYOUT, lora_aggregation="svd")
    with pytest.raises(OptionError, match="fedadam"):
        build_strategy("fedadam", {}, LAYOUT, lora_aggregation="product-svd")
    build_strategy("fedadam", {}, LAYOUT)  # factors: fine
    with pytest.raises(OptionError, match="LoRA experts"):
        build_strategy("fedalign", {"personalized_experts": True}, LAYOUT)
    config = tiny_config(
        model__trainable="lora", model__lora_aggregation="product-svd", strategy__name="fedyogi"
    )
    config.validate()
    with pytest.raises(ConfigError, match=r"model\.lora-aggregation.*'factors'.*fedyogi"):
        strategy_from_config(config, LAYOUT)
