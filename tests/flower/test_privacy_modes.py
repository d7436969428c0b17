"""``strategy.semantic-privacy`` over the Flower transport: same numbers as the simulator."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedalign[flower]')")

import torch
from flwr.app import Message, MessageType, RecordDict

from fedalign.client import prepare
from fedalign.experiments.run import Simulation
from fedalign.federation import semantic_probe_for, strategy_from_config
from fedalign.flower import client_app
from fedalign.flower.messages import decode_reply, model_fingerprint
from fedalign.flower.strategy import FlowerStrategy
from tests.flower.test_strategy import (
    NODES,
    FakeGrid,
    client_context,
    run_round,
    server_identity,  # noqa: F401  (autouse fixture)
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("mode", ["clip-noise", "public-probe"])
def test_flower_rounds_equal_the_simulator_in_each_privacy_mode(mode: str, tmp_path: Path) -> None:
    """Two FedAlign-MoE rounds through our ClientApp and the Flower wrapper (its probe built
    on a server-side ``prepare(include_train=False)``) give bitwise the simulator's global
    parameters and decisions; replies carry the mode's ``mean_hidden`` shape."""
    config = tiny_config("fedalign")
    config.strategy.semantic_privacy = mode
    config.strategy.semantic_noise_multiplier = 0.5
    config.strategy.probe_examples = 16
    simulation = Simulation(config.copy(), tmp_path / "sim", log=None)
    server = prepare(config, include_train=False)
    assert (server.data.probe is not None) == (mode == "public-probe")
    wrapper = FlowerStrategy(
        strategy_from_config(config, server.model.layout),
        simulation.global_parameters,
        num_clients=3,
        seed=config.federated.seed,
        fingerprint=model_fingerprint(simulation.model),
        semantic_probe=semantic_probe_for(config, server.model, server.data),
    )
    contexts = {p: client_context(config, p) for p in range(3)}
    widths: set[int] = set()

    def respond(message: Message, partition_id: int) -> RecordDict:
        if message.metadata.message_type == MessageType.QUERY:
            return client_app.query(message, contexts[partition_id]).content
        content = client_app.train(message, contexts[partition_id]).content
        reply = decode_reply(content).result
        widths.update(int(s.mean_hidden.shape[1]) for s in reply.routing_statistics.values())
        return content

    grid = FakeGrid({v: k for k, v in NODES.items()}, respond)
    for server_round in (1, 2):
        simulation.run_round(server_round)
        _, (arrays, _) = run_round(wrapper, grid, server_round)
        assert arrays is not None
        for name, value in simulation.global_parameters.items():
            assert torch.equal(wrapper.global_parameters[name], value), (server_round, name)
        line = wrapper.lines.get(server_round)
        assert line is None or isinstance(line, dict)
    hidden = {layer.hidden_size for layer in server.model.full_layout.layers}
    assert widths == ({0} if mode == "public-probe" else hidden)
