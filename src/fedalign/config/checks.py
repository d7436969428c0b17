"""Small checks every section's ``validate`` uses; each raises :class:`ConfigError` whose
message names the key (``section.key``), what was found and what is accepted."""

from __future__ import annotations

from collections.abc import Iterable

from fedalign.errors import ConfigError

UNIT_INTERVALS = ("[0, 1]", "[0, 1)", "(0, 1]", "(0, 1)")
"""Intervals :func:`in_unit_interval` accepts, written as in its messages."""


def one_of(name: str, value: str, accepted: Iterable[str]) -> None:
    """``value`` is one of ``accepted``."""
    accepted = tuple(accepted)
    if value not in accepted:
        raise ConfigError(f"{name} must be one of {list(accepted)} (got {value!r})")


def at_least_one(name: str, value: int) -> None:
    """``value >= 1``."""
    if value < 1:
        raise ConfigError(f"{name} must be >= 1 (got {value})")


def in_unit_interval(name: str, value: float, interval: str) -> None:
    """``value`` lies in ``interval``, one of :data:`UNIT_INTERVALS` (a bracket closes its
    end, a parenthesis opens it; NaN lies in none)."""
    if interval not in UNIT_INTERVALS:
        raise ValueError(f"interval must be one of {list(UNIT_INTERVALS)} (got {interval!r})")
    above = value >= 0.0 if interval[0] == "[" else value > 0.0
    below = value <= 1.0 if interval[-1] == "]" else value < 1.0
    if not (above and below):
        raise ConfigError(f"{name} must be in {interval} (got {value})")
