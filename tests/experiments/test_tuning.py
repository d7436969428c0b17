"""``[suite.tune]``: a row's knob chosen per alpha on validation accuracy, never on test.

A fake simulator writes run folders whose final *validation* accuracy ranks the candidate
values in the opposite order to their final *test* accuracy, so a tuner that looked at the
test set would pick another value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedalign.cli import main
from fedalign.config import ConfigError, ExperimentConfig
from fedalign.experiments.benchmark import (
    BenchmarkOptions,
    load_suite,
    page,
    plan_runs,
    resolve,
    runner,
)
from fedalign.experiments.benchmark.tuning import best_index
from fedalign.records import RunSummary

SUITE = """
[suite]
name = "tuned"
strategies = ["fedavg", "fedprox"]
alphas = [1.0, 0.1]
seeds = 2
reference = "fedavg"

[suite.tune]
fedprox = { key = "strategy.proximal-mu", values = [0.001, 0.01, 0.1, 1.0] }

[model]
name = "tiny-upcycled"

[data]
max-train-examples = 60
validation-examples = 16

[federated]
rounds = 2
"""

# validation accuracy by (alpha, mu): the best is mu 0.1 at alpha 1 and 0.01 at alpha 0.1
VALIDATION = {
    1.0: {0.001: 0.50, 0.01: 0.55, 0.1: 0.70, 1.0: 0.40},
    0.1: {0.001: 0.45, 0.01: 0.65, 0.1: 0.60, 1.0: 0.30},
}


def scores(config: ExperimentConfig) -> tuple[float, float | None]:
    """(final test accuracy, final validation accuracy) of a fake run."""
    alpha, seed = config.partition.alpha, config.federated.seed
    if config.strategy.name != "fedprox":
        return 0.5 + 0.01 * seed, 0.5
    validation = VALIDATION[alpha][config.strategy.proximal_mu] + 0.01 * seed
    return 1.2 - validation, validation  # the test ranking is the reverse


class FakeSimulator:
    def __init__(self) -> None:
        self.mus: list[float] = []

    def prepare(self, config: ExperimentConfig) -> tuple[float, int]:
        return (config.partition.alpha, config.federated.seed)

    def run(self, config: ExperimentConfig, out_dir: Path, **kwargs: Any) -> RunSummary:
        if config.strategy.name == "fedprox":
            self.mus.append(config.strategy.proximal_mu)
        test, validation = scores(config)
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        config.save(folder / "config.toml")
        line = {"round": 1, "global_accuracy": test, "validation_accuracy": validation}
        (folder / "metrics.jsonl").write_text(json.dumps(line) + "\n")
        summary = RunSummary(
            strategy=config.strategy.name,
            rounds=1,
            final_accuracy=test,
            final_loss=1.0,
            mean_local_accuracy=test,
            worst_local_accuracy=test,
            local_accuracy_p10=float("nan"),
            seconds=1.0,
            seconds_per_round=1.0,
            bytes_sent=0,
            bytes_received=0,
            peak_memory_mib=1.0,
            out_dir=str(folder),
            final_validation_accuracy=validation,
        )
        (folder / "summary.json").write_text(json.dumps(summary.to_dict()))
        return summary


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeSimulator:
    simulator = FakeSimulator()
    monkeypatch.setattr(runner, "run_experiment", simulator.run)
    monkeypatch.setattr(runner, "prepare_shared_data", simulator.prepare)
    monkeypatch.setattr(page, "plot_grid", lambda *args, **kwargs: None)
    return simulator


@pytest.fixture
def suite_file(tmp_path: Path) -> Path:
    path = tmp_path / "tuned.toml"
    path.write_text(SUITE)
    return path


def _benchmark(suite_file: Path, out: Path, *extra: str) -> None:
    argv = ["benchmark", "--suite", str(suite_file), "--out", str(out), "--no-progress"]
    assert main([*argv, "--no-report", *extra]) == 0


def test_best_index_prefers_the_first_of_ties_and_skips_missing() -> None:
    assert best_index([0.5, 0.7, 0.7, 0.1]) == 1
    assert best_index([None, float("nan"), 0.2]) == 2
    assert best_index([None, None]) is None


def test_candidates_are_hidden_rows_of_their_own(suite_file: Path, tmp_path: Path) -> None:
    suite, base, _ = resolve(BenchmarkOptions(suite=str(suite_file)))
    runs = plan_runs(suite, base, tmp_path)
    assert len(runs) == 2 * 2 * (1 + 4)
    candidates = [r for r in runs if r.row == "fedprox" and r.alpha == 1.0 and r.seed == 0]
    assert [r.config.strategy.proximal_mu for r in candidates] == [0.001, 0.01, 0.1, 1.0]
    assert candidates[2].label == "fedprox--proximal-mu-0.1"
    assert candidates[2].folder == tmp_path / "runs/alpha1/seed0/fedprox--proximal-mu-0.1"


def test_the_validation_winner_is_reported_not_the_test_winner(
    fake: FakeSimulator, suite_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    _benchmark(suite_file, out)
    assert sorted(set(fake.mus)) == [0.001, 0.01, 0.1, 1.0]
    payload = json.loads((out / "results.json").read_text())
    chosen = {c["alpha"]: c["chosen_value"] for c in payload["tuning"]}
    assert chosen == {1.0: 0.1, 0.1: 0.01}  # the test set would have picked mu = 1.0
    rows = {(r["strategy"], r["alpha"]): r for r in payload["rows"]}
    for alpha, mu in chosen.items():
        expected = 1.2 - VALIDATION[alpha][mu] - 0.005  # mean over seeds 0 and 1
        assert rows[("fedprox", alpha)]["final_accuracy_mean"] == pytest.approx(expected)
        assert rows[("fedprox", alpha)]["seeds"] == 2
    means = payload["tuning"][0]["validation_means"]
    assert means == pytest.approx([v + 0.005 for v in VALIDATION[1.0].values()])
    assert {r["strategy"] for r in payload["rows"]} == {"fedavg", "fedprox"}
    page_text = (out / "results.md").read_text()
    assert "`strategy.proximal-mu`" in page_text and "0.7050" in page_text
    runs_csv = (out / "runs.csv").read_text()
    assert "fedprox--proximal-mu-0.1" in runs_csv and "fedprox--proximal-mu-1" not in runs_csv


def test_test_accuracy_of_other_values_changes_nothing(
    fake: FakeSimulator, suite_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    _benchmark(suite_file, out)
    before = (out / "results.json").read_text()
    for seed in (0, 1):
        path = out / f"runs/alpha1/seed{seed}/fedprox--proximal-mu-1/summary.json"
        summary = json.loads(path.read_text())
        summary["final_accuracy"] = 0.99  # a test score that would win on the test set
        path.write_text(json.dumps(summary))
    _benchmark(suite_file, out, "--no-run")
    assert (out / "results.json").read_text() == before


def test_tuning_needs_a_validation_set(suite_file: Path, tmp_path: Path) -> None:
    options = BenchmarkOptions(suite=str(suite_file), overrides=["data.validation-examples=0"])
    suite, base, _ = resolve(options)
    with pytest.raises(ConfigError, match=r"data\.validation-examples must be > 0"):
        plan_runs(suite, base, tmp_path)


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ('fedmoe = { key = "strategy.proximal-mu", values = [0.1, 1.0] }', "no such row"),
        ('fedprox = { key = "strategy.nope", values = [0.1, 1.0] }', "strategy.nope"),
        ('fedprox = { key = "strategy.proximal-mu", values = [0.1] }', "at least two"),
        ('fedprox = { key = "strategy.proximal-mu", values = [0.1, -1.0] }', "proximal-mu"),
        ("fedprox = { values = [0.1, 1.0] }", "must be"),
    ],
)
def test_bad_tune_tables_are_named(tmp_path: Path, tune: str, message: str) -> None:
    text = SUITE.replace(
        'fedprox = { key = "strategy.proximal-mu", values = [0.001, 0.01, 0.1, 1.0] }', tune
    )
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_suite(path)


CHOSEN_SUITE = """
[suite]
name = "final"
strategies = ["fedavg", "fedprox", "prox-again", "align-prox"]
alphas = [1.0, 0.1]
seeds = 2
reference = "fedavg"

