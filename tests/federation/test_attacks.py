"""Simulated malicious clients (``federated.attack``) and their configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedalign.config import ConfigError
from fedalign.experiments import run_experiment
from fedalign.federation import poison_result
from fedalign.protocol import ClientResult
from fedalign.records import read_jsonl
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_poisoned_updates_are_scaled_or_flipped_around_the_global_values() -> None:
    base = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([0.5], dtype=torch.bfloat16)}
    honest = ClientResult(3, 10, {"w": torch.tensor([2.0, 0.0]), "h": torch.tensor([1.5])})
    scaled = poison_result(base, honest, "scale", 1000.0)
    assert torch.equal(scaled.parameters["w"], torch.tensor([1001.0, -1998.0]))
    assert scaled.parameters["h"].dtype == torch.bfloat16
    assert float(scaled.parameters["h"]) == pytest.approx(1000.5, rel=1e-2)
    flipped = poison_result(base, honest, "sign-flip", 1000.0)
    assert torch.equal(flipped.parameters["w"], torch.tensor([0.0, 4.0]))
    assert flipped.client_id == 3 and flipped.num_examples == 10
    assert poison_result(base, honest, "none", 1000.0) is honest
    assert torch.equal(honest.parameters["w"], torch.tensor([2.0, 0.0]))  # not modified
    with pytest.raises(ValueError, match="unknown attack"):
        poison_result(base, honest, "gaussian", 1.0)


def first_round_norms(folder: Path, **overrides: object) -> dict[str, float]:
    config = tiny_config(
        strategy__name="fedavg",
        federated__rounds=1,
        federated__clip_update_norm=1e-9,  # every update clipped: its norm is recorded
        **overrides,
    )
    run_experiment(config, folder, log=None)
    return dict(read_jsonl(folder / "metrics.jsonl")[0]["clipped_clients"])


@pytest.mark.slow
def test_simulator_attacks_only_the_chosen_clients(tmp_path: Path) -> None:
    clean = first_round_norms(tmp_path / "clean")
    scaled = first_round_norms(
        tmp_path / "scaled",
        federated__attack="scale",
        federated__attack_clients="1",
        federated__attack_scale=1000.0,
    )
    flipped = first_round_norms(
        tmp_path / "flipped", federated__attack="sign-flip", federated__attack_clients="1"
    )
    assert set(clean) == {"0", "1", "2"}
    assert scaled["1"] == pytest.approx(1000 * clean["1"], rel=1e-3)
    assert flipped["1"] == pytest.approx(clean["1"], rel=1e-5)
    for other in ("0", "2"):
        assert scaled[other] == clean[other] and flipped[other] == clean[other]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"federated__attack": "noise"}, "federated.attack must be one of"),
        ({"federated__attack": "scale"}, "needs federated.attack-clients"),
        (
            {"federated__attack": "scale", "federated__attack_clients": "7"},
            r"attack-clients must hold client ids in \[0, 2\]",
        ),
        ({"federated__attack_scale": float("inf")}, "attack-scale must be finite"),
        ({"strategy__semantic_privacy": "dp"}, "strategy.semantic-privacy must be one of"),
        ({"strategy__semantic_clip": 0.0}, "strategy.semantic-clip must be > 0"),
        ({"strategy__semantic_noise_multiplier": -1.0}, "semantic-noise-multiplier must be >= 0"),
        ({"strategy__semantic_delta": 1.0}, r"semantic-delta must be in \(0, 1\)"),
        ({"strategy__probe_examples": 0}, "strategy.probe-examples must be >= 1"),
    ],
)
def test_bad_attack_and_privacy_settings_name_the_key(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides).validate()


def test_attack_refuses_compressed_uploads() -> None:
    config = tiny_config(
        federated__attack="scale",
        federated__attack_clients=[0],
        federated__upload_compression="int8",
    )
    with pytest.raises(ConfigError, match="upload-compression"):
        config.validate()
