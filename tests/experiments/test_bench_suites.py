"""The lora-error, memory-profile, parallel and flower-overhead bench suites: registered,
and tiny or faked runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from fedalign.cli import build_parser, main
from fedalign.config import ConfigError, ExperimentConfig
from fedalign.experiments import bench
from fedalign.experiments.bench import flower_overhead, parallel


@pytest.mark.parametrize(
    "name, options",
    [
        ("lora-error", ["models", "ranks", "lrs", "out-dir"]),
        ("memory-profile", ["examples-per-client"]),
        ("parallel", ["workers", "repeats", "out-dir"]),
        ("flower-overhead", ["modes", "repeats", "client-counts", "before-repo", "out-dir"]),
    ],
)
def test_suite_is_registered_with_its_options(name: str, options: list[str]) -> None:
    suite = bench.get_suite(name)
    assert [option.name for option in suite.options] == options
    assert suite.defaults  # each starts from a configuration of its own


def test_suite_defaults_sit_under_the_command_line() -> None:
    """`--config`/config_file, then the suite's defaults, then named options and --set."""
    from fedalign.cli import config_from_args

    suite = bench.get_suite("lora-error")
    args = build_parser().parse_args(
        ["bench", "--suite", "lora-error", "--clients", "3", "--ranks", "2,4"]
    )
    config = config_from_args(args, config_file=suite.config_file, defaults=suite.defaults)
    assert config.partition.num_clients == 3  # the command line over the suite
    assert config.federated.rounds == 2 and config.train.batch_size == 8  # the suite's
    assert args.ranks == [2, 4] and args.lrs == [0.001, 0.01]  # comma lists, defaults parsed


