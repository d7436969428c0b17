"""The server state shared by the simulator and the Flower ServerApp, and client sampling."""

from __future__ import annotations

import torch

from fedalign.compression import compress_update, parameter_delta
from fedalign.federation import ServerState, sample_clients
from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult, TrainInstructions
from fedalign.strategies import AggregationResult, FedAvg, Strategy


class Personalising(FedAvg):
    """FedAvg that hands client 1 a personalised start and counts rounds in its state."""

    def aggregate(self, server_round, global_parameters, results, state):  # type: ignore[no-untyped-def]
        outcome = super().aggregate(server_round, global_parameters, results, state)
        return AggregationResult(
            outcome.parameters,
            {"rounds": state.get("rounds", 0) + 1},
            outcome.record,
            client_parameters={1: {"w": torch.full((2,), 7.0)}},
        )


def test_instructions_adopt_and_state_round_trip() -> None:
    strategy: Strategy = Personalising(MoELayout(layers=()))
    server = ServerState(strategy, {"w": torch.zeros(2)})
    first = server.instructions(1, [0, 1])
    assert first[0] == TrainInstructions() and first[1].start_parameters is None
    results = [
        ClientResult(0, 1, {"w": torch.ones(2)}),
        ClientResult(1, 3, {"w": torch.full((2,), 5.0)}),
    ]
    outcome = server.aggregate(1, results)
    assert server.completed_rounds == 0  # not adopted yet
    server.adopt(1, outcome)
    assert torch.equal(server.global_parameters["w"], torch.full((2,), 4.0))
    assert server.strategy_state == {"rounds": 1} and server.completed_rounds == 1
    # the personalised start reaches client 1 only, and only where the strategy gave none
    second = server.instructions(2, [0, 1])
    assert second[0].start_parameters is None
    assert second[1].start_parameters is not None
    assert torch.equal(second[1].start_parameters["w"], torch.full((2,), 7.0))
    copy = ServerState(strategy, {"w": torch.zeros(2)})
    copy.load_state_dict(server.state_dict())
    assert copy.completed_rounds == 1 and copy.strategy_state == {"rounds": 1}
    assert torch.equal(copy.personal_parameters[1]["w"], torch.full((2,), 7.0))


def test_sampling_is_seeded_per_round_and_order_free() -> None:
    assert sample_clients(0, 1, 5, 1.0) == [0, 1, 2, 3, 4]
    picked = sample_clients(3, 2, 10, 0.3)
    assert len(picked) == 3 and picked == sorted(picked)
    assert picked == sample_clients(3, 2, 10, 0.3)
    assert sample_clients(0, 1, 10, 0.01) != [] and len(sample_clients(0, 1, 10, 0.01)) == 1
    rounds = {tuple(sample_clients(3, r, 10, 0.3)) for r in range(1, 8)}
    assert len(rounds) > 1


def test_screen_restores_compressed_uploads_and_rejects_malformed_ones() -> None:
    server = ServerState(FedAvg(MoELayout(layers=())), {"w": torch.zeros(2, 3)})
    plain = ClientResult(0, 1, {"w": torch.ones(2, 3)})
    local = {"w": torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.125]])}
    update, _ = compress_update(parameter_delta(local, server.global_parameters), "bf16")
    compressed = ClientResult(1, 1, {}, update=update)
    broken_update, _ = compress_update({"w": torch.ones(3, 2)}, "int8")
    broken = ClientResult(2, 1, {}, update=broken_update)
    screening = server.screen([plain, compressed, broken])
    # uncompressed: the very object (exact round trip); compressed: restored, update dropped
    assert screening.accepted[0] is plain
    restored = screening.accepted[1]
    assert restored.update is None and torch.equal(restored.parameters["w"], local["w"])
    assert list(screening.rejected) == [2]
    assert "compressed update" in screening.rejected[2] and "shape (3, 2)" in screening.rejected[2]
