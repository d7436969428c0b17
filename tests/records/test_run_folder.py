"""Run folders: round lines, decisions, routing snapshots, checkpoints, resume, summary."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fedalign.federation import RoundOutcome
from fedalign.protocol import ClientResult, LayerRoutingStatistics
from fedalign.records import RunFolder, read_jsonl, routing_snapshot
from fedalign.strategies import AggregationResult


def statistics(usage: list[float]) -> dict[str, LayerRoutingStatistics]:
    u = torch.tensor(usage)
    return {
        "moe": LayerRoutingStatistics(
            routing_distribution=u / u.sum(),
            usage=u,
            margin=torch.zeros(2),
            mean_hidden=torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
            token_count=u * 10,
            num_tokens=10,
        )
    }


def outcome(server_round: int, accuracy: float | None) -> RoundOutcome:
    results = [
        ClientResult(
            c,
            5,
            {"w": torch.zeros(2)},
            statistics([0.5 + c / 4, 0.5 - c / 4]),
            {"task_loss": 1.0 + c, "routing_loss": 0.5 * c},
        )
        for c in (0, 1)
    ]
    evaluation = None
    if accuracy is not None:
        evaluation = {"global_accuracy": accuracy, "global_loss": 2.0, "local_accuracy_p10": 0.1}
    return RoundOutcome(
        server_round=server_round,
        selected=[0, 1],
        results=results,
        aggregation=AggregationResult({"w": torch.zeros(2)}, {}, {"note": server_round}),
        bytes_per_client={0: {"sent": 8, "received": 16}, 1: {"sent": 8, "received": 24}},
        started=time.perf_counter(),
        train_seconds=0.25,
        aggregation_seconds=0.125,
        client_state_bytes=7,
        evaluation=evaluation,
        extra={"failed_clients": []},
    )


def test_round_lines_totals_and_summary(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run", "fedalign-consistency")
    folder.start_fresh()
    first = folder.record_round(outcome(1, 0.75), "fedalign")
    second = folder.record_round(outcome(2, None), "fedalign")
    third = folder.record_round(outcome(3, 0.5), "fedalign")
    assert first["train_loss"] == 1.5 and first["routing_loss"] == 0.25
    assert first["bytes_sent"] == 16 and first["bytes_received"] == 40
    assert first["client_state_bytes"] == 7 and first["failed_clients"] == []
    assert second["global_accuracy"] is None
    assert third["global_accuracy"] == 0.5
    decisions = read_jsonl(tmp_path / "run" / "decisions.jsonl")
    assert decisions[0] == {"round": 1, "strategy": "fedalign", "note": 1}
    routing = read_jsonl(tmp_path / "run" / "routing.jsonl")
    assert [r["round"] for r in routing] == [1, 2, 3]
    summary = folder.finish({"w": torch.ones(2)})
    # the final round, never the best one: no selection on the test set
    assert summary.final_accuracy == 0.5
    assert summary.accuracy_curve == [0.75, 0.5]
    assert summary.local_accuracy_p10 == 0.1
    assert summary.strategy == "fedalign-consistency"
    assert (summary.bytes_sent, summary.bytes_received) == (48, 120)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["final_accuracy"] == 0.5 and "best_accuracy" not in on_disk


def test_checkpoint_and_resume_cut_records_back(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run", "fedavg")
    folder.start_fresh()
    folder.add_routing({"round": 0, "clients": [], "layers": {}})
    folder.record_round(outcome(1, 0.5), "fedavg")
    folder.save_checkpoint({"round": 1, "global_parameters": {"w": torch.ones(2)}})
    folder.record_round(outcome(2, 0.6), "fedavg")  # written, then the process "crashes"
    again = RunFolder(tmp_path / "run", "fedavg")
    payload = again.resume()
    assert payload is not None and payload["round"] == 1
    assert torch.equal(payload["global_parameters"]["w"], torch.ones(2))
    assert again.completed_rounds == 1 and again.bytes_received == 40
    assert [r["round"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]
    # round 0 of the routing snapshots survives a resume
    assert [r["round"] for r in read_jsonl(tmp_path / "run" / "routing.jsonl")] == [0, 1]
    assert RunFolder(tmp_path / "empty", "fedavg").resume() is None


def test_routing_snapshot_shapes_and_cosines() -> None:
    snapshot = routing_snapshot(4, [3, 9], [statistics([1.0, 1.0]), statistics([2.0, 0.0])])
    layer = snapshot["layers"]["moe"]
    assert snapshot["round"] == 4 and snapshot["clients"] == [3, 9]
    assert layer["usage"].shape == (2, 2)
    assert layer["semantic_similarity"].shape == (2, 2, 2)  # (E, C, C)
    assert torch.allclose(layer["semantic_similarity"], torch.ones(2, 2, 2))


def test_summary_without_evaluated_rounds_is_nan(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run", "fedavg")
    folder.record_round(outcome(1, None), "fedavg")
    summary = folder.finish({"w": torch.ones(2)})
    assert summary.final_accuracy != summary.final_accuracy  # NaN
    assert summary.accuracy_curve == []
