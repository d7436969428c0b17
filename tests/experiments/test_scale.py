"""experiments/bench/scale: synthetic rounds, one timed cell, sketch accuracy, bytes per client."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedalign.experiments.bench.scale import (
    CellResult,
    compression_table,
    delta_compression,
    payload_bytes,
    payload_table,
    round_agreement,
    run_cell,
    run_scale_benchmark,
    server_step_table,
    sketch_accuracy,
    synthetic_layout,
    synthetic_round,
)
from fedalign.protocol import tensor_bytes

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_synthetic_round_is_valid_and_shares_the_pool() -> None:
    layout, global_parameters, results = synthetic_round(
        5, "eighth", num_layers=2, num_experts=4, pool=2
    )
    assert len(layout.layers) == 2 and layout.layers[0].num_experts == 4
    w1 = global_parameters["layers.0.moe.experts.0.w1"]
    assert w1.shape == (192, 384)
    assert global_parameters["layers.0.moe.experts.0.w2"].shape == (384, 192)
    assert results[0].parameters is results[2].parameters  # pool member 0
    assert not torch.equal(results[0].parameters[w1_name := "layers.0.moe.experts.0.w1"], w1)
    assert not torch.equal(results[0].parameters[w1_name], results[1].parameters[w1_name])
    for result in results:
        for layer in layout.layers:
            s = result.routing_statistics[layer.name]
            assert s.routing_distribution.sum() == pytest.approx(1.0, abs=1e-5)
            assert (s.usage >= 0).all() and (s.usage <= 1).all()
            inactive = s.token_count == 0
            assert (s.mean_hidden[inactive] == 0).all() and (s.usage[inactive] == 0).all()


@pytest.mark.parametrize("strategy, sketch_dim", [("fedavg", 0), ("fedalign", 0), ("fedalign", 16)])
def test_run_cell_times_and_measures(strategy: str, sketch_dim: int) -> None:
    cell = run_cell(
        strategy, 4, "eighth", sketch_dim=sketch_dim, repeats=2, num_layers=1, num_experts=2
    )
    assert cell.repeats == 2 and len(cell.times_s) == 2 and cell.median_s > 0
    assert cell.inputs_mb > 0 and cell.peak_mb >= cell.inputs_mb - 1  # RSS counters lag a bit
    assert cell.strategy == (strategy if not sketch_dim else "fedalign+sketch16")
    table = server_step_table([cell])
    assert "| eighth | 4 |" in table


def test_server_step_table_ratios() -> None:
    def cell(strategy: str, seconds: float, working: float) -> CellResult:
        return CellResult(
            strategy, 0, 10, "full", 1, 1, [seconds], seconds, 1.0, 1.0, working, 3.0, 0.1
        )

    table = server_step_table([cell("fedavg", 2.0, 100.0), cell("fedalign", 3.0, 250.0)])
    assert table.splitlines()[2] == "| full | 10 | 2.00 | 100 | 3.00 | 250 | 1.50 | 2.50 | 3.0 |"


def test_sketch_as_long_as_the_updates_agrees_exactly() -> None:
    rows = sketch_accuracy(
        [128, 8], num_clients=8, num_experts=2, expert_values=64, hidden=4, outliers=1
    )
    exact, coarse = rows
    assert exact.agreement == 1.0 and exact.max_abs_cosine_error < 1e-5
    assert exact.max_weight_l1 < 1e-5
    assert coarse.max_abs_cosine_error > exact.max_abs_cosine_error
    assert exact.memberships == coarse.memberships > 0


def test_payload_bytes_count_parameters_statistics_and_instructions() -> None:
    layout = synthetic_layout(num_layers=1, num_experts=2, hidden=3)
    parameters = {
        "layers.0.moe.router.weight": torch.zeros(2, 3),
        "layers.0.moe.experts.0.w1": torch.zeros(4, 3),
        "layers.0.moe.experts.0.w2": torch.zeros(3, 4),
        "layers.0.moe.experts.1.w1": torch.zeros(4, 3),
        "layers.0.moe.experts.1.w2": torch.zeros(3, 4),
    }
    rows = {row.strategy: row for row in payload_bytes(layout, parameters, "toy")}
    model = tensor_bytes(parameters)
    assert model == (6 + 48) * 4
    # statistics: 4 tensors (E,) + mean_hidden (E, H) in float32 + num_tokens (int64)
    statistics = (4 * 2 + 2 * 3) * 4 + 8
    assert rows["fedavg"].upload_bytes == rows["fedavg"].download_bytes == model
    assert rows["fedprox"].statistics_bytes == 0
    assert rows["fedmoe"].upload_bytes == model + statistics
    fedalign = rows["fedalign"]
    assert fedalign.upload_bytes == model + statistics
    assert fedalign.instructions_bytes == 2 * 2 * 4  # p_g and alpha, (E,) each
    assert fedalign.download_bytes == model + 16
    assert fedalign.statistics_share == pytest.approx(statistics / (model + statistics), abs=1e-5)
    assert "| toy | fedalign |" in payload_table(list(rows.values()))


def test_delta_compression_bytes_and_errors() -> None:
    initial = {"a": torch.full((4, 8), 100.0), "b": torch.zeros(16)}
    delta = {"a": torch.linspace(-0.01, 0.01, 32).view(4, 8), "b": torch.linspace(0, 1, 16)}
    final = {n: initial[n] + delta[n] for n in initial}
    rows = {r.encoding: r for r in delta_compression(initial, final, top_fraction=0.25)}
    count = 48
    assert rows["float32 delta"].bytes == 4 * count and rows["float32 delta"].relative_error < 1e-6
    assert rows["bf16 delta"].bytes == 2 * count and rows["bf16 delta"].relative_error < 1e-2
    assert rows["int8 delta (per tensor)"].bytes == count + 2 * 4
    assert rows["int8 delta (per row)"].bytes == count + 4 * 4 + 4
    assert rows["top-25% delta (one shot)"].bytes == 8 * (8 + 4)
    # bf16 of values near 100 has a step of 0.5: the small update of "a" is lost
    assert rows["bf16 full values"].relative_error > 10 * rows["bf16 delta"].relative_error
    assert "| bf16 delta |" in compression_table(list(rows.values()))


def test_run_scale_benchmark_bytes_part_and_unknown_parts(tmp_path: Path) -> None:
    lines: list[str] = []
    run_scale_benchmark(tmp_path, ["bytes"], models=["tiny-upcycled"], log=lines.append)
    text = (tmp_path / "bytes.md").read_text()
    assert "| tiny-upcycled | fedalign |" in text and "| tiny-upcycled | fedavg |" in text
    assert not (tmp_path / "server_step.md").exists()
    with pytest.raises(ValueError, match="unknown parts"):
        run_scale_benchmark(tmp_path, ["steps"])


def test_round_agreement_counts_memberships_of_active_clients() -> None:
    def record(aligned: list[int], consensus: dict[str, float]) -> dict:
        expert = {"active": [0, 1, 2], "aligned": aligned, "consensus": consensus}
        idle = {"active": [], "aligned": None, "consensus": None}
        return {"layers": {"moe": {"experts": [expert, idle]}}}

    exact = record([0, 1], {"0": 0.5, "1": 0.4, "2": 0.1})
    sketched = record([0, 2], {"0": 0.45, "1": 0.2, "2": 0.3})
    agree, total, worst = round_agreement(exact, sketched)
    assert (agree, total) == (1, 3)  # client 0 in both; 1 and 2 swap
    assert worst == pytest.approx(0.2)
