"""One typed configuration object for an experiment.

:class:`ExperimentConfig` groups every knob in sections (model, data, partition, train,
federated, strategy, run). It loads from TOML with hyphenated keys (Flower's style),
takes ``section.key=value`` overrides from the command line, validates itself before any
work starts, and is saved into every run folder as ``config.toml``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomllib


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


STRATEGIES = ("fedavg", "fedprox", "fedmoe", "fedalign", "fedadam", "fedyogi")
ABLATIONS = (
    "fedavg",  # row 1: direct parameter averaging
    "uniform-align",  # row 2: gate distribution alignment, omega = 1/|S_t|, alpha = 1
    "consistency",  # row 3: + consistency weights o * m
    "overlap-only",  # row 3 variant: o only
    "margin-only",  # row 3 variant: m only
    "adaptive-reg",  # row 4: + adaptive expert-level regularisation alpha_i(e)
    "full",  # row 5: + semantic-aware expert aggregation (FedAlign-MoE)
)
PARTITION_METHODS = ("dirichlet", "pathological", "iid")
TRAINABLE_CHOICES = ("all", "moe+head", "lora")
EXPERT_INITS = ("moefication", "copy", "drop-upcycling")
GATINGS = ("auto", "renormalize", "scaled", "straight-through")


@dataclass
class ModelConfig:
    """Which model, how it becomes an MoE and which of its parameters train.

    Parameters
    ----------
    name : str, default "upcycled-minilm"
        ``upcycled-minilm`` (the embedded all-MiniLM-L6-v2, its top FFNs turned into MoE
        layers per ``expert_init``), a tiny
        test configuration (``tiny-qwen3moe``, ``tiny-qwen2moe``, ``tiny-mixtral``,
        ``tiny-switch``, ``tiny-upcycled``), a Hugging Face model id or a local folder.
    num_experts : int, default 8
        Experts per upcycled layer (upcycled encoders only).
    top_k : int, default 2
        Experts selected per token (upcycled encoders only; hub models keep their own).
    upcycle_layers : int, default 2
        How many of the encoder's top FFN layers become MoE layers (upcycled only).
    trainable : str, default "moe+head"
        ``all``, ``moe+head`` (MoE layers and classifier; everything else frozen) or
        ``lora`` (LoRA adapters on ``lora_targets`` plus routers and classifier).
    lora_rank : int, default 8
    lora_alpha : int, default 16
    lora_targets : list of str, default ["query", "value"]
    max_length : int, default 64
        Tokens per example after truncation.
    load_balance_coef : float, default 0.0
        Coefficient of the Switch-style load-balancing loss computed on router logits.
    router_noise_std : float, default 0.02
        Std of the normal initialisation of the fresh router of upcycled layers (0 gives a
        zero router: uniform routing probabilities).
    cache_prefix : bool, default True
        For upcycled encoders whose lower layers are frozen, run the frozen prefix once per
        example and reuse its outputs every round (same numbers, far less compute).
    expert_init : str, default "moefication"
        How a dense encoder's FFN becomes experts (upcycled encoders only):
        ``moefication`` (split the FFN's neurons into ``num_experts`` balanced groups, each
        expert ``1/num_experts`` of the FFN, router fitted on sample text), ``copy`` (every
        expert a full copy, fresh router; sparse upcycling) or ``drop-upcycling`` (copies
        with a fraction ``drop_fraction`` of each copy's neurons re-initialised).
    drop_fraction : float, default 0.5
        Fraction of each copy's intermediate neurons re-initialised by ``drop-upcycling``.
    gating : str, default "auto"
        Weights of the selected experts' outputs: ``renormalize`` (top-k probabilities
        renormalised to sum to one), ``scaled`` (the same times ``top_k``),
        ``straight-through`` (exactly one in value, the probability's gradient) or ``auto``
        (``straight-through`` for ``moefication``, ``renormalize`` otherwise).
    """

    name: str = "upcycled-minilm"
    num_experts: int = 8
    top_k: int = 2
    upcycle_layers: int = 2
    trainable: str = "moe+head"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    max_length: int = 64
    load_balance_coef: float = 0.0
    router_noise_std: float = 0.02
    cache_prefix: bool = True
    expert_init: str = "moefication"
    drop_fraction: float = 0.5
    gating: str = "auto"

    def resolved_gating(self) -> str:
        """The gating ``auto`` stands for with this ``expert_init``."""
        if self.gating != "auto":
            return self.gating
        return "straight-through" if self.expert_init == "moefication" else "renormalize"


@dataclass
class DataConfig:
    """Which labelled text to use.

    Parameters
    ----------
    dataset : str, default "wordnet-supersense"
        ``wordnet-supersense`` (embedded), ``ag_news`` (Hugging Face hub), or a path to a
        ``.csv`` / ``.jsonl`` file.
    text_column : str, default "text"
    label_column : str, default "label"
    max_train_examples : int, default 0
        Cap on the pooled training examples before partitioning (0 = no cap).
    max_test_examples : int, default 0
        Cap on the global test set (0 = no cap).
    test_fraction : float, default 0.1
        Fraction held out as the balanced global test set when the source has no test split.
    """

    dataset: str = "wordnet-supersense"
    text_column: str = "text"
    label_column: str = "label"
    max_train_examples: int = 0
    max_test_examples: int = 0
    test_fraction: float = 0.1


@dataclass
class PartitionConfig:
    """How the training pool is split across clients.

    Parameters
    ----------
    method : str, default "dirichlet"
        ``dirichlet`` (label skew with concentration ``alpha``), ``pathological``
        (``classes_per_client`` classes each) or ``iid``.
    num_clients : int, default 10
    alpha : float, default 0.1
    classes_per_client : int, default 2
    min_client_size : int, default 10
    local_test_fraction : float, default 0.2
        Fraction of each client's share kept as its local test split.
    """

    method: str = "dirichlet"
    num_clients: int = 10
    alpha: float = 0.1
    classes_per_client: int = 2
    min_client_size: int = 10
    local_test_fraction: float = 0.2


@dataclass
class TrainConfig:
    """Local training on each client.

    Parameters
    ----------
    lr : float, default 1e-4
    weight_decay : float, default 0.0
    batch_size : int, default 16
    local_epochs : int, default 1
    local_steps : int, default 0
        When > 0, train exactly this many steps instead of ``local_epochs`` epochs.
    grad_clip : float, default 1.0
        Max gradient norm (0 disables clipping).
    keep_optimizer_state : bool, default False
        Keep each client's AdamW state between its rounds (costs memory per client).
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 16
    local_epochs: int = 1
    local_steps: int = 0
    grad_clip: float = 1.0
    keep_optimizer_state: bool = False


@dataclass
class FederatedConfig:
    """The federation.

    Parameters
    ----------
    rounds : int, default 25
    fraction : float, default 1.0
        Fraction of clients sampled each round (at least one).
    seed : int, default 0
        Seeds partitioning, initialisation, sampling, shuffling: same seed, same numbers.
    eval_every : int, default 1
        Evaluate the global model every this many rounds (and always after the last).
    """

    rounds: int = 25
    fraction: float = 1.0
    seed: int = 0
    eval_every: int = 1


@dataclass
class StrategyConfig:
    """The aggregation strategy and its knobs.

    Parameters
    ----------
    name : str, default "fedavg"
        One of ``fedavg``, ``fedprox``, ``fedmoe``, ``fedalign``, ``fedadam``, ``fedyogi``.
    proximal_mu : float, default 0.01
        FedProx ``mu``.
    ablation : str, default "full"
        FedAlign-MoE ablation row (see ``ABLATIONS``).
    routing_lambda : float, default 0.1
        Weight of the routing regulariser ``lambda``.
    beta : float, default 1.0
        Threshold ``tau_e = M(e) - beta * Sigma(e)`` of semantic aggregation.
    eps : float, default 1e-6
        Floor that keeps consistency weights defined.
    overlap : str, default "geometric"
        Expert overlap ``o_i(e)`` of the consistency weights: ``geometric``
        (``sqrt(pbar_i(e) p_g(e))``, METHOD.md), ``bhattacharyya`` (the client's whole routing
        distribution against ``p_g``) or ``intersection`` (``min(pbar_i(e), p_g(e))``).
    personalized_experts : bool, default False
        Clients start each round from their semantic region's experts.
    stats_max_examples : int, default 512
        Examples used for the routing-statistics pass.
    hidden_noise_std : float, default 0.0
        Gaussian noise (relative to the norm) added to ``mu_i(e)`` before upload (privacy).
    fedmoe_u_min : float, default 0.01
        FedMoE-style minimum usage for a client to contribute to an expert.
    server_lr : float, default 0.01
        FedAdam / FedYogi server learning rate.
    server_beta1 : float, default 0.9
    server_beta2 : float, default 0.99
    server_tau : float, default 1e-3
    """

    name: str = "fedavg"
    proximal_mu: float = 0.01
    ablation: str = "full"
    routing_lambda: float = 0.1
    beta: float = 1.0
    eps: float = 1e-6
    overlap: str = "geometric"
    personalized_experts: bool = False
    stats_max_examples: int = 512
    hidden_noise_std: float = 0.0
    fedmoe_u_min: float = 0.01
    server_lr: float = 0.01
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3


@dataclass
class RunConfig:
    """Where records go and how chatty the run is.

    Parameters
    ----------
    out : str, default ""
        Run folder; empty means ``runs/<strategy>-<timestamp>``.
    progress : bool, default True
        Show progress bars.
    threads : int, default 0
        ``torch.set_num_threads`` (0 keeps torch's default).
    """

    out: str = ""
    progress: bool = True
    threads: int = 0


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
        hints = get_type_hints(type(section))
        if field_name not in hints:
            accepted = sorted(f.name.replace("_", "-") for f in fields(section))
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
        """Raise :class:`ConfigError` naming the field and accepted values."""
        m, d, p, t, f, s = (
            self.model,
            self.data,
            self.partition,
            self.train,
            self.federated,
            self.strategy,
        )
        _one_of("strategy.name", s.name, STRATEGIES)
        _one_of("strategy.ablation", s.ablation, ABLATIONS)
        _one_of("strategy.overlap", s.overlap, ("geometric", "bhattacharyya", "intersection"))
        _one_of("partition.method", p.method, PARTITION_METHODS)
        _one_of("model.trainable", m.trainable, TRAINABLE_CHOICES)
        _one_of("model.expert-init", m.expert_init, EXPERT_INITS)
        _one_of("model.gating", m.gating, GATINGS)
        if not 0.0 <= m.drop_fraction <= 1.0:
            raise ConfigError(f"model.drop-fraction must be in [0, 1] (got {m.drop_fraction})")
        _positive("partition.num-clients", p.num_clients)
        if p.alpha <= 0:
            raise ConfigError(f"partition.alpha must be > 0 (got {p.alpha})")
        _positive("partition.classes-per-client", p.classes_per_client)
        if not 0.0 <= p.local_test_fraction < 1.0:
            raise ConfigError(
                f"partition.local-test-fraction must be in [0, 1) (got {p.local_test_fraction})"
            )
        _positive("model.num-experts", m.num_experts)
        _positive("model.top-k", m.top_k)
        if m.top_k > m.num_experts:
            raise ConfigError(
                f"model.top-k ({m.top_k}) must be <= model.num-experts ({m.num_experts})"
            )
        _positive("model.max-length", m.max_length)
        _positive("model.upcycle-layers", m.upcycle_layers)
        if not 0.0 < d.test_fraction < 1.0:
            raise ConfigError(f"data.test-fraction must be in (0, 1) (got {d.test_fraction})")
        if t.lr <= 0:
            raise ConfigError(f"train.lr must be > 0 (got {t.lr})")
        _positive("train.batch-size", t.batch_size)
        if t.local_epochs < 1 and t.local_steps < 1:
            raise ConfigError("train.local-epochs or train.local-steps must be >= 1")
        _positive("federated.rounds", f.rounds)
        if not 0.0 < f.fraction <= 1.0:
            raise ConfigError(f"federated.fraction must be in (0, 1] (got {f.fraction})")
        _positive("federated.eval-every", f.eval_every)
        if s.proximal_mu < 0 or s.routing_lambda < 0 or s.beta < 0 or s.eps <= 0:
            raise ConfigError(
                "strategy.proximal-mu, strategy.routing-lambda and strategy.beta must be >= 0 "
                "and strategy.eps > 0"
            )
        if not 0.0 <= s.fedmoe_u_min <= 1.0:
            raise ConfigError(f"strategy.fedmoe-u-min must be in [0, 1] (got {s.fedmoe_u_min})")
        _positive("strategy.stats-max-examples", s.stats_max_examples)

    # ------------------------------------------------------------------ saving
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            section.name: {
                key.replace("_", "-"): value
                for key, value in dataclasses.asdict(getattr(self, section.name)).items()
            }
            for section in fields(self)
        }

    def to_toml(self) -> str:
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())

    def copy(self) -> ExperimentConfig:
        return ExperimentConfig.from_dict(self.to_dict())


def _section_names() -> set[str]:
    return {f.name for f in fields(ExperimentConfig)}


def _one_of(name: str, value: str, accepted: Iterable[str]) -> None:
    accepted = tuple(accepted)
    if value not in accepted:
        raise ConfigError(f"{name} must be one of {list(accepted)} (got {value!r})")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be >= 1 (got {value})")


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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")
