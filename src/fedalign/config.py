"""One typed configuration object for an experiment, and the one source of its defaults.

:class:`ExperimentConfig` groups every knob in sections (model, data, partition, train,
federated, strategy, run). It loads from TOML with hyphenated keys (Flower's style),
takes ``section.key=value`` overrides from the command line, validates itself before any
work starts, and is saved into every run folder as ``config.toml``.

The ``[strategy]`` section holds ``name``, the client-side statistics knobs, and the
options of every registered strategy, flat (``strategy.proximal-mu``). This layer knows no
strategy: each strategy declares an options dataclass, and the package's composition root
(``fedalign/__init__.py``) registers it here with :func:`register_strategy`. A new
strategy's options therefore reach TOML, ``--set``, the CLI help and the Flower run config
without an edit here.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from fedalign.errors import ConfigError, OptionError

__all__ = [
    "ATTACKS",
    "DEVICE_NAMES",
    "FAULT_KINDS",
    "FROZEN_DTYPES",
    "HEADS",
    "MULTIPLE_CHOICE_DATASETS",
    "PRECISIONS",
    "SEMANTIC_PRIVACY_MODES",
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
    "register_strategy",
    "run_label",
    "strategy_names",
    "strategy_options",
]

_STRATEGY_OPTIONS: dict[str, type] = {}
"""Registered strategies: name -> options dataclass (see :func:`register_strategy`)."""

_RUN_LABELS: dict[str, Callable[[str], str]] = {}
"""Registered strategies' run labels: name -> label of a variant (see :func:`run_label`)."""


def register_strategy(name: str, options: type, label: Callable[[str], str] | None = None) -> None:
    """Make strategy ``name`` and the fields of its options dataclass known to the config;
    ``label(variant)`` names its runs (default: the strategy's name).

    Option names are flat in ``[strategy]``: two strategies may share an option only with
    the same type and default (FedAdam and FedYogi share theirs).

    Raises
    ------
    TypeError
        When ``options`` is not a dataclass, or an option clashes with another strategy's
        or with a base field of :class:`StrategyConfig`.
    """
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options of strategy {name!r} must be a dataclass (got {options!r})")
    base = {f.name for f in fields(StrategyConfig)}
    known = _option_fields()
    hints = get_type_hints(options)
    for item in fields(options):
        if item.name in base:
            raise TypeError(f"option {item.name!r} of {name!r} clashes with a base strategy key")
        if item.name in known:
            other_type, other_default = known[item.name]
            if (other_type, other_default) != (hints[item.name], _default(item)):
                raise TypeError(f"option {item.name!r} of {name!r} clashes with another strategy")
    _STRATEGY_OPTIONS[name] = options
    if label is not None:
        _RUN_LABELS[name] = label


def strategy_names() -> tuple[str, ...]:
    """Names of the registered strategies, in registration order."""
    return tuple(_STRATEGY_OPTIONS)


def strategy_options(name: str) -> type:
    """The options dataclass of strategy ``name``."""
    return _STRATEGY_OPTIONS[name]


def _default(item: dataclasses.Field[Any]) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    raise TypeError(f"option {item.name!r} needs a default")


def _option_fields() -> dict[str, tuple[Any, Any]]:
    """Every registered option: name -> (type, default), in registration order."""
    merged: dict[str, tuple[Any, Any]] = {}
    for options in _STRATEGY_OPTIONS.values():
        hints = get_type_hints(options)
        for item in fields(options):
            merged.setdefault(item.name, (hints[item.name], _default(item)))
    return merged


def run_label(strategy_name: str, ablation: str = "full") -> str:
    """The label of a run in tables, plots and folder names: what the strategy registered
    for the variant ``ablation`` (``strategy.ablation``; FedAlign-MoE gives
    ``fedalign-<ablation>`` for rows other than ``full``), else the strategy's name."""
    label = _RUN_LABELS.get(strategy_name)
    return strategy_name if label is None else label(ablation)


