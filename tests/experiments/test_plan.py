"""Suite parsing and planning from typed options: layering, grid narrowing, folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedalign.config import ConfigError, run_label
from fedalign.experiments.benchmark import BenchmarkOptions, plan_runs, resolve
from fedalign.experiments.benchmark.suite import label_of, parse_strategies, seed_list

SUITE = """
[suite]
name = "layers"
strategies = ["fedavg", "fedalign:margin-only"]
alphas = [0.5]
seeds = 2
reference = "fedalign:margin-only"

[model]
name = "tiny-upcycled"

[train]
lr = 0.1

[federated]
rounds = 3
seed = 10
"""


@pytest.fixture
def suite_file(tmp_path: Path) -> Path:
    path = tmp_path / "layers.toml"
    path.write_text(SUITE)
    return path


def test_run_label_is_one_spelling() -> None:
    assert run_label("fedavg", "full") == "fedavg"
    assert run_label("fedalign") == "fedalign"
    assert run_label("fedalign", "consistency") == "fedalign-consistency"
    assert label_of("fedalign:consistency") == "fedalign-consistency"
    assert label_of("fedalign-consistency") == "fedalign-consistency"


def test_parse_strategies_and_seeds() -> None:
    assert parse_strategies(["fedavg", " fedalign:consistency", ""]) == [
        ("fedavg", "full"),
        ("fedalign", "consistency"),
    ]
    with pytest.raises(ConfigError, match="at least one"):
        parse_strategies([" "])
    assert seed_list(3, 4) == [4, 5, 6] and seed_list([0, 7], 4) == [0, 7]
    with pytest.raises(ConfigError, match="seeds"):
        seed_list(True, 0)


def test_resolve_layers_suite_file_settings_and_overrides(suite_file: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "extra.toml"
    config_file.write_text("[train]\nlr = 0.2\nbatch-size = 4\n\n[federated]\nrounds = 5\n")
    options = BenchmarkOptions(
        suite=str(suite_file),
        config_file=config_file,
        settings={"federated.rounds": 6, "train.batch-size": 8},
        overrides=["federated.rounds=7"],
        threads=1,
        progress=False,
    )
    suite, base, out = resolve(options)
    assert base.train.lr == 0.2  # config file over the suite
    assert base.train.batch_size == 8  # named settings over the config file
    assert base.federated.rounds == 7  # --set last
    assert base.run.threads == 1 and base.run.progress is False
    assert out == Path("benchmarks/results/layers")
    assert suite.seeds == [10, 11]  # a count starts at the suite's federated.seed
    assert suite.reference_label == "fedalign-margin-only"


def test_grid_narrowing_and_planned_folders(suite_file: Path, tmp_path: Path) -> None:
    options = BenchmarkOptions(
        suite=str(suite_file),
        alphas=[1.0, 0.1],
        first_seed=3,
        strategies=[("fedavg", "full")],
        out=tmp_path / "o",
    )
    suite, base, out = resolve(options)
    runs = plan_runs(suite, base, out)
    assert [(r.alpha, r.seed, r.label) for r in runs] == [
        (1.0, 3, "fedavg"),
        (1.0, 4, "fedavg"),
        (0.1, 3, "fedavg"),
        (0.1, 4, "fedavg"),
    ]
    assert runs[-1].folder == tmp_path / "o" / "runs" / "alpha0.1" / "seed4" / "fedavg"
    assert runs[-1].config.partition.alpha == 0.1 and runs[-1].config.federated.seed == 4
    # the reference is not in the narrowed grid: the first listed strategy stands in
    assert suite.reference_label == "fedavg"
    with pytest.raises(ConfigError, match="at least one alpha"):
        resolve(BenchmarkOptions(suite=str(suite_file), alphas=[]))


VARIANTS = """
[suite.variants.soft-only]
strategy = "fedalign:full"
set = { "strategy.selection" = "soft", "train.lr" = 0.5 }
"""


def test_variants_are_rows_with_their_own_settings(suite_file: Path, tmp_path: Path) -> None:
    text = SUITE.replace('"fedalign:margin-only"]', '"fedalign:margin-only", "soft-only"]')
    suite_file.write_text(text + VARIANTS)
    suite, base, _ = resolve(BenchmarkOptions(suite=str(suite_file)))
    assert suite.strategy_labels == ["fedavg", "fedalign-margin-only", "soft-only"]
    runs = plan_runs(suite, base, tmp_path / "out")
    variant = [run for run in runs if run.label == "soft-only"]
    assert [run.seed for run in variant] == [10, 11]
    config = variant[0].config
    assert config.strategy.name == "fedalign" and config.strategy.ablation == "full"
    assert config.strategy.selection == "soft" and config.train.lr == 0.5
    assert variant[0].folder == tmp_path / "out" / "runs" / "alpha0.5" / "seed10" / "soft-only"
    # the other rows keep the base settings
    others = [run.config for run in runs if run.label != "soft-only"]
    assert all(c.strategy.selection == "hard" and c.train.lr == 0.1 for c in others)
    # --strategies may name a variant by its label
    narrowed, base, _ = resolve(
        BenchmarkOptions(suite=str(suite_file), strategies=[("soft-only", "full")])
    )
    assert [run.label for run in plan_runs(narrowed, base, tmp_path / "o")] == ["soft-only"] * 2


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("[suite.variants.x]\nset = {}\n", "needs strategy"),
        ('[suite.variants.x]\nstrategy = "fedalign"\ncolour = 1\n', "unknown keys"),
        (
            '[suite.variants.x]\nstrategy = "fedalign"\nset = { "strategy.selection" = "x" }\n',
            "selection",
        ),
        ('[suite.variants.x]\nstrategy = "fedalign"\nset = { "train.nope" = 1 }\n', "train.nope"),
    ],
)
def test_bad_variants_are_named(suite_file: Path, variant: str, message: str) -> None:
    suite_file.write_text(SUITE + variant)
    with pytest.raises(ConfigError, match=message):
        resolve(BenchmarkOptions(suite=str(suite_file)))
