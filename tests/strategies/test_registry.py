"""The strategy registry: names, options dataclasses, builders, and their config keys."""

from __future__ import annotations

import dataclasses

import pytest

from fedalign.config import ConfigError, ExperimentConfig, strategy_names
from fedalign.errors import OptionError
from fedalign.moe.layout import MoELayout
from fedalign.strategies import (
    REGISTRY,
    FedAdam,
    FedAlignMoE,
    FedAvg,
    FedMoE,
    FedProx,
    FedYogi,
    build_strategy,
)

LAYOUT = MoELayout(layers=())


def test_every_registered_strategy_is_a_config_choice() -> None:
    assert strategy_names() == tuple(REGISTRY)
    assert set(REGISTRY) == {"fedavg", "fedprox", "fedmoe", "fedalign", "fedadam", "fedyogi"}


def test_build_strategy_maps_names_and_options() -> None:
    assert type(build_strategy("fedavg", {}, LAYOUT)) is FedAvg
    prox = build_strategy("fedprox", {"proximal_mu": 0.3, "beta": 9.0}, LAYOUT)
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.3
    fedmoe = build_strategy("fedmoe", {"fedmoe_u_min": 0.2}, LAYOUT)
    assert isinstance(fedmoe, FedMoE) and fedmoe.u_min == 0.2
    align = build_strategy(
        "fedalign",
        {"ablation": "adaptive-reg", "routing_lambda": 0.5, "beta": 2.0, "eps": 1e-3},
        LAYOUT,
    )
    assert isinstance(align, FedAlignMoE)
    options = align.options
    assert (options.ablation, options.routing_lambda, options.beta, options.eps) == (
        "adaptive-reg",
        0.5,
        2.0,
        1e-3,
    )
    adam = build_strategy("fedadam", {"server_lr": 0.5, "server_tau": 0.1}, LAYOUT)
    assert isinstance(adam, FedAdam) and (adam.server_lr, adam.tau) == (0.5, 0.1)
    assert isinstance(build_strategy("fedyogi", {}, LAYOUT), FedYogi)


def test_build_strategy_unknown_name_lists_the_registry() -> None:
    with pytest.raises(OptionError, match="'name'") as error:
        build_strategy("fedsgd", {}, LAYOUT)
    for accepted in REGISTRY:
        assert accepted in str(error.value)


def test_options_are_config_keys_with_their_defaults() -> None:
    config = ExperimentConfig()
    flat = config.to_dict()["strategy"]
    for entry in REGISTRY.values():
        for item in dataclasses.fields(entry.options):
            assert flat[item.name.replace("_", "-")] == item.default
    config.set("strategy.proximal-mu", "0.5")
    assert config.strategy.proximal_mu == 0.5
    assert ExperimentConfig.from_dict(config.to_dict()).strategy.proximal_mu == 0.5


def test_option_errors_become_config_errors_naming_the_key() -> None:
    config = ExperimentConfig()
    config.strategy.name = "fedprox"
    config.set("strategy.proximal-mu", -1)
    with pytest.raises(ConfigError, match=r"strategy\.proximal-mu must be >= 0\.0 \(got -1\.0\)"):
        config.validate()
    config = ExperimentConfig()
    config.set("strategy.name", "fedalign")
    config.set("strategy.overlap", "cosine")
    with pytest.raises(ConfigError, match=r"strategy\.overlap must be one of") as error:
        config.validate()
    assert "bhattacharyya" in str(error.value)


def test_a_new_strategy_is_one_registration() -> None:
    """Registering an options dataclass makes its fields config keys (TOML, --set)."""
    from fedalign.config import _STRATEGY_OPTIONS, register_strategy

    @dataclasses.dataclass
    class ToyOptions:
        toy_strength: float = 0.5

    register_strategy("toy", ToyOptions)
    try:
        config = ExperimentConfig.from_dict({"strategy": {"name": "toy", "toy-strength": 2}})
        config.validate()
        assert config.strategy.toy_strength == 2.0
        assert config.to_dict()["strategy"]["toy-strength"] == 2.0
    finally:
        _STRATEGY_OPTIONS.pop("toy")


def test_clashing_option_is_refused() -> None:
    from fedalign.config import register_strategy

    @dataclasses.dataclass
    class Clash:
        proximal_mu: float = 0.9  # fedprox's key with another default

    with pytest.raises(TypeError, match="clashes"):
        register_strategy("clash", Clash)