PARTITION_METHODS = ("dirichlet", "pathological", "iid")
FAULT_KINDS = ("raise", "vanish", "hang")
"""Kinds of injected client faults (``federated.fault-kinds``)."""
ATTACKS = ("none", "scale", "sign-flip")
"""Simulated malicious-client updates (``federated.attack``)."""
SEMANTIC_PRIVACY_MODES = ("none", "clip-noise", "public-probe")
"""What leaves a client for FedAlign-MoE's semantic step (``strategy.semantic-privacy``)."""
UPLOAD_COMPRESSIONS = ("none", "bf16", "int8", "topk")
"""Values of ``federated.upload-compression`` (see :mod:`fedalign.compression`)."""
TRAINABLE_CHOICES = ("all", "moe+head", "lora")
LORA_ROUTER_CHOICES = ("full", "lora", "frozen")
"""``model.lora-router``: how the routers train when ``model.trainable = "lora"``."""
LORA_AGGREGATIONS = ("factors", "product-svd")
"""``model.lora-aggregation``: FedIT factor means, or the exact product mean re-factorised."""
QUANTIZE_CHOICES = ("none", "4bit")
"""``model.quantize``: base weights as loaded, or 4-bit NF4 (bitsandbytes, CUDA only)."""
EXPERT_INITS = ("moefication", "copy", "drop-upcycling")
GATINGS = ("auto", "renormalize", "scaled", "straight-through")
HEADS = ("auto", "classification", "causal-lm")
"""``model.head``: ``auto`` is ``causal-lm`` for multiple-choice data, else ``classification``."""
MULTIPLE_CHOICE_DATASETS = ("mmlu", "hellaswag")
"""Named multiple-choice sources of ``data.dataset`` (scored by a causal LM)."""
PRECISIONS = ("fp32", "bf16", "auto")
"""``run.precision``: float32, bfloat16 autocast, or bf16 where the device supports it."""
FROZEN_DTYPES = ("fp32", "bf16")
"""``run.frozen-dtype``: storage of the parameters that do not train."""
DEVICE_NAMES = ("cpu", "auto", "cuda", "cuda:N")
"""Accepted forms of ``run.device`` (N: a GPU index)."""


