"""`fedalign bench` measures every row in one run and prints a ratio table."""

from __future__ import annotations

import pytest

from fedalign.cli import main
from fedalign.config import ConfigError
from fedalign.experiments.bench.design import require_cpu_classification
from tests.helpers import tiny_choice_config, tiny_config


def test_bench_prints_a_ratio_row_per_design_choice(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "bench",
            "--model",
            "tiny-upcycled",
            "--max-train-examples",
            "120",
            "--clients",
            "2",
            "--alpha",
            "1.0",
            "--set",
            "partition.min-client-size=5",
            "--set",
            "strategy.stats-max-examples=8",
            "--set",
            "model.max-length=16",
            "--repeats",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 4  # header + four rows
    assert "prefix of 2 layers cached" in lines[1]
    for line in lines[1:]:
        ratio = float(line.rstrip(" |").rsplit("|", 1)[1].strip().rstrip("x"))
        assert ratio > 0


def test_backbone_suite_prints_one_table_moefied_vs_copy(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "bench",
            "--suite",
            "backbone",
            "--central-steps",
            "3",
            "--repeats",
            "1",
            "--model",
            "tiny-upcycled",
            "--max-train-examples",
            "120",
            "--clients",
            "2",
            "--alpha",
            "1.0",
            "--set",
            "partition.min-client-size=5",
            "--set",
            "strategy.stats-max-examples=8",
            "--set",
            "model.max-length=16",
            "--set",
            "data.max-test-examples=40",
            "--no-progress",
        ]
    )
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| what | MoEfied (top-2) | copy-upcycled (top-2)")
    assert len(lines) == 1 + 12
    assert "router grad norm from task loss, at init" in lines[1]
    init = lines[1].split("|")
    assert float(init[2]) > 1e-4 > float(init[3])  # MoEfied router learns, copies' does not


def test_bench_refuses_gpu_settings_and_multiple_choice() -> None:
    config = tiny_config(run__device="auto")
    with pytest.raises(ConfigError, match=r"run\.device must be 'cpu'"):
        require_cpu_classification(config)
    with pytest.raises(ConfigError, match="must not be a multiple-choice dataset"):
        require_cpu_classification(tiny_choice_config("mmlu"))
    require_cpu_classification(tiny_config())
