"""One typed configuration object for an experiment, and the one source of its defaults.

:class:`ExperimentConfig` groups every knob in sections (model, data, partition, train,
federated, strategy, run). It loads from TOML with hyphenated keys (Flower's style),
takes ``section.key=value`` overrides from the command line, validates itself before any
work starts, and is saved into every run folder as ``config.toml``.

Each section is a dataclass that validates its own keys (``validate``, raising
:class:`ConfigError` that names ``section.key``, the value found and what is accepted);
:meth:`ExperimentConfig.validate` runs them in turn, then the few rules that span sections.
Modules: ``checks`` (the shared checks), ``model``, ``sections`` (data, partition, train,
run), ``federated``, ``strategy`` (the registry and ``[strategy]``), ``experiment``.

The ``[strategy]`` section holds ``name``, the client-side statistics knobs, and the
options of every registered strategy, flat (``strategy.proximal-mu``). This layer knows no
strategy: each strategy declares an options dataclass, and the package's composition root
(``fedalign/__init__.py``) registers it here with :func:`register_strategy`. A new
strategy's options therefore reach TOML, ``--set``, the CLI help and the Flower run config
without an edit here.
"""

from __future__ import annotations

from fedalign.config.experiment import ExperimentConfig, toml_value
from fedalign.config.federated import ATTACKS, FAULT_KINDS, UPLOAD_COMPRESSIONS, FederatedConfig
from fedalign.config.model import (
    EXPERT_INITS,
    GATINGS,
    HEADS,
    LORA_AGGREGATIONS,
    LORA_ROUTER_CHOICES,
    QUANTIZE_CHOICES,
    TRAINABLE_CHOICES,
    ModelConfig,
)
from fedalign.config.sections import (
    DEVICE_NAMES,
    FROZEN_DTYPES,
    MULTIPLE_CHOICE_DATASETS,
    PARTITION_METHODS,
    PRECISIONS,
    DataConfig,
    PartitionConfig,
    RunConfig,
    TrainConfig,
    check_device_name,
    check_encoding,
)
from fedalign.config.strategy import _STRATEGY_OPTIONS as _STRATEGY_OPTIONS
from fedalign.config.strategy import (
    SEMANTIC_PRIVACY_MODES,
    StrategyConfig,
    default_variant,
    register_strategy,
    run_label,
    strategy_names,
    strategy_options,
)
from fedalign.errors import ConfigError

__all__ = [
    "ATTACKS",
    "DEVICE_NAMES",
    "EXPERT_INITS",
    "FAULT_KINDS",
    "FROZEN_DTYPES",
    "GATINGS",
    "HEADS",
    "LORA_AGGREGATIONS",
    "LORA_ROUTER_CHOICES",
    "MULTIPLE_CHOICE_DATASETS",
    "PARTITION_METHODS",
    "PRECISIONS",
    "QUANTIZE_CHOICES",
    "SEMANTIC_PRIVACY_MODES",
    "TRAINABLE_CHOICES",
    "UPLOAD_COMPRESSIONS",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "FederatedConfig",
    "ModelConfig",
    "PartitionConfig",
    "RunConfig",
    "StrategyConfig",
    "TrainConfig",
    "check_device_name",
    "check_encoding",
    "default_variant",
    "register_strategy",
    "run_label",
    "strategy_names",
    "strategy_options",
    "toml_value",
]