@dataclass
class ModelConfig:
    """Which model, how it becomes an MoE and which of its parameters train.

    Parameters
    ----------
    name : str, default "upcycled-minilm"
        ``upcycled-minilm`` (the embedded all-MiniLM-L6-v2, its top FFNs turned into MoE
        layers per ``expert_init``), a tiny
        test configuration (``fedalign.models.TINY_MODELS``: ``tiny-qwen3moe``,
        ``tiny-deepseek-v2``, ``tiny-granitemoe``, ...), a Hugging Face model id or a local
        folder.
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
        Modules (e.g. attention projections) that get LoRA adapters.
    lora_experts : bool, default False
        With ``trainable = "lora"``: LoRA on the routed experts too, one rank-``lora_rank``
        adapter per expert (peft ``target_parameters`` on fused ``(E, ., .)`` expert tensors,
        rank stacked per expert; ``target_modules`` on per-expert linear layers). The
        strategies then compare and merge each expert's update ``s B_e A_e``.
    lora_router : str, default "full"
        With ``trainable = "lora"``: ``full`` (routers train fully), ``lora`` (routers get
        LoRA adapters; FedAlign-MoE's row-wise router step then does not apply) or
        ``frozen``.
    lora_aggregation : str, default "factors"
        How the server aggregates LoRA pairs: ``factors`` (weighted means of ``A`` and of
        ``B``, FedIT; inexact) or ``product-svd`` (the weighted mean of the products
        ``B A``, exact, re-factorised to rank ``lora_rank`` by truncated SVD).
    quantize : str, default "none"
        ``4bit``: load the base weights in 4-bit NF4 (bitsandbytes; needs CUDA and
        ``trainable = "lora"``; hub or folder models only).
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
    head : str, default "auto"
        ``classification`` (a sequence-classification head; text-classification data),
        ``causal-lm`` (the model's language-modelling head; multiple-choice data, scored by
        the log-likelihood of each choice) or ``auto`` (``causal-lm`` when ``data.dataset``
        is multiple-choice, else ``classification``).
    tokenizer : str, default ""
        A tokenizer folder or Hugging Face hub id to use instead of the model's own (empty:
        the model folder's or hub id's own tokenizer; the embedded all-MiniLM-L6-v2
        tokenizer for tiny configurations and folders saved without one). Its vocabulary
        must fit the model's input embedding.
    """

    name: str = "upcycled-minilm"
    num_experts: int = 8
    top_k: int = 2
    upcycle_layers: int = 2
    trainable: str = "moe+head"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    lora_experts: bool = False
    lora_router: str = "full"
    lora_aggregation: str = "factors"
    quantize: str = "none"
    max_length: int = 64
    load_balance_coef: float = 0.0
    router_noise_std: float = 0.02
    cache_prefix: bool = True
    expert_init: str = "moefication"
    drop_fraction: float = 0.5
    gating: str = "auto"
    head: str = "auto"
    tokenizer: str = ""

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
        Text classification: ``wordnet-supersense`` (embedded), ``ag_news`` (Hugging Face
        hub), or a path to a ``.csv`` / ``.jsonl`` file. Multiple choice: ``mmlu``
        (``cais/mmlu``; partitioned by subject) or ``hellaswag`` (``Rowan/hellaswag``;
        partitioned by activity label).
    text_column : str, default "text"
    label_column : str, default "label"
    max_train_examples : int, default 0
        Cap on the pooled training examples before partitioning (0 = no cap).
    max_test_examples : int, default 0
        Cap on the global test set (0 = no cap).
    test_fraction : float, default 0.1
        Fraction held out as the balanced global test set when the source has no test split.
    validation_examples : int, default 0
        Examples held out (class-balanced, seeded) from the training pool before the cap
        and the partition as the server's validation set (0 = none); never given to
        clients, evaluated every round as ``validation_accuracy`` (tuning without the test
        set).
    encoding : str, default "utf-8"
        Text encoding of a ``.csv`` / ``.jsonl`` / ``.json`` file (any Python codec name; a
        leading UTF-8 byte-order mark is skipped).
    path : str, default ""
        For ``mmlu`` / ``hellaswag``: a local ``.jsonl`` / ``.json`` file in the hub
        dataset's schema, read instead of the hub (empty = the hub, through
        ``datasets.load_dataset``). ``sample`` names the small sample in that schema
        shipped with the package (offline demos and tests).
    """

    dataset: str = "wordnet-supersense"
    text_column: str = "text"
    label_column: str = "label"
    max_train_examples: int = 0
    max_test_examples: int = 0
    test_fraction: float = 0.1
    validation_examples: int = 0
    encoding: str = "utf-8"
    path: str = ""

    @property
    def task(self) -> str:
        """``multiple-choice`` for :data:`MULTIPLE_CHOICE_DATASETS`, else ``classification``."""
        return "multiple-choice" if self.dataset in MULTIPLE_CHOICE_DATASETS else "classification"


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
    min_local_test : int, default 20
        Clients with at least this many local test examples enter the per-client
        percentile (``local_accuracy_p10``); smaller splits say little about a client.
    min_clients : int, default 1
        A round is aggregated only when at least this many selected clients returned a
        result that passed validation; otherwise the run stops with an error (the last
        checkpoint stays resumable).
    clip_update_norm : float, default 0.0
        When > 0, each client's update (its parameters minus the global ones) is scaled
        down to at most this L2 norm (over all trainable tensors) before aggregation.
        0 turns clipping off.
    fault_rate : float, default 0.0
        Simulator only: probability that a selected client fails in a round (fault
        injection for testing; 0 = no faults, the default behaviour bit for bit).
    fault_seed : int, default 0
        Seeds the fault draws (independent of ``seed``: faults never move other numbers).
    fault_kinds : list of str, default ["raise", "vanish", "hang"]
        What an injected fault does, drawn uniformly: ``raise`` (the client raises),
        ``vanish`` (no reply) or ``hang`` (no reply before the deadline, recorded as a
        timeout; nothing sleeps).
    attack : str, default "none"
        Simulator only: ``none``, ``scale`` (the attacking clients upload
        ``global + attack_scale * update``) or ``sign-flip`` (``global - update``), where
        ``update`` is the client's honest parameters minus the global ones.
    attack_clients : list of int, default []
        Ids of the attacking clients (each must be ``< partition.num-clients``).
    attack_scale : float, default 1000.0
        Factor of the ``scale`` attack.
    upload_compression : str, default "none"
        What a client uploads: ``none`` (its full float32 parameters, as always), or its
        delta (parameters minus the round's global ones) as ``bf16``, ``int8`` (one
        symmetric scale per row) or ``topk`` (the ``topk_fraction`` largest magnitudes per
        tensor). The server restores float32 parameters before screening, so every
        strategy works unchanged (:mod:`fedalign.compression`).
    topk_fraction : float, default 0.1
        Fraction of each tensor's values a ``topk`` upload keeps, in (0, 1].
    error_feedback : bool, default True
        With a lossy ``upload_compression``: each client keeps what compression dropped
        (a float32 residual per trainable tensor, kept between its rounds and
        checkpointed) and adds it to its next delta.
    """

    rounds: int = 25
    fraction: float = 1.0
    seed: int = 0
    eval_every: int = 1
    min_local_test: int = 20
    min_clients: int = 1
    clip_update_norm: float = 0.0
    fault_rate: float = 0.0
    fault_seed: int = 0
    fault_kinds: list[str] = field(default_factory=lambda: list(FAULT_KINDS))
    attack: str = "none"
    attack_clients: list[int] = field(default_factory=list)
    attack_scale: float = 1000.0
    upload_compression: str = "none"
    topk_fraction: float = 0.1
    error_feedback: bool = True


