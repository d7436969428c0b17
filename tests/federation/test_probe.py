"""Public-probe semantics (``strategy.semantic-privacy = public-probe``) against hand math."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fedalign.client import forward_logits, prepare
from fedalign.client.prepare import probe_dataset
from fedalign.config import ConfigError
from fedalign.data import build_federated_data
from fedalign.federation import SemanticProbe, ServerState, semantic_probe_for, strategy_from_config
from fedalign.models import load_moe_model
from fedalign.models.experts import expert_forward
from fedalign.protocol import ClientResult, LayerRoutingStatistics
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def probe_config(**overrides: object) -> Any:
    settings: dict[str, object] = {
        "strategy__name": "fedalign",
        "strategy__semantic_privacy": "public-probe",
        "strategy__probe_examples": 12,
    }
    return tiny_config(**{**settings, **overrides})


@pytest.fixture(scope="module")
def prepared() -> Any:
    return prepare(probe_config())


def perturbed(parameters: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: value + 0.05 * torch.randn(value.shape, generator=generator)
        for name, value in parameters.items()
    }


def hand_vectors(prepared: Any, global_parameters: Any, client: Any) -> dict[str, torch.Tensor]:
    """The probe vectors computed by hand: block inputs from pre-hooks, explicit math."""
    model, probe = prepared.model, prepared.data.probe
    model.load_trainable_state(global_parameters)
    model.model.eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for layer in model.full_layout.layers:
        block = model.model.get_submodule(layer.name)

        def hook(_module: Any, args: Any, name: str = layer.name) -> None:
            inputs.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

        handles.append(block.register_forward_pre_hook(hook))
    with torch.no_grad():
        forward_logits(model, probe)
    for handle in handles:
        handle.remove()
    mask = probe.attention_mask.reshape(-1).bool()
    vectors = {}
    for layer in model.full_layout.layers:
        hidden = torch.cat(inputs[layer.name])
        if hidden.shape[0] == mask.numel():  # padded (B*T, H): keep the real tokens
            hidden = hidden[mask]
        assert hidden.shape[0] == int(mask.sum())  # (N, H)
        block = model.model.get_submodule(layer.name)
        router = client[f"{layer.name}.router.weight"]  # (E, H)
        chosen = (hidden @ router.T).topk(layer.top_k, dim=-1).indices
        out = torch.zeros(layer.num_experts, hidden.shape[1])
        for e in range(layer.num_experts):
            rows = hidden[(chosen == e).any(dim=-1)]
            if rows.shape[0] == 0:
                continue
            prefix = f"{layer.name}.experts.{e}"
            inner = F.linear(
                rows, client[f"{prefix}.fc_in.weight"], client.get(f"{prefix}.fc_in.bias")
            )
            inner = block.experts[e].activation(inner)
            outer = F.linear(
                inner, client[f"{prefix}.fc_out.weight"], client.get(f"{prefix}.fc_out.bias")
            )
            out[e] = outer.mean(dim=0)
        vectors[layer.name] = out
    return vectors


def test_probe_vectors_equal_a_hand_computation(prepared: Any) -> None:
    model = prepared.model
    global_parameters = model.trainable_state()
    client = perturbed(global_parameters, 1)
    probe = SemanticProbe(model, prepared.data.probe, batch_size=5)  # batches of 5, 5, 2
    hidden = probe.hidden_inputs(global_parameters)
    vectors = probe.client_vectors(hidden, client)
    expected = hand_vectors(prepared, global_parameters, client)
    assert list(vectors) == list(expected)
    for name, value in expected.items():
        assert value.abs().sum() > 0
        assert torch.allclose(vectors[name], value, atol=1e-5, rtol=1e-4), name
    # the client's router and experts matter: the global ones give other vectors
    own = probe.client_vectors(hidden, global_parameters)
    assert not torch.allclose(own[name], vectors[name], atol=1e-4)


def test_server_substitutes_probe_vectors_and_records_it(prepared: Any) -> None:
    model = prepared.model
    config = probe_config()
    global_parameters = model.trainable_state()
    probe = semantic_probe_for(config, model, prepared.data)
    assert isinstance(probe, SemanticProbe)
    strategy = strategy_from_config(config, model.layout)
    seen: list[list[ClientResult]] = []
    original = strategy.aggregate

    def spy(server_round: int, parameters: Any, results: Any, state: Any) -> Any:
        seen.append(list(results))
        return original(server_round, parameters, results, state)

    strategy.aggregate = spy  # type: ignore[method-assign]
    server = ServerState(strategy, global_parameters, semantic_probe=probe)
    results = []
    for cid in range(2):
        statistics = {
            layer.name: LayerRoutingStatistics(
                routing_distribution=torch.full((layer.num_experts,), 1 / layer.num_experts),
                usage=torch.full((layer.num_experts,), layer.top_k / layer.num_experts),
                margin=torch.zeros(layer.num_experts),
                mean_hidden=torch.zeros(layer.num_experts, 0),
                token_count=torch.full((layer.num_experts,), float(layer.top_k * 10)),
                num_tokens=layer.num_experts * 10,
            )
            for layer in model.full_layout.layers
        }
        results.append(ClientResult(cid, 10, perturbed(global_parameters, cid + 5), statistics))
    screening = server.screen(results)
    assert not screening.rejected  # (E, 0) summaries pass the screening
    outcome = server.aggregate(1, screening.accepted)
    # the model holds the global parameters again afterwards
    state = model.trainable_state()
    assert all(torch.equal(state[k], v) for k, v in global_parameters.items())
    handed = seen[0]
    hidden = probe.hidden_inputs(global_parameters)
    for result, given in zip(results, handed, strict=True):
        expected = probe.client_vectors(hidden, result.parameters)
        for layer in model.full_layout.layers:
            vector = given.routing_statistics[layer.name].mean_hidden
            assert tuple(vector.shape) == (layer.num_experts, layer.hidden_size)
            assert torch.equal(vector, expected[layer.name])
    record = outcome.record["semantic_privacy"]
    assert record["mode"] == "public-probe" and record["probe_examples"] == 12
    assert set(record["probe_tokens"]) == {layer.name for layer in model.full_layout.layers}
    # without a probe the record is as before
    plain = ServerState(strategy_from_config(config, model.layout), global_parameters)
    clean = [
        dataclasses.replace(
            r,
            routing_statistics={
                k: dataclasses.replace(s, mean_hidden=torch.ones(s.token_count.shape[0], 4))
                for k, s in r.routing_statistics.items()
            },
        )
        for r in results
    ]
    assert "semantic_privacy" not in plain.aggregate(1, clean).record


def test_probe_set_is_outside_the_test_set_and_the_training_pool() -> None:
    config = probe_config(strategy__probe_examples=40)
    federated = build_federated_data(config.data, config.partition, config.federated.seed)
    probe = probe_dataset(config, federated)
    assert len(probe) == 40
    assert not set(probe.texts) & set(federated.splits.test.texts)
    assert not set(probe.texts) & set(federated.splits.train.texts)
    assert probe.texts == probe_dataset(config, federated).texts  # seeded
    too_many = probe_config(strategy__probe_examples=10**6)
    with pytest.raises(ConfigError, match=r"strategy\.probe-examples"):
        probe_dataset(too_many, federated)
    no_spare = probe_config(data__max_test_examples=0)
    with pytest.raises(ConfigError, match=r"data\.max-test-examples"):
        probe_dataset(no_spare, build_federated_data(no_spare.data, no_spare.partition, 0))


def test_fused_expert_forward_matches_the_huggingface_experts() -> None:
    config = tiny_config(model__name="tiny-qwen3moe")
    model = load_moe_model(config.model, num_labels=4, seed=0)
    layer = model.full_layout.layers[0]
    block = model.model.get_submodule(layer.name)
    hidden = torch.randn(7, layer.hidden_size, generator=torch.Generator().manual_seed(0))
    for expert in (0, layer.num_experts - 1):
        index = torch.full((7, 1), expert)
        reference = block.experts(hidden, index, torch.ones(7, 1))
        assert torch.allclose(expert_forward(block, expert, hidden), reference, atol=1e-6)
