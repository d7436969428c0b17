"""`fedalign bench` measures every row in one run and prints a ratio table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedalign.cli import main
from fedalign.config import ConfigError
from fedalign.experiments.bench.design import require_cpu_classification
from tests.helpers import tiny_choice_config, tiny_config


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_bench_scale_suite_quick_writes_every_table(tmp_path: Path) -> None:
    """`fedalign bench --suite scale --quick`: server step, bytes and memory from one run."""
    code = main(["bench", "--suite", "scale", "--quick", "--out-dir", str(tmp_path)])
    assert code == 0
    page = (tmp_path / "scale.md").read_text()
    for heading in ("## Server step", "## Bytes per client per round", "## Simulator memory"):
        assert heading in page
    data = json.loads((tmp_path / "scale.json").read_text())
    assert sorted({c["clients"] for c in data["server_step"]}) == [4, 8]
    assert len(data["server_step"]) == 6  # fedavg, fedalign, fedalign+sketch per count
    uploads = {(r["strategy"], r["compression"]): r for r in data["bytes"]}
    for strategy in ("fedavg", "fedalign"):
        sizes = [uploads[(strategy, c)]["upload_bytes"] for c in ("none", "bf16", "int8")]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[1] > sizes[2]
        assert uploads[(strategy, "topk 0.1")]["vs_float32"] < 0.25
    assert uploads[("fedavg", "none")]["statistics_share"] == 0
    assert (
        0
        < uploads[("fedalign", "none")]["statistics_share"]
        < uploads[("fedalign", "int8")]["statistics_share"]
        < 0.2
    )
    memory = data["memory"]
    assert [m["clients"] for m in memory] == [3, 6]
    # every kind of kept state is on: optimizer moments and residuals grow with the clients
    assert memory[1]["client_state_mb"] > memory[0]["client_state_mb"] > 0
    assert data["memory_growth"]["ratio"] > 0


def test_the_cli_lists_and_accepts_every_registered_suite(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`fedalign bench` is built from the registry: --help lists every suite and option."""
    from fedalign.cli import build_parser
    from fedalign.experiments import bench

    assert bench.suite_names() == [
        "design",
        "backbone",
        "flower-overhead",
        "lora-error",
        "memory-profile",
        "parallel",
        "scale",
    ]
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for suite in bench.SUITES.values():
        assert f"  {suite.name}: {suite.description}" in text
        for option in suite.options:
            assert f"--{option.name}" in text
    args = build_parser().parse_args(["bench", "--suite", "scale", "--quick"])
    assert (args.suite, args.quick, args.repeats, args.central_steps) == ("scale", True, 5, 300)
    with pytest.raises(ValueError, match="registered twice"):
        bench.register(bench.SUITES["design"])
    with pytest.raises(ConfigError, match="unknown bench suite"):
        bench.get_suite("nope")