@dataclass
class StrategyConfig:
    """The aggregation strategy, its options, and the client-side statistics knobs.

    Parameters
    ----------
    name : str, default "fedalign"
        A registered strategy (:func:`strategy_names`): ``fedavg``, ``fedprox``, ``fedmoe``,
        ``fedalign``, ``fedadam``, ``fedyogi``.
    stats_max_examples : int, default 512
        Examples used for the routing-statistics pass.
    hidden_noise_std : float, default 0.0
        Gaussian noise (relative to each row's norm) added to ``mu_i(e)`` before upload.
        An obfuscation, not differential privacy (the noise scales with the data); see
        ``semantic_privacy``.
    semantic_privacy : str, default "none"
        What leaves a client for the semantic step (docs/privacy.md): ``none`` (the mean
        routed hidden states ``mu_i(e)``, shape ``(E, H)``), ``clip-noise`` (each row
        clipped to L2 norm ``semantic_clip``, then Gaussian noise of standard deviation
        ``semantic_noise_multiplier * semantic_clip`` added on the client) or
        ``public-probe`` (an empty ``(E, 0)`` tensor; the server computes semantic vectors
        from each client's uploaded router and experts on a probe set it holds).
    semantic_clip : float, default 1.0
        Absolute L2 norm bound ``C`` of each row of ``mu_i(e)`` (``clip-noise``).
    semantic_noise_multiplier : float, default 1.0
        ``sigma``: noise standard deviation ``sigma * C`` per coordinate (``clip-noise``).
    semantic_delta : float, default 1e-5
        ``delta`` of the per-round ``(epsilon, delta)`` reported for ``clip-noise``.
    probe_examples : int, default 256
        ``public-probe``: examples of the server's probe set, taken from the held-out test
        pool outside the global test set (never the examples of the reported accuracy).
    options : dict, default empty
        Values of the registered strategies' options that differ from their defaults, by
        field name (``proximal_mu``). Read any option as an attribute:
        ``config.strategy.proximal_mu``; see each strategy's options class for its keys.
    """

    name: str = "fedalign"
    stats_max_examples: int = 512
    hidden_noise_std: float = 0.0
    semantic_privacy: str = "none"
    semantic_clip: float = 1.0
    semantic_noise_multiplier: float = 1.0
    semantic_delta: float = 1e-5
    probe_examples: int = 256
    options: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # only called for names that are not dataclass fields: the strategies' options
        if name.startswith("__") or name == "options":
            raise AttributeError(name)
        merged = _option_fields()
        if name not in merged:
            raise AttributeError(f"no strategy option {name!r}")
        return self.__dict__.get("options", {}).get(name, merged[name][1])

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _BASE_STRATEGY_FIELDS or name not in _option_fields():
            object.__setattr__(self, name, value)
        else:
            self.options[name] = value

    def option_values(self) -> dict[str, Any]:
        """Every registered option with its value (set or default), flat."""
        return {name: getattr(self, name) for name in _option_fields()}

    def selected_options(self, name: str | None = None) -> Any:
        """The options object of strategy ``name`` (default: the selected one), validated.

        Raises
        ------
        ConfigError
            For an unknown strategy, or an option out of range (naming ``strategy.<key>``).
        """
        name = self.name if name is None else name
        if name not in _STRATEGY_OPTIONS:
            raise ConfigError(
                f"strategy.name must be one of {list(strategy_names())} (got {name!r})"
            )
        options = _STRATEGY_OPTIONS[name]
        values = {f.name: getattr(self, f.name) for f in fields(options)}
        try:
            return options(**values)
        except OptionError as error:
            key = f"strategy.{error.option.replace('_', '-')}"
            raise ConfigError(f"{key} {error.requirement} (got {error.value!r})") from error

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an unknown name or any registered option out of
        range (every strategy's, so a comparison that switches strategies fails early)."""
        self.selected_options()
        for name in strategy_names():
            self.selected_options(name)


_BASE_STRATEGY_FIELDS = (
    "name",
    "stats_max_examples",
    "hidden_noise_std",
    "semantic_privacy",
    "semantic_clip",
    "semantic_noise_multiplier",
    "semantic_delta",
    "probe_examples",
    "options",
)


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
    device : str, default "cpu"
        Where the model, every batch and the client-side statistics live: ``cpu``,
        ``cuda`` (the current GPU), ``cuda:N`` or ``auto`` (``cuda`` when a GPU is
        visible, else ``cpu``). Parameters and statistics returned to the server are CPU
        tensors: aggregation runs on the CPU whatever the device.
    precision : str, default "fp32"
        ``fp32``, ``bf16`` (bfloat16 autocast of forward passes; parameters, gradients and
        optimiser state stay float32) or ``auto`` (``bf16`` on a GPU that supports it,
        else ``fp32``).
    frozen_dtype : str, default "fp32"
        Storage of the parameters that do not train: ``fp32`` or ``bf16`` (halves the memory
        of a frozen base model, e.g. under ``model.trainable = lora``; needs bfloat16
        autocast, ``run.precision`` ``bf16`` or ``auto`` on a GPU). Trainable parameters,
        their gradients and optimiser state stay float32.
    deterministic : bool, default False
        ``torch.use_deterministic_algorithms(True, warn_only=True)`` and
        ``CUBLAS_WORKSPACE_CONFIG=:4096:8``: bitwise-repeatable GPU runs where torch has
        deterministic kernels (a warning names each op that has none).
    workers : int, default 1
        Simulator only: processes that train a round's clients in parallel (1 = in this
        process, one client after another). Each worker builds the model and prepares the
        data once, then trains the clients it is handed with ``max(1, threads // workers)``
        torch threads; results are aggregated in client order, bitwise equal to 1 worker
        at the same threads per process (see ``docs/flower.md``, "Parallel clients").
    """

    out: str = ""
    progress: bool = True
    threads: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    frozen_dtype: str = "fp32"
    deterministic: bool = False
    workers: int = 1


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
        """Raise :class:`ConfigError` naming the field and accepted values."""
        m, d, p, t, f, s = (
            self.model,
            self.data,
            self.partition,
            self.train,
            self.federated,
            self.strategy,
        )
        s.validate()
        _one_of("partition.method", p.method, PARTITION_METHODS)
        _one_of("model.trainable", m.trainable, TRAINABLE_CHOICES)
        _one_of("model.expert-init", m.expert_init, EXPERT_INITS)
        _one_of("model.gating", m.gating, GATINGS)
        _one_of("model.head", m.head, HEADS)
        if d.task == "multiple-choice" and m.head == "classification":
            raise ConfigError(
                f"model.head 'classification' cannot score the multiple-choice dataset "
                f"{d.dataset!r}; accepted: ['causal-lm', 'auto']"
            )
        if d.task == "classification" and m.head == "causal-lm":
            raise ConfigError(
                f"model.head 'causal-lm' needs a multiple-choice data.dataset "
                f"{list(MULTIPLE_CHOICE_DATASETS)} (got {d.dataset!r}); accepted for "
                "classification data: ['classification', 'auto']"
            )
        check_device_name(self.run.device)
        _one_of("run.precision", self.run.precision, PRECISIONS)
        _one_of("run.frozen-dtype", self.run.frozen_dtype, FROZEN_DTYPES)
        if self.run.frozen_dtype == "bf16" and self.run.precision == "fp32":
            raise ConfigError(
                "run.frozen-dtype 'bf16' needs bfloat16 autocast: run.precision must be one of "
                "['bf16', 'auto'] (got 'fp32')"
            )
        _one_of("model.lora-router", m.lora_router, LORA_ROUTER_CHOICES)
        _one_of("model.lora-aggregation", m.lora_aggregation, LORA_AGGREGATIONS)
        _one_of("model.quantize", m.quantize, QUANTIZE_CHOICES)
        _positive("model.lora-rank", m.lora_rank)
        if m.trainable != "lora":
            for key, value, default in (
                ("lora-experts", m.lora_experts, False),
                ("lora-router", m.lora_router, "full"),
                ("lora-aggregation", m.lora_aggregation, "factors"),
                ("quantize", m.quantize, "none"),
            ):
                if value != default:
                    raise ConfigError(
                        f"model.{key} = {value!r} needs model.trainable = 'lora' "
                        f"(got {m.trainable!r})"
                    )
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
        _positive("federated.min-clients", f.min_clients)
        if not f.clip_update_norm >= 0:
            raise ConfigError(
                f"federated.clip-update-norm must be >= 0 (0 = off; got {f.clip_update_norm})"
            )
        if not 0.0 <= f.fault_rate <= 1.0:
            raise ConfigError(f"federated.fault-rate must be in [0, 1] (got {f.fault_rate})")
        if not f.fault_kinds:
            raise ConfigError(
                f"federated.fault-kinds must name at least one of {list(FAULT_KINDS)}"
            )
        for kind in f.fault_kinds:
            _one_of("federated.fault-kinds", kind, FAULT_KINDS)
        _one_of("federated.attack", f.attack, ATTACKS)
        for client in f.attack_clients:
            if not 0 <= client < p.num_clients:
                raise ConfigError(
                    f"federated.attack-clients must hold client ids in [0, "
                    f"{p.num_clients - 1}] (partition.num-clients = {p.num_clients}; "
                    f"got {client})"
                )
        if f.attack != "none" and not f.attack_clients:
            raise ConfigError(
                f"federated.attack = {f.attack!r} needs federated.attack-clients (ids of the "
                "attacking clients; got [])"
            )
        if f.attack != "none" and f.upload_compression != "none":
            raise ConfigError(
                f"federated.attack = {f.attack!r} poisons full parameter uploads: it needs "
                f"federated.upload-compression = 'none' (got {f.upload_compression!r})"
            )
        if not math.isfinite(f.attack_scale):
            raise ConfigError(f"federated.attack-scale must be finite (got {f.attack_scale})")
        _one_of("federated.upload-compression", f.upload_compression, UPLOAD_COMPRESSIONS)
        if not 0.0 < f.topk_fraction <= 1.0:
            raise ConfigError(f"federated.topk-fraction must be in (0, 1] (got {f.topk_fraction})")
        try:
            codecs.lookup(d.encoding)
        except LookupError as error:
            raise ConfigError(
                f"data.encoding must be a Python codec name such as 'utf-8' or 'latin-1' "
                f"(got {d.encoding!r})"
            ) from error
        if s.hidden_noise_std < 0:
            raise ConfigError(f"strategy.hidden-noise-std must be >= 0 (got {s.hidden_noise_std})")
        _positive("strategy.stats-max-examples", s.stats_max_examples)
        _one_of("strategy.semantic-privacy", s.semantic_privacy, SEMANTIC_PRIVACY_MODES)
        if not (math.isfinite(s.semantic_clip) and s.semantic_clip > 0):
            raise ConfigError(f"strategy.semantic-clip must be > 0 (got {s.semantic_clip})")
        if not (math.isfinite(s.semantic_noise_multiplier) and s.semantic_noise_multiplier >= 0):
            raise ConfigError(
                "strategy.semantic-noise-multiplier must be >= 0 "
                f"(got {s.semantic_noise_multiplier})"
            )
        if not 0.0 < s.semantic_delta < 1.0:
            raise ConfigError(f"strategy.semantic-delta must be in (0, 1) (got {s.semantic_delta})")
        _positive("strategy.probe-examples", s.probe_examples)
        _positive("run.workers", self.run.workers)

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


def _one_of(name: str, value: str, accepted: Iterable[str]) -> None:
    accepted = tuple(accepted)
    if value not in accepted:
        raise ConfigError(f"{name} must be one of {list(accepted)} (got {value!r})")


def check_device_name(device: str) -> None:
    """Raise :class:`ConfigError` unless ``device`` is ``cpu``, ``auto``, ``cuda`` or
    ``cuda:N`` (whether that GPU exists is checked when the model is placed)."""
    if device in ("cpu", "auto", "cuda"):
        return
    index = device[5:] if device.startswith("cuda:") else ""
    if not (index.isdigit() and index.isascii()):
        raise ConfigError(f"run.device must be one of {list(DEVICE_NAMES)} (got {device!r})")


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
