"""``ExperimentConfig``: the sections together, loading (TOML, ``--set``), the rules that
span sections, and saving."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from fedalign.config.federated import FederatedConfig
from fedalign.config.model import ModelConfig
from fedalign.config.sections import (
    MULTIPLE_CHOICE_DATASETS,
    DataConfig,
    PartitionConfig,
    RunConfig,
    TrainConfig,
)
from fedalign.config.strategy import StrategyConfig, _option_fields
from fedalign.errors import ConfigError


@dataclass
class ExperimentConfig:
    """Everything one experiment needs. See each section's class for its keys."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def model_head(self) -> str:
        """The head ``model.head`` stands for with this ``data.dataset``."""
        if self.model.head != "auto":
            return self.model.head
        return "causal-lm" if self.data.task == "multiple-choice" else "classification"

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        config = cls()
        for section_key, values in data.items():
            section_name = section_key.replace("-", "_")
            if section_name not in _section_names():
                raise ConfigError(
                    f"unknown config section {section_key!r}; accepted: {sorted(_section_names())}"
                )
            if not isinstance(values, Mapping):
                raise ConfigError(f"config section {section_key!r} must be a table")
            for key, value in values.items():
                config.set(f"{section_name}.{key}", value)
        return config

    @classmethod
    def from_toml(cls, path: str | Path) -> ExperimentConfig:
        path = Path(path)
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError as error:
            raise ConfigError(f"config file {str(path)!r} not found") from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from error
        return cls.from_dict(data)

    def set(self, dotted_key: str, value: Any) -> None:
        """Set ``section.key`` (hyphens or underscores) to ``value``, converting strings."""
        if "." not in dotted_key:
            raise ConfigError(f"config key {dotted_key!r} must look like 'section.key'")
        section_key, key = dotted_key.split(".", 1)
        section_name = section_key.replace("-", "_")
        field_name = key.replace("-", "_")
        if section_name not in _section_names():
            raise ConfigError(
                f"unknown config section {section_key!r}; accepted: {sorted(_section_names())}"
            )
        section = getattr(self, section_name)
        hints = _section_hints(section)
        if field_name not in hints:
            accepted = sorted(name.replace("_", "-") for name in hints)
            raise ConfigError(
                f"unknown config key {dotted_key!r}; accepted in [{section_key}]: {accepted}"
            )
        setattr(section, field_name, _coerce(dotted_key, value, hints[field_name]))

    def apply_overrides(self, overrides: Iterable[str]) -> None:
        """Apply ``section.key=value`` strings (the command line's ``--set``)."""
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like 'section.key=value'")
            key, value = item.split("=", 1)
            self.set(key.strip(), value.strip())

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first key out of range, with what was found
        and what is accepted: each section's own rules (its ``validate``), then the rules
        that span sections."""
        for section in fields(self):
            getattr(self, section.name).validate()
        self._validate_head_fits_data()
        self._validate_attack_clients()

    def _validate_head_fits_data(self) -> None:
        """``model.head`` can score ``data.dataset``'s task."""
        head, dataset, task = self.model.head, self.data.dataset, self.data.task
        if task == "multiple-choice" and head == "classification":
            raise ConfigError(
                f"model.head 'classification' cannot score the multiple-choice dataset "
                f"{dataset!r}; accepted: ['causal-lm', 'auto']"
            )
        if task == "classification" and head == "causal-lm":
            raise ConfigError(
                f"model.head 'causal-lm' needs a multiple-choice data.dataset "
                f"{list(MULTIPLE_CHOICE_DATASETS)} (got {dataset!r}); accepted for "
                "classification data: ['classification', 'auto']"
            )
        if task == "multiple-choice" and self.train.label_calibration > 0:
            raise ConfigError(
                f"train.label-calibration applies to classification; {dataset!r} is "
                f"multiple-choice (got {self.train.label_calibration}; accepted here: 0)"
            )

    def _validate_attack_clients(self) -> None:
        """``federated.attack-clients`` are ids of clients that ``partition.num-clients``
        creates."""
        num_clients = self.partition.num_clients
        for client in self.federated.attack_clients:
            if not 0 <= client < num_clients:
                raise ConfigError(
                    f"federated.attack-clients must hold client ids in [0, {num_clients - 1}] "
                    f"(partition.num-clients = {num_clients}; got {client})"
                )

    # ------------------------------------------------------------------ saving
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every key of every section with its value, hyphenated (strategy options flat)."""
        result: dict[str, dict[str, Any]] = {}
        for section in fields(self):
            values = dataclasses.asdict(getattr(self, section.name))
            if isinstance(getattr(self, section.name), StrategyConfig):
                values.pop("options")
                values.update(self.strategy.option_values())
            result[section.name] = {key.replace("_", "-"): value for key, value in values.items()}
        return result

    def to_toml(self) -> str:
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())

    def copy(self) -> ExperimentConfig:
        return ExperimentConfig.from_dict(self.to_dict())


def _section_hints(section: Any) -> dict[str, Any]:
    """Settable keys of a section and their types (strategy: base fields and options)."""
    hints = get_type_hints(type(section))
    if isinstance(section, StrategyConfig):
        hints.pop("options")
        hints.update({name: kind for name, (kind, _default) in _option_fields().items()})
    return hints


def _section_names() -> set[str]:
    return {f.name for f in fields(ExperimentConfig)}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` (often a command-line string) to the field's type."""
    origin = get_origin(annotation)
    try:
        if annotation is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
        if origin is list:
            (item_type,) = get_args(annotation)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return [_coerce(key, v, item_type) for v in value]
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"config key {key!r} expects {getattr(annotation, '__name__', annotation)} "
            f"(got {value!r})"
        ) from error
    return value


def toml_value(value: Any) -> str:
    """One TOML value (bool, number, string or list of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")