[suite.variants.prox-again]
strategy = "fedprox"

[suite.variants.align-prox]
strategy = "fedalign:full-sound"

[suite.chosen]
fedprox = {{ key = "strategy.proximal-mu", results = "{results}" }}
prox-again = {{ key = "strategy.proximal-mu", results = "{results}", row = "fedprox" }}
align-prox = {{ key = "strategy.client-proximal-mu", results = "{results}", row = "fedprox", \
tuned-key = "strategy.proximal-mu" }}

[model]
name = "tiny-upcycled"

[data]
max-train-examples = 60

[federated]
rounds = 2
"""


def _chosen_suite(tmp_path: Path, results: Path, text: str = CHOSEN_SUITE) -> Path:
    path = tmp_path / "final.toml"
    path.write_text(text.format(results=results))
    return path


def test_a_second_suite_trains_on_the_whole_pool_with_the_chosen_values(
    fake: FakeSimulator, suite_file: Path, tmp_path: Path
) -> None:
    tuned = tmp_path / "tuned"
    _benchmark(suite_file, tuned)
    fake.mus.clear()
    final = tmp_path / "final"
    _benchmark(_chosen_suite(tmp_path, tuned), final)
    # the validation winners, per alpha (the test set would have picked 1.0 at both)
    assert fake.mus == [0.1, 0.1] * 2 + [0.01, 0.01] * 2
    for alpha, mu in ((1, 0.1), (0.1, 0.01)):
        saved = ExperimentConfig.from_toml(final / f"runs/alpha{alpha}/seed0/fedprox/config.toml")
        assert saved.strategy.proximal_mu == mu
        assert saved.data.validation_examples == 0
        folder = final / f"runs/alpha{alpha}/seed0/align-prox"
        borrowed = ExperimentConfig.from_toml(folder / "config.toml").strategy
        assert borrowed.client_proximal_mu == mu and borrowed.ablation == "full-sound"
    page_text = (final / "results.md").read_text()
    assert (
        f"| prox-again | 0.1 | `strategy.proximal-mu` | 0.01 | `{tuned}` (fedprox) |" in page_text
    )


def test_a_missing_choice_is_named(fake: FakeSimulator, suite_file: Path, tmp_path: Path) -> None:
    tuned = tmp_path / "tuned"
    options = BenchmarkOptions(suite=str(_chosen_suite(tmp_path, tuned)))
    suite, base, _ = resolve(options)
    with pytest.raises(ConfigError, match=r"suite\.chosen\.fedprox: .*results\.json' not found"):
        plan_runs(suite, base, tmp_path / "final")
    _benchmark(suite_file, tuned, "--alphas", "1")  # tuned at alpha 1 only
    with pytest.raises(ConfigError, match=r"no choice of strategy\.proximal-mu .* alpha 0\.1"):
        plan_runs(suite, base, tmp_path / "final")


@pytest.mark.parametrize(
    ("chosen", "message"),
    [
        ('fedmoe = { key = "strategy.proximal-mu", results = "x" }', "no such row"),
        ('fedprox = { key = "strategy.nope", results = "x" }', "strategy.nope"),
        ('fedprox = { key = "strategy.proximal-mu" }', "must be"),
        ('fedprox = { key = "strategy.proximal-mu", results = "x", extra = 1 }', "must be"),
    ],
)
def test_bad_chosen_tables_are_named(tmp_path: Path, chosen: str, message: str) -> None:
    untuned = SUITE.replace(
        'fedprox = { key = "strategy.proximal-mu", values = [0.001, 0.01, 0.1, 1.0] }', ""
    )
    path = tmp_path / "bad.toml"
    path.write_text(untuned + "\n[suite.chosen]\n" + chosen + "\n")
    with pytest.raises(ConfigError, match=message):
        load_suite(path)


def test_a_row_is_not_both_tuned_and_chosen(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    chosen = 'fedprox = { key = "strategy.proximal-mu", results = "x" }'
    path.write_text(SUITE + "\n[suite.chosen]\n" + chosen + "\n")
    with pytest.raises(ConfigError, match="tuned here too"):
        load_suite(path)


def test_a_provisional_choice_is_refused(
    fake: FakeSimulator, suite_file: Path, tmp_path: Path
) -> None:
    tuned = tmp_path / "tuned"
    _benchmark(suite_file, tuned)
    (tuned / "runs/alpha0.1/seed1/fedprox--proximal-mu-1/summary.json").unlink()
    _benchmark(suite_file, tuned, "--no-run")  # alpha 0.1 chosen on seed 0 only
    choices = {c["alpha"]: c for c in json.loads((tuned / "results.json").read_text())["tuning"]}
    assert choices[0.1]["seeds"] == [0] and not choices[0.1]["complete"]
    assert choices[1.0]["complete"]
    assert "(provisional: 1 of 2 seeds)" in (tuned / "results.md").read_text()
    suite, base, _ = resolve(BenchmarkOptions(suite=str(_chosen_suite(tmp_path, tuned))))
    with pytest.raises(ConfigError, match=r"alpha 0\.1 .* is provisional"):
        plan_runs(suite, base, tmp_path / "final")
