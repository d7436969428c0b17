"""``fedalign benchmark``: grid expansion, reuse of finished runs, aggregation, outputs.

The simulator is replaced by a fake that writes a run folder whose final accuracy is a
known function of (strategy, alpha, seed), so the table's numbers can be checked exactly.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedalign.cli import build_parser, main
from fedalign.config import ConfigError, ExperimentConfig, run_label
from fedalign.experiments.benchmark import (
    BenchmarkOptions,
    command_text,
    load_suite,
    plan_runs,
    run_benchmark,
    runner,
)
from fedalign.experiments.benchmark.plan import same_experiment
from fedalign.records import RunSummary
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]

SUITE = """
[suite]
name = "toy"
description = "A toy grid."
strategies = ["fedavg", "fedalign", "fedalign:consistency"]
alphas = [1.0, 0.1]
seeds = 3
reference = "fedavg"
target-fraction = 1.0

[suite.labels]
"fedalign:consistency" = "row 3: consistency"

[model]
name = "tiny-upcycled"

[data]
max-train-examples = 60

[partition]
num-clients = 3

[federated]
rounds = 4

[quick.suite]
seeds = 2

[quick.federated]
rounds = 2
"""

BONUS = {"fedavg": 0.0, "fedalign": 0.1, "fedalign-consistency": 0.05}


def final_accuracy(label: str, alpha: float, seed: int) -> float:
    return 0.5 + BONUS[label] - 0.1 * (alpha < 0.5) + 0.01 * seed


def _label(config: ExperimentConfig) -> str:
    return run_label(config.strategy.name, config.strategy.ablation)


class FakeSimulator:
    """Writes what a finished run folder holds; accuracy climbs linearly to its final value."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int, bool]] = []
        self.prepared: list[tuple[float, int]] = []
        self.p10 = False  # newer runs record the 10th percentile of local accuracy

    def prepare(self, config: ExperimentConfig) -> tuple[float, int]:
        key = (config.partition.alpha, config.federated.seed)
        self.prepared.append(key)
        return key

    def run(self, config: ExperimentConfig, out_dir: Path, **kwargs: Any) -> RunSummary:
        label = _label(config)
        alpha, seed = config.partition.alpha, config.federated.seed
        assert kwargs["prepared"] == (alpha, seed)  # data shared per (alpha, seed)
        self.calls.append((label, alpha, seed, kwargs["resume"]))
        final = final_accuracy(label, alpha, seed)
        rounds = config.federated.rounds
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        config.save(folder / "config.toml")
        lines = []
        for r in range(1, rounds + 1):
            accuracy = final * r / rounds
            lines.append(
                {
                    "round": r,
                    "global_accuracy": accuracy,
                    "worst_local_accuracy": accuracy - 0.2,
                    **({"local_accuracy_p10": accuracy - 0.1} if self.p10 else {}),
                    "routing_divergence": {"L": {"mean_js": 0.1 / r}},
                    "semantic_dispersion": {"L": {"mean_dispersion": 0.2 / r}},
                }
            )
        (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        summary = RunSummary(
            strategy=label,
            rounds=rounds,
            final_accuracy=final,
            final_loss=1.0,
            local_accuracy_p10=final - 0.1 if self.p10 else float("nan"),
            mean_local_accuracy=final - 0.1,
            worst_local_accuracy=final - 0.2,
            seconds=2.0,
            seconds_per_round=2.0 / rounds,
            bytes_sent=0,
            bytes_received=2**20 * rounds,
            peak_memory_mib=1.0,
            out_dir=str(folder),
        )
        (folder / "summary.json").write_text(json.dumps(summary.to_dict()))
        (folder / "final_state.safetensors").write_bytes(b"state")
        (folder / "checkpoint").mkdir(exist_ok=True)
        (folder / "checkpoint" / "state.pt").write_bytes(b"state")
        return summary


def _run(suite_file: Path, out: Path, *extra: str) -> int:
    return main(
        ["benchmark", "--suite", str(suite_file), "--out", str(out), "--no-progress", *extra]
    )


def test_grid_table_and_reuse(
    fake: FakeSimulator, suite_file: Path, tmp_path: Path, assert_png: Any
) -> None:
    out = tmp_path / "results"
    assert _run(suite_file, out) == 0
    assert len(fake.calls) == 3 * 2 * 3
    assert not any(resume for *_, resume in fake.calls)
    # data prepared once per (alpha, seed), in grid order
    assert fake.prepared == [(a, s) for a in (1.0, 0.1) for s in (0, 1, 2)]
    assert (out / "runs" / "alpha0.1" / "seed2" / "fedalign-consistency" / "summary.json").exists()

    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 6
    for row in rows:
        finals = [final_accuracy(row["strategy"], row["alpha"], s) for s in range(3)]
        assert row["seeds"] == 3
        assert row["final_accuracy_mean"] == pytest.approx(statistics.mean(finals))
        assert row["final_accuracy_std"] == pytest.approx(statistics.stdev(finals))
        assert row["worst_local_accuracy_mean"] == pytest.approx(statistics.mean(finals) - 0.2)
        # target: FedAvg's mean final accuracy at this alpha
        fedavg = statistics.mean(final_accuracy("fedavg", row["alpha"], s) for s in range(3))
        assert row["target_accuracy"] == pytest.approx(fedavg)
    by_key = {(r["strategy"], r["alpha"]): r for r in rows}
    # fedalign (+0.1) reaches FedAvg's mean at round 4 * target / final (ceil) on every seed
    alpha = 0.1
    target = by_key[("fedalign", alpha)]["target_accuracy"]
    expected = [
        math.ceil(4 * target / final_accuracy("fedalign", alpha, s) - 1e-9) for s in range(3)
    ]
    assert by_key[("fedalign", alpha)]["rounds_to_target_mean"] == pytest.approx(
        statistics.mean(expected)
    )
    assert by_key[("fedalign", alpha)]["reached"] == 3
    # FedAvg: seeds 1 and 2 end above their mean, seed 0 below it: censored at > 4 rounds
    assert by_key[("fedavg", alpha)]["reached"] == 2
    assert by_key[("fedavg", alpha)]["censored"] == 1
    assert by_key[("fedavg", alpha)]["censored_at"] == 4
    # paired by seed: fedalign is exactly 0.1 above FedAvg on every seed
    paired = by_key[("fedalign", alpha)]
    assert paired["minus_reference_mean"] == pytest.approx(0.1)
    assert paired["minus_reference_low"] == pytest.approx(0.1)
    assert paired["minus_reference_high"] == pytest.approx(0.1)
    assert (paired["wins"], paired["pairs"]) == (3, 3)
    assert "best_accuracy" not in (out / "runs.csv").read_text()  # no selection on test

    markdown = (out / "results.md").read_text()
    assert "row 3: consistency" in markdown and "± " in markdown
    assert "(2/3 reached; 1 censored at >4)" in markdown
    assert "paired Δ vs fedavg [95% CI]" in markdown and "+0.1000 [+0.1000, +0.1000]" in markdown
    assert "worst-client accuracy (no p10 recorded)" in markdown
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("strategy,name,alpha,seeds,final_accuracy_mean")
    assert len(csv_lines) == 7
    assert len((out / "runs.csv").read_text().splitlines()) == 19
    for name in ("convergence.png", "divergence.png"):
        assert_png(out / name)
    # run reports of the suite's last strategy, first seed, every alpha
    for alpha in ("alpha1", "alpha0.1"):
        page = f"reports/{alpha}-seed0-fedalign-consistency/index.html"
        assert (out / page).is_file() and f"({page})" in markdown
    # finished runs keep no checkpoint or final parameters unless --keep-states
    run_folder = out / "runs" / "alpha1" / "seed0" / "fedavg"
    assert (run_folder / "metrics.jsonl").exists()
    assert not (run_folder / "checkpoint").exists()
    assert not (run_folder / "final_state.safetensors").exists()
    command = (out / "COMMAND.txt").read_text()
    assert command.startswith(f"fedalign benchmark --suite {suite_file}")
    assert "--out" in command

    # started again: everything finished is reused, nothing recomputed
    fake.calls.clear()
    fake.prepared.clear()
    assert _run(suite_file, out) == 0
    assert fake.calls == [] and fake.prepared == []
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    assert "runs reused 18, resumed 0, run 0" in (out / "COMMAND.txt").read_text()
    # redrawing the tables keeps the command that made the runs
    assert _run(suite_file, out, "--no-run", "--no-report") == 0
    command_file = (out / "COMMAND.txt").read_text()
    assert command_file.startswith(command.splitlines()[0]) and "redrawn" in command_file


def test_changed_config_or_interrupted_run(
    fake: FakeSimulator, no_plots: None, suite_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    quiet = ("--no-report", "--keep-states")
    assert _run(suite_file, out, "--alphas", "0.1", "--seeds", "1", *quiet) == 0
    assert len(fake.calls) == 3
    # an interrupted run: config and checkpoint there, no summary -> resumed
    folder = out / "runs" / "alpha0.1" / "seed0" / "fedalign"
    (folder / "summary.json").unlink()
    assert (folder / "checkpoint" / "state.pt").exists()
    fake.calls.clear()
    assert _run(suite_file, out, "--alphas", "0.1", "--seeds", "1", *quiet) == 0
    assert fake.calls == [("fedalign", 0.1, 0, True)]
    # the [run] section (threads, progress, folder) is not part of the experiment
    fake.calls.clear()
    assert _run(suite_file, out, "--alphas", "0.1", "--seeds", "1", "--threads", "1", *quiet) == 0
    assert fake.calls == []
    # a different experiment setting: its folders are never overwritten silently
    fake.calls.clear()
    assert _run(suite_file, out, "--alphas", "0.1", "--seeds", "1", "--lr", "0.5", *quiet) == 2
    assert fake.calls == []
    # --overwrite: nothing matches, everything runs again
    again = ("--alphas", "0.1", "--seeds", "1", "--lr", "0.5", "--overwrite", *quiet)
    assert _run(suite_file, out, *again) == 0
    assert len(fake.calls) == 3 and not any(resume for *_, resume in fake.calls)
    assert (folder / "final_state.safetensors").exists()  # --keep-states
    saved = ExperimentConfig.from_toml(folder / "config.toml")
    assert saved.train.lr == 0.5


def test_quick_and_grid_narrowing(
    fake: FakeSimulator, no_plots: None, suite_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "quick"
    narrow = ("--strategy", "fedavg", "--alpha", "0.1", "--no-report")
    assert _run(suite_file, out, "--quick", *narrow) == 0
    assert fake.calls == [("fedavg", 0.1, 0, False), ("fedavg", 0.1, 1, False)]
    saved = ExperimentConfig.from_toml(
        out / "runs" / "alpha0.1" / "seed1" / "fedavg" / "config.toml"
    )
    assert saved.federated.rounds == 2 and saved.model.name == "tiny-upcycled"
    assert "(quick size)" in (out / "results.md").read_text()


def test_dry_run_and_no_run(
    fake: FakeSimulator, no_plots: None, suite_file: Path, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "results"
    assert _run(suite_file, out, "--dry-run") == 0
    assert fake.calls == [] and not out.exists()
    assert capsys.readouterr().out.count("new") == 18
    assert _run(suite_file, out, "--no-run") == 0
    assert fake.calls == []
    assert "18 planned run(s) have not finished" in (out / "results.md").read_text()


def test_bad_suite_gives_clear_error(tmp_path: Path, capsys: Any) -> None:
    assert main(["benchmark", "--suite", "nonexistent-suite"]) == 2
    assert "no benchmarks/nonexistent-suite.toml" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nname = "tiny-upcycled"\n')
    with pytest.raises(ConfigError, match=r"no \[suite\] table"):
        load_suite(bad)
    bad.write_text('[suite]\nstrategies = ["fedavg"]\nsurprise = 1\n')
    with pytest.raises(ConfigError, match="unknown"):
        load_suite(bad)


@pytest.mark.parametrize("name", ["main", "ablation"])
def test_shipped_suites_are_valid(name: str) -> None:
    for quick in (False, True):
        suite = load_suite(REPO / "benchmarks" / f"{name}.toml", quick=quick)
        base = ExperimentConfig.from_dict(suite.base)
        base.validate()
        runs = plan_runs(suite, base, Path("unused"))
        assert suite.reference_label in suite.strategy_labels
        assert all(label in suite.strategy_labels for label in suite.report)
        assert len(runs) == len(suite.strategies) * len(suite.alphas) * len(suite.seeds)
    args = build_parser().parse_args(["benchmark", "--suite", name, "--quick"])
    assert args.handler is not None


def test_suite_labels_accept_both_spellings(suite_file: Path) -> None:
    suite = load_suite(suite_file)
    assert suite.strategy_labels == ["fedavg", "fedalign", "fedalign-consistency"]
    assert suite.display("fedalign-consistency") == "row 3: consistency"
    assert suite.report == ["fedalign-consistency"]


def test_library_call_with_typed_options(
    fake: FakeSimulator, no_plots: None, suite_file: Path, tmp_path: Path
) -> None:
    """No argparse: the options dataclass drives the benchmark; p10 shown when recorded."""
    fake.p10 = True
    options = BenchmarkOptions(
        suite=str(suite_file),
        alphas=[0.1],
        seeds=2,
        first_seed=5,
        strategies=[("fedavg", "full"), ("fedalign", "consistency")],
        settings={"train.lr": 0.5},
        overrides=["model.max-length=24"],
        out=tmp_path / "lib",
        reports=False,
    )
    messages: list[str] = []
    out = run_benchmark(options, log=messages.append)
    assert out == tmp_path / "lib"
    assert fake.calls == [
        ("fedavg", 0.1, 5, False),
        ("fedalign-consistency", 0.1, 5, False),
        ("fedavg", 0.1, 6, False),
        ("fedalign-consistency", 0.1, 6, False),
    ]
    saved = ExperimentConfig.from_toml(out / "runs/alpha0.1/seed6/fedalign-consistency/config.toml")
    assert saved.train.lr == 0.5 and saved.model.max_length == 24
    markdown = (out / "results.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert "p10 client accuracy" in table[0] and "worst-client" not in table[0]
    rows = json.loads((out / "results.json").read_text())
    assert rows["client_metric"] == "local_accuracy_p10"
    command = command_text(options)
    assert command.startswith(f"fedalign benchmark --suite {suite_file} --seeds 2 --seed 5")
    assert "--alphas 0.1 --strategies fedavg,fedalign:consistency" in command
    assert "--set train.lr=0.5 --set model.max-length=24" in command
    # the command line reproduces the same options
    assert main([*shlex.split(command)[1:], "--no-run", "--no-progress"]) == 0
    assert len(fake.calls) == 4


def test_a_run_locked_by_another_process_is_left_to_it(
    fake: FakeSimulator, no_plots: None, suite_file: Path, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "results"
    narrow = ("--alphas", "0.1", "--seeds", "1", "--no-report")
    busy = out / "runs" / "alpha0.1" / "seed0" / "fedalign"
    with runner.run_lock(busy) as acquired:
        assert acquired and runner.is_busy(busy)
        assert _run(suite_file, out, "--dry-run", *narrow) == 0
        assert f"    busy  {busy}" in capsys.readouterr().out
        assert _run(suite_file, out, *narrow) == 0
        assert [c[0] for c in fake.calls] == ["fedavg", "fedalign-consistency"]
        assert "1 run(s) were running in another process" in capsys.readouterr().out
        assert "left to another process 1" in (out / "COMMAND.txt").read_text()
    assert not runner.is_busy(busy)
    fake.calls.clear()
    assert _run(suite_file, out, *narrow) == 0  # released: this invocation runs it now
    assert fake.calls == [("fedalign", 0.1, 0, False)]


def test_a_lock_dies_with_its_process(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "alpha1" / "seed0" / "fedavg"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from fedalign.experiments.benchmark.runner import run_lock\n"
            "with run_lock(Path(sys.argv[1])) as ok:\n"
            "    print(ok, flush=True)\n"
            "    time.sleep(60)\n",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        assert runner.is_busy(folder)
    finally:
        holder.kill()  # a crash: no cleanup code runs
        holder.wait()
    assert not runner.is_busy(folder)
    assert runner.lock_path(folder) == folder.parent / ".fedavg.lock"


@pytest.mark.parametrize("name", ["claim", "claim-tune", "claim-ablation", "claim-tuned"])
def test_claim_suites_load(name: str) -> None:
    suite = load_suite(REPO / "benchmarks" / f"{name}.toml")
    assert suite.reference_label in suite.strategy_labels
    if name == "claim":
        assert suite.chosen["fedprox"].results == Path("benchmarks/results/claim-tune")
    if name == "claim-tune":
        assert suite.tune["fedprox"].values == (0.01, 0.1, 1.0)
        assert ExperimentConfig.from_dict(suite.base).data.validation_examples == 400


def test_reuse_tells_precisions_apart() -> None:
    base = tiny_config()
    assert same_experiment(base, tiny_config(run__threads=1, run__out="x"))
    assert not same_experiment(base, tiny_config(run__precision="bf16"))
    assert not same_experiment(base, tiny_config(run__frozen_dtype="bf16"))


def test_versus_pages_pair_every_row_with_another_strategy(
    fake: FakeSimulator, no_plots: None, suite_file: Path, tmp_path: Path
) -> None:
    text = suite_file.read_text().replace(
        'reference = "fedavg"', 'reference = "fedavg"\nversus = ["fedalign"]'
    )
    suite_file.write_text(text)
    out = tmp_path / "results"
    assert _run(suite_file, out, "--alphas", "0.1", "--seeds", "2", "--no-report") == 0
    payload = json.loads((out / "results.json").read_text())
    rows = {r["strategy"]: r for r in payload["versus"]["fedalign"]}
    finals = {
        (label, seed): json.loads(
            (out / f"runs/alpha0.1/seed{seed}/{label}/summary.json").read_text()
        )["final_accuracy"]
        for label in ("fedavg", "fedalign")
        for seed in (0, 1)
    }
    expected = statistics.mean(finals[("fedavg", s)] - finals[("fedalign", s)] for s in (0, 1))
    assert rows["fedavg"]["minus_reference_mean"] == pytest.approx(expected)
    page_text = (out / "versus-fedalign.md").read_text()
    assert page_text.startswith("# Benchmark `toy`: every row paired with fedalign")
    assert "[versus-fedalign.md](versus-fedalign.md)" in (out / "results.md").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('versus = ["fedalign"]', 'versus = "fedalign"'))
    with pytest.raises(ConfigError, match=r"suite\.versus must be a list"):
        load_suite(bad)
