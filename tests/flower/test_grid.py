""":class:`fedalign.flower.grid.PolledGrid`: Flower's push / pull calls, asked every
``poll_interval`` seconds, everything else the wrapped Grid's. No process is started."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedalign[flower]')")

from fedalign.flower import grid as grid_module
from fedalign.flower.grid import PolledGrid

pytestmark = pytest.mark.flower


class ScriptedGrid:
    """Pushing returns ids; pull number i returns the replies scripted for it."""

    def __init__(self, ids: list[str | None], script: list[list[str]]) -> None:
        self.ids = ids
        self.script = script
        self.pulls: list[set[str]] = []
        self.pushed: list[Any] = []

    def push_messages(self, messages: Iterable[Any]) -> list[str | None]:
        self.pushed.extend(messages)
        return self.ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        self.pulls.append(set(message_ids))
        answered = self.script.pop(0) if self.script else []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in answered]

    def get_node_ids(self) -> list[int]:
        return [7, 8]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(grid_module.time, "sleep", slept.append)
    return slept


def test_polls_every_interval_until_every_reply_is_in(sleeps: list[float]) -> None:
    inner = ScriptedGrid(["a", "b", "c"], [[], ["b"], [], ["a", "c"]])
    polled = PolledGrid(inner, poll_interval=0.1)  # type: ignore[arg-type]
    replies = list(polled.send_and_receive(["m1", "m2", "m3"], timeout=60))  # type: ignore[list-item]
    assert [r.metadata.reply_to_message_id for r in replies] == ["b", "a", "c"]
    assert inner.pushed == ["m1", "m2", "m3"]
    assert inner.pulls == [{"a", "b", "c"}, {"a", "b", "c"}, {"a", "c"}, {"a", "c"}]
    assert sleeps == [0.1, 0.1, 0.1]


def test_gives_up_at_the_timeout(sleeps: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.0, 0.5, 1.5])  # deadline 1.0: the third look is past it
    monkeypatch.setattr(grid_module.time, "monotonic", lambda: next(clock))
    inner = ScriptedGrid(["a", "b"], [["a"]])
    polled = PolledGrid(inner, poll_interval=0.25)  # type: ignore[arg-type]
    replies = list(polled.send_and_receive(["m1", "m2"], timeout=1.0))  # type: ignore[list-item]
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert len(inner.pulls) == 3 and sleeps == [0.25, 0.25]


def test_nothing_pushed_nothing_awaited(sleeps: list[float]) -> None:
    inner = ScriptedGrid([None], [])  # a message Flower could not push: no id
    polled = PolledGrid(inner)  # type: ignore[arg-type]
    assert list(polled.send_and_receive(["m"], timeout=5)) == []  # type: ignore[list-item]
    assert inner.pulls == [] and sleeps == []


def test_delegates_the_rest_and_checks_the_interval() -> None:
    inner = ScriptedGrid([], [])
    assert list(PolledGrid(inner).get_node_ids()) == [7, 8]  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PolledGrid(inner, poll_interval=0)  # type: ignore[arg-type]


# ------------------------------------------------------------- the options that set them
def test_run_config_options_of_the_waits() -> None:
    from fedalign.config import ConfigError
    from fedalign.flower.messages import config_from_run_config

    _, options = config_from_run_config(
        {"flower.poll-interval": 0.25, "flower.overlap-evaluation": "false"}
    )
    assert options.poll_interval == 0.25 and options.overlap_evaluation is False
    _, defaults = config_from_run_config({})
    assert defaults.poll_interval == 0.1 and defaults.overlap_evaluation is True
    with pytest.raises(ConfigError, match="> 0"):
        config_from_run_config({"flower.poll-interval": 0})


# -------------------------------------------------------- the worker's task polling
def test_worker_backs_off_while_idle_and_not_after_a_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fedalign flower-worker`` asks for a task after 0.05 s, doubling to the maximum,
    and quickly again after a task."""
    import threading

    from fedalign.flower import worker

    answers = [False] * 5 + [True] + [False] * 3  # a task after five empty asks
    waits: list[float] = []

    class Stop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(float(timeout or 0))
            if not answers:
                self.set()
            return self.is_set()

    class FakeClient:
        def AcquireTask(self, request: Any) -> Any:
            task = answers.pop(0) if answers else False
            return SimpleNamespace(
                HasField=lambda name, task=task: task,
                token="t" if task else "",
                task=SimpleNamespace(type=worker.TaskType.CLIENT_APP.value, task_id=1, run_id=2),
            )

        def close(self) -> None:
            pass

    ran: list[int] = []
    monkeypatch.setattr(worker, "_client", lambda *args, **kwargs: FakeClient())
    monkeypatch.setattr(
        worker,
        "run_task",
        lambda *args, task_id, run_id, **kwargs: (
            ran.append(task_id) or worker.TaskOutcome(task_id, run_id, "train", 0.0, True)
        ),
    )
    worker.serve_clientapp_tasks(
        "127.0.0.1:1", poll_interval=0.05, max_poll_interval=0.3, stop=Stop()
    )
    assert ran == [1]
    assert waits == [0.05, 0.1, 0.2, 0.3, 0.3, 0.05, 0.1, 0.2]
