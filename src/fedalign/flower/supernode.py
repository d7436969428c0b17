"""``flower-supernode`` with shorter waits: Flower's SuperNode, its two fixed sleeps made settable.

A Flower 1.41/1.42 SuperNode (``flwr.supernode.start_client_internal``) runs one loop: ask
the SuperLink for a message; when there is none, ``time.sleep(3)``; when there is one, wait
for the ClientApp's reply, looking every ``time.sleep(0.5)``, push it, and ask again. Both
waits are literals with no flag or setting. In a synchronous federation every node finishes
a round, asks once (nothing yet: the server is still waiting for the others and then
aggregating), and sleeps 3 s: the last node to reply picks up the next round's message
about 3 s after it replied, whatever the server does. That was most of the loopback
deployment's overhead over the simulator (``benchmarks/results/flower/profile-poll.md``).

:func:`run_supernode` (``fedalign flower-supernode``) runs Flower's own
``flower-supernode`` entry point (every flag of it is passed on) after
:func:`install_poll_intervals` has given the loop's module a ``time`` whose ``sleep(3)``
backs off from ``idle`` to ``idle_max`` seconds (doubling each time no message came; back
to ``idle`` once one did) and whose ``sleep(0.5)`` waits ``reply`` seconds; every other use
of ``time`` there is the real module. The back-off keeps a waiting node quick to answer
right after its reply, when the next round comes, and cheap later: each empty request
costs the SuperLink several milliseconds of CPU (measured at 0.1 s fixed: 0.23 cores of
the SuperLink and 0.1 per node for 3 idle nodes). Nothing else of Flower changes; the
SuperLink, the protocol and the other nodes cannot tell the difference. Before replacing
anything, :func:`check_flower_loop` verifies that the loop's source still holds exactly
the waits this module knows (one ``time.sleep(3)``, two ``time.sleep(0.5)``, ``time``
imported as a module); a Flower release that changes them stops :func:`run_supernode` with
a message instead of running with unknown waits, and ``tests/flower/test_supernode.py``
fails on it.

Usage (as ``flower-supernode``, plus two options)::

    fedalign flower-supernode --insecure --superlink 127.0.0.1:9092 --port 9094 \\
        --isolation process --node-config "partition-id=0 num-partitions=3" \\
        --idle-poll-interval 0.05 --idle-poll-max 0.5 --reply-poll-interval 0.02
"""

from __future__ import annotations

import inspect
import re
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from fedalign.flower.backoff import PullObjectsChanged, shorten_pull_backoff

FLOWER_IDLE_SLEEP = 3.0
"""Seconds Flower's SuperNode sleeps after asking the SuperLink and finding no message."""
FLOWER_REPLY_SLEEP = 0.5
"""Seconds between its looks for the ClientApp's reply (and for a reply object's content)."""
DEFAULT_IDLE_POLL_INTERVAL = 0.05
"""First wait (s) of a node that found no message at the SuperLink, here (Flower: 3)."""
DEFAULT_IDLE_POLL_MAX = 0.5
"""Longest such wait (s) here, reached by doubling."""
DEFAULT_REPLY_POLL_INTERVAL = 0.02
"""Seconds between looks for the reply here (a local state lookup; Flower: 0.5)."""
ACTIVITY_GAP = 0.25
"""An idle wait that starts more than this many seconds after the previous one ended
follows a message (an empty request returns within milliseconds): the back-off restarts."""

_EXPECTED_SLEEPS = {"3": 1, "0.5": 2}
"""``time.sleep(<literal>)`` calls in ``start_client_internal`` as of flwr 1.41 / 1.42."""


class FlowerLoopChanged(RuntimeError):
    """The installed Flower's SuperNode loop is not the one :class:`PollingTime` knows."""


