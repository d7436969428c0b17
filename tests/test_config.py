"""The typed configuration: TOML, overrides, validation messages, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedalign.config import ConfigError, ExperimentConfig


def test_toml_with_hyphenated_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[partition]\nnum-clients = 7\nalpha = 0.3\n[strategy]\nname = "fedprox"\n')
    config = ExperimentConfig.from_toml(path)
    assert config.partition.num_clients == 7
    assert config.partition.alpha == 0.3
    assert config.strategy.name == "fedprox"


def test_overrides_convert_types() -> None:
    config = ExperimentConfig()
    config.apply_overrides(
        ["train.lr=0.01", "model.lora-targets=q_proj,v_proj", "train.keep-optimizer-state=true"]
    )
    assert config.train.lr == 0.01
    assert config.model.lora_targets == ["q_proj", "v_proj"]
    assert config.train.keep_optimizer_state is True


def test_round_trip_through_toml(tmp_path: Path) -> None:
    config = ExperimentConfig()
    config.apply_overrides(["strategy.name=fedalign", "strategy.ablation=consistency"])
    config.save(tmp_path / "config.toml")
    assert ExperimentConfig.from_toml(tmp_path / "config.toml").to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("strategy.name=fedbogus", "strategy.name"),
        ("strategy.ablation=row9", "strategy.ablation"),
        ("partition.alpha=0", "partition.alpha"),
        ("partition.alpha=-1", "partition.alpha"),
        ("model.top-k=9", "model.top-k"),
        ("partition.method=random", "partition.method"),
        ("model.trainable=some", "model.trainable"),
        ("federated.fraction=0", "federated.fraction"),
        ("train.label-calibration=-0.5", "train.label-calibration"),
        ("train.label-calibration=inf", "train.label-calibration"),
    ],
)
def test_bad_values_name_the_field(override: str, named: str) -> None:
    config = ExperimentConfig()
    config.apply_overrides([override])
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config.validate()


def test_label_calibration_is_for_classification_only() -> None:
    config = ExperimentConfig()
    config.apply_overrides(["train.label-calibration=1.0"])
    config.validate()  # the default data are classification
    config.apply_overrides(["data.dataset=mmlu"])
    with pytest.raises(ConfigError, match=r"train\.label-calibration applies to classification"):
        config.validate()


def test_unknown_keys_and_types_are_rejected() -> None:
    config = ExperimentConfig()
    with pytest.raises(ConfigError, match="accepted"):
        config.set("train.learning-rate", 1.0)
    with pytest.raises(ConfigError, match="unknown config section"):
        config.set("trainer.lr", 1.0)
    with pytest.raises(ConfigError, match="expects int"):
        config.set("federated.rounds", "many")
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        config.apply_overrides(["rounds"])
