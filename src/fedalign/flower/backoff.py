"""Shorter retry waits for Flower's object pulls, in a module that calls ``pull_objects``.

Flower moves a message as a head plus objects: the sender registers the message, then
uploads its objects; a receiver that sees the message pulls each object and, when one is
not there yet, waits 1 s before asking again (then 2 s, 4 s, ... up to 10 s:
``flwr.supercore.inflatable.inflatable_utils.pull_objects``, its ``initial_backoff`` and
``backoff_cap`` parameters). A receiver that asks for messages often (the SuperNode of
``fedalign flower-supernode``, the ServerApp's :class:`~fedalign.flower.grid.PolledGrid`)
usually sees a message while its objects are still on their way, and then lost about a
second a message. Flower's callers (the SuperNode loop, ``HttpGrid.pull_messages``) pass no
backoff, so :func:`shorten_pull_backoff` gives such a module a ``pull_objects`` with
``initial_backoff`` and ``backoff_cap`` preset: the same function, the same retries, shorter
waits. :func:`check_pull_objects` first verifies that the module's ``pull_objects`` is
Flower's function with those two keyword parameters (flwr 1.41 / 1.42);
``tests/flower/test_supernode.py`` fails when a Flower release changes that.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

INITIAL_BACKOFF = 0.02
"""First wait (s) before asking again for an object that is not there yet (Flower: 1)."""
BACKOFF_CAP = 0.2
"""Longest such wait (s) (Flower: 10)."""

_MARK = "_fedalign_backoff"


class PullObjectsChanged(RuntimeError):
    """A module's ``pull_objects`` is not the Flower function this module knows."""


def check_pull_objects(module: ModuleType) -> Callable[..., Any]:
    """Flower's ``pull_objects`` as ``module`` uses it (unwrapped if shortened already).

    Raises
    ------
    PullObjectsChanged
        When ``module.pull_objects`` is not ``inflatable_utils.pull_objects`` or lacks
        the keyword parameters ``initial_backoff`` and ``backoff_cap``.
    """
    from flwr.supercore.inflatable import inflatable_utils

    current = getattr(module, "pull_objects", None)
    original = getattr(current, _MARK, current)
    if original is not inflatable_utils.pull_objects:
        raise PullObjectsChanged(
            f"{module.__name__}.pull_objects is not flwr's inflatable_utils.pull_objects"
        )
    parameters = inspect.signature(original).parameters
    for name in ("initial_backoff", "backoff_cap"):
        if name not in parameters or parameters[name].kind != inspect.Parameter.KEYWORD_ONLY:
            raise PullObjectsChanged(f"flwr's pull_objects has no keyword parameter {name!r}")
    return original


def shorten_pull_backoff(
    module: ModuleType, initial: float = INITIAL_BACKOFF, cap: float = BACKOFF_CAP
) -> None:
    """Give ``module`` a ``pull_objects`` that waits ``initial`` s (doubling up to ``cap``)
    before asking again for a missing object; this process only.

    Raises
    ------
    PullObjectsChanged
        See :func:`check_pull_objects`.
    ValueError
        Unless ``0 < initial <= cap``.
    """
    if not 0 < initial <= cap:
        raise ValueError(f"need 0 < initial <= cap (got {initial}, {cap})")
    original = check_pull_objects(module)
    shortened = functools.partial(original, initial_backoff=initial, backoff_cap=cap)
    setattr(shortened, _MARK, original)
    module.pull_objects = shortened  # type: ignore[attr-defined]