@pytest.mark.slow
def test_lora_error_tiny_run_writes_page_rows_and_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--suite", "lora-error", "--models", "tiny-qwen3moe", "--ranks", "2"]
    argv += ["--lrs", "0.01", "--rounds", "1", "--clients", "2", "--local-steps", "1"]
    argv += ["--max-train-examples", "40", "--set", "partition.min-client-size=5"]
    assert main([*argv, "--out-dir", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert [row.split(" | ")[4] for row in rows] == ["attention", "experts"]
    data = json.loads((tmp_path / "error.json").read_text())
    assert data["meta"]["setup"]["clients"] == 2 and len(data["rows"]) == 2
    assert all(0 <= row["svd_mean"] <= row["fedit_mean"] + 1e-6 for row in data["rows"])
    assert "FedAvg, 2 clients (Dirichlet 0.5 over 40" in (tmp_path / "error.md").read_text()
    assert (tmp_path / "COMMAND.txt").read_text().startswith("fedalign bench --suite lora-error")


@pytest.mark.slow
def test_memory_profile_marks_every_phase() -> None:
    config = ExperimentConfig()
    config.apply_overrides(bench.get_suite("memory-profile").defaults)
    config.apply_overrides(
        ["model.name=tiny-upcycled", "model.max-length=16", "data.max-test-examples=20"]
    )
    config.apply_overrides(["partition.num-clients=2", "federated.rounds=1"])
    config.apply_overrides(["federated.eval-every=1", "strategy.stats-max-examples=8"])
    text = bench.get_suite("memory-profile").run(
        bench.BenchRequest(config, {"examples_per_client": 10})
    )
    lines = text.splitlines()
    assert lines[0].startswith("kept per client state")
    phases = [line.split(" resident ")[0].strip() for line in lines[1:]]
    assert phases[0] == "prepared" and phases[-1] == "end"
    assert phases[1] == "before training" and phases[2].startswith("after training (results")
    assert phases[3].startswith("after screening (restored") and phases[4] == "after aggregation"


def test_parallel_suite_tables_interleaved_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runs themselves are faked: the suite's order, table, page and files."""
    calls: list[tuple[int, str]] = []

    def fake_run(workers: int, config_file: Path, work: Path) -> dict[str, Any]:
        assert ExperimentConfig.from_toml(config_file).federated.rounds == 3
        calls.append((workers, work.name))
        per_round = 6.0 / workers**0.5
        return {
            "workers": workers,
            "round_seconds": [9.0, per_round, per_round],
            "per_round": per_round,
            "first_round": 9.0,
            "wall": 30.0,
            "final_state": "same",
            "load_before": 1.0,
            "load_after": 1.5,
        }

    monkeypatch.setattr(parallel, "one_run", fake_run)
    config = ExperimentConfig()
    config.apply_overrides(bench.get_suite("parallel").defaults)
    options = {"workers": [1, 4], "repeats": 2, "out_dir": tmp_path}
    table = bench.get_suite("parallel").run(bench.BenchRequest(config, options, command="cmd"))
    assert calls == [(1, "r0"), (4, "r0"), (1, "r1"), (4, "r1")]
    lines = table.splitlines()
    assert lines[0].endswith("| final state = workers 1 |")
    assert lines[2] == "| 1 | 6.00 | 6.0, 6.0 | 1.00x | 9.0 | 30 | yes |"
    assert lines[3] == "| 4 | 3.00 | 3.0, 3.0 | 2.00x | 9.0 | 30 | yes |"
    page = (tmp_path / "speedup.md").read_text()
    assert page.startswith("# Simulator: a round's clients in worker processes\n\n`cmd`")
    assert table in page
    data = json.loads((tmp_path / "speedup.json").read_text())
    assert data["config"]["federated"]["rounds"] == 3 and len(data["results"]) == 4
    assert (tmp_path / "COMMAND.txt").read_text().startswith("cmd\nfinished ")


def test_flower_overhead_times_rounds_by_their_metrics_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mode ``sim`` with the subprocess faked: lines 0.2 s apart give 0.2 s rounds."""

    def fake_simulate(
        config_file: Path, out: Path, env: dict[str, str], watcher: Any
    ) -> tuple[int, str]:
        watcher.start()
        out.mkdir(parents=True)
        with (out / "metrics.jsonl").open("w") as handle:
            for server_round in range(1, 4):
                handle.write(json.dumps({"round": server_round}) + "\n")
                handle.flush()
                time.sleep(0.2)
        (out / "final_state.safetensors").write_bytes(b"state")
        return 0, ""

    monkeypatch.setattr(flower_overhead, "simulate", fake_simulate)
    config = ExperimentConfig()
    config.apply_overrides(["federated.rounds=3"])
    options = {"modes": ["sim"], "repeats": 1, "before_repo": None, "out_dir": tmp_path}
    suite = bench.get_suite("flower-overhead")
    table = suite.run(bench.BenchRequest(config, options, command="cmd"))
    row = table.splitlines()[2].split(" | ")
    assert row[1] == "sim" and row[4] == "1.00" and row[6] == "yes |"
    data = json.loads((tmp_path / "overhead.json").read_text())
    (result,) = data["results"]
    assert len(result["intervals"]) == 2
    assert all(0.1 < interval < 0.6 for interval in result["intervals"])
    assert (
        "(rounds 1 -> 3; start-up and round 1 excluded)" in (tmp_path / "overhead.md").read_text()
    )
    assert "1-min load average before -> after" in (tmp_path / "COMMAND.txt").read_text()
    assert result["clients"] == config.partition.num_clients and "load_before" in result


def test_flower_overhead_table_compares_each_client_count_with_its_own_sim() -> None:
    def run(clients: int, mode: str, per_round: float, state: str) -> dict[str, Any]:
        return {
            "clients": clients,
            "mode": mode,
            "per_round": per_round,
            "total": 10.0,
            "final_state": state,
        }

    results = [
        run(3, "sim", 4.0, "a"),
        run(3, "warm", 5.0, "a"),
        run(10, "sim", 8.0, "b"),
        run(10, "warm", 6.0, "c"),
    ]
    rows = [
        line.split(" | ")
        for line in flower_overhead.overhead_table(results, ["sim", "warm"]).splitlines()[2:]
    ]
    assert [(r[0], r[1], r[4], r[6]) for r in rows] == [
        ("| 3", "sim", "1.00", "yes |"),
        ("| 3", "warm", "1.25", "yes |"),
        ("| 10", "sim", "1.00", "yes |"),
        ("| 10", "warm", "0.75", "no |"),
    ]


def test_flower_overhead_refuses_unknown_modes() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        flower_overhead.run_overhead(ExperimentConfig(), ["sim", "hot"], 1)
    with pytest.raises(ConfigError, match="before-repo"):
        flower_overhead.time_run("cold-before", ExperimentConfig(), Path("x"), Path("y"))
