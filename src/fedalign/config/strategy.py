"""``[strategy]``: the registry of strategies' options, and the section that holds them.

``name``, the client-side statistics knobs and the options of every registered strategy
live flat in ``[strategy]`` (``strategy.proximal-mu``). This layer knows no strategy: each
strategy declares an options dataclass, and the package's composition root
(``fedalign/__init__.py``) registers it here with :func:`register_strategy`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from fedalign.config.checks import at_least_one, in_unit_interval, one_of
from fedalign.errors import ConfigError, OptionError

SEMANTIC_PRIVACY_MODES = ("none", "clip-noise", "public-probe")
"""What leaves a client for FedAlign-MoE's semantic step (``strategy.semantic-privacy``)."""

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


def default_variant(strategy_name: str) -> str:
    """The variant (``strategy.ablation``) that strategy ``strategy_name`` named alone runs:
    its options' ``ablation`` default, ``"full"`` for a strategy without variants."""
    options = _STRATEGY_OPTIONS.get(strategy_name)
    for item in fields(options) if options is not None else ():
        if item.name == "ablation":
            return str(_default(item))
    return "full"


def run_label(strategy_name: str, ablation: str | None = None) -> str:
    """The label of a run in tables, plots and folder names: what the strategy registered
    for the variant ``ablation`` (``strategy.ablation``, default :func:`default_variant`;
    FedAlign-MoE gives ``fedalign`` for its default row, ``fedalign-<ablation>`` for the
    others), else the strategy's name."""
    label = _RUN_LABELS.get(strategy_name)
    variant = default_variant(strategy_name) if ablation is None else ablation
    return strategy_name if label is None else label(variant)


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
        """Every registered option with its value (set or default), flat, as given: a value
        the selected strategy derives from others (a preset row's) is in its
        :meth:`selected_options`, not here."""
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
        """Raise :class:`ConfigError` for an unknown name, any registered option out of range
        (every strategy's, so a comparison that switches strategies fails early) or a
        statistics knob out of range."""
        self.selected_options()
        for name in strategy_names():
            self.selected_options(name)
        self._validate_statistics()

    def _validate_statistics(self) -> None:
        """The client-side statistics knobs (every strategy's clients compute them)."""
        if self.hidden_noise_std < 0:
            raise ConfigError(
                f"strategy.hidden-noise-std must be >= 0 (got {self.hidden_noise_std})"
            )
        at_least_one("strategy.stats-max-examples", self.stats_max_examples)
        one_of("strategy.semantic-privacy", self.semantic_privacy, SEMANTIC_PRIVACY_MODES)
        if not (math.isfinite(self.semantic_clip) and self.semantic_clip > 0):
            raise ConfigError(f"strategy.semantic-clip must be > 0 (got {self.semantic_clip})")
        multiplier = self.semantic_noise_multiplier
        if not (math.isfinite(multiplier) and multiplier >= 0):
            raise ConfigError(f"strategy.semantic-noise-multiplier must be >= 0 (got {multiplier})")
        in_unit_interval("strategy.semantic-delta", self.semantic_delta, "(0, 1)")
        at_least_one("strategy.probe-examples", self.probe_examples)


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