class PollingTime:
    """A stand-in for the ``time`` module: ``sleep`` replaces Flower's two fixed waits.

    ``sleep(3)`` (no message at the SuperLink) waits ``idle`` seconds, then twice as long
    each further time up to ``idle_max``, and ``idle`` again after a message was handled
    (a ``sleep(0.5)`` since, or a gap of more than :data:`ACTIVITY_GAP` seconds between two
    idle waits). ``sleep(0.5)`` (the reply not ready yet) waits ``reply`` seconds. Any
    other ``sleep`` and every other attribute are ``clock``'s.

    Parameters
    ----------
    idle : float
    idle_max : float
        At least ``idle``.
    reply : float
    clock : module, default :mod:`time`
    """

    def __init__(
        self, idle: float, idle_max: float, reply: float, clock: ModuleType = time
    ) -> None:
        for name, value in (("idle", idle), ("idle_max", idle_max), ("reply", reply)):
            if not value > 0:
                raise ValueError(f"{name} poll interval must be > 0 (got {value})")
        if idle_max < idle:
            raise ValueError(f"idle_max ({idle_max}) must be >= idle ({idle})")
        self.idle = idle
        self.idle_max = idle_max
        self.reply = reply
        self._clock = clock
        self._next_idle = idle
        self._idle_ended = -float("inf")

    def sleep(self, seconds: float) -> None:
        """``clock.sleep``, with Flower's 3 s and 0.5 s replaced (see the class)."""
        if seconds == FLOWER_IDLE_SLEEP:
            if self._clock.monotonic() - self._idle_ended > ACTIVITY_GAP:
                self._next_idle = self.idle
            wait = self._next_idle
            self._next_idle = min(2 * wait, self.idle_max)
            self._clock.sleep(wait)
            self._idle_ended = self._clock.monotonic()
            return
        if seconds == FLOWER_REPLY_SLEEP:
            self._next_idle = self.idle  # a message is being handled
            seconds = self.reply
        self._clock.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clock, name)


def flower_loop_module() -> ModuleType:
    """``flwr.supernode.start_client_internal`` (the SuperNode's main loop)."""
    from flwr.supernode import start_client_internal

    return start_client_internal


def check_flower_loop(module: ModuleType | None = None) -> None:
    """Raise :class:`FlowerLoopChanged` unless the loop's waits are the ones this module replaces.

    Checked: ``module.time`` is the :mod:`time` module (or a :class:`PollingTime` already
    installed) and the module's source calls ``time.sleep`` with exactly the literals of
    flwr 1.41/1.42 (one ``3``, two ``0.5``) and nothing else.
    """
    module = module or flower_loop_module()
    clock = getattr(module, "time", None)
    if clock is not time and not isinstance(clock, PollingTime):
        raise FlowerLoopChanged(
            f"{module.__name__} no longer imports `time` as a module: its waits are unknown"
        )
    source = inspect.getsource(module)
    calls = re.findall(r"\btime\.sleep\(([^)]*)\)", source)
    found: dict[str, int] = {}
    for argument in calls:
        found[argument.strip()] = found.get(argument.strip(), 0) + 1
    if found != _EXPECTED_SLEEPS:
        raise FlowerLoopChanged(
            f"{module.__name__} calls time.sleep with {found}, expected {_EXPECTED_SLEEPS} "
            "(flwr 1.41/1.42): this Flower's SuperNode loop changed; run plain "
            "`flower-supernode` or update fedalign.flower.supernode"
        )


def install_poll_intervals(
    idle: float = DEFAULT_IDLE_POLL_INTERVAL,
    idle_max: float = DEFAULT_IDLE_POLL_MAX,
    reply: float = DEFAULT_REPLY_POLL_INTERVAL,
    module: ModuleType | None = None,
) -> PollingTime:
    """Check the loop (:func:`check_flower_loop`), then give it a :class:`PollingTime`
    and a ``pull_objects`` that asks again for a missing object after 0.02 s instead of
    1 s (:func:`fedalign.flower.backoff.shorten_pull_backoff`: the node now sees a message
    while the ServerApp is still uploading its objects).

    Affects this process only. Returns the installed stand-in.
    """
    module = module or flower_loop_module()
    check_flower_loop(module)
    try:
        shorten_pull_backoff(module)
    except PullObjectsChanged as error:
        raise FlowerLoopChanged(str(error)) from None
    clock = PollingTime(idle, idle_max, reply)
    module.time = clock  # type: ignore[attr-defined]
    return clock


def run_supernode(
    flower_args: Sequence[str],
    *,
    idle: float = DEFAULT_IDLE_POLL_INTERVAL,
    idle_max: float = DEFAULT_IDLE_POLL_MAX,
    reply: float = DEFAULT_REPLY_POLL_INTERVAL,
) -> None:
    """Flower's ``flower-supernode`` with ``flower_args``, its waits set by
    :func:`install_poll_intervals` first (returns when the SuperNode stops).

    Raises
    ------
    FlowerLoopChanged
        When the installed Flower's loop is not the one this module knows.
    """
    install_poll_intervals(idle, idle_max, reply)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]  # Flower parses sys.argv itself
    flower_supernode()
