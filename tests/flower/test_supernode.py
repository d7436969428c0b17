"""``fedalign flower-supernode`` and the shortened object-pull backoff: they replace waits
inside Flower's SuperNode loop and deployment Grid, so these tests fail as soon as a Flower
release changes what is replaced (the waits' literals, ``time`` as a module, the
``pull_objects`` function and its keyword parameters). No process is started."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedalign[flower]')")

from flwr.supercore.inflatable import inflatable_utils
from flwr.superlink.grid import http_grid
from flwr.supernode import start_client_internal

from fedalign.cli import build_parser
from fedalign.flower import backoff, supernode
from fedalign.flower.grid import quicker_reply_pulls

pytestmark = pytest.mark.flower


@pytest.fixture
def restore_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test installs into Flower's modules is undone afterwards."""
    for module in (start_client_internal, http_grid):
        monkeypatch.setattr(module, "pull_objects", module.pull_objects)
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)


class FakeClock:
    """``time`` stand-in: ``sleep`` advances ``now`` and is recorded."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now


def module_from_source(tmp_path: Path, name: str, source: str) -> ModuleType:
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------ what is replaced is still there
def test_installed_flower_loop_has_the_known_waits() -> None:
    supernode.check_flower_loop()  # raises FlowerLoopChanged otherwise
    assert start_client_internal.time is time


def test_installed_flower_pull_objects_takes_the_backoff_keywords() -> None:
    for module in (start_client_internal, http_grid):
        assert backoff.check_pull_objects(module) is inflatable_utils.pull_objects


def test_a_changed_loop_is_refused(tmp_path: Path) -> None:
    changed = module_from_source(
        tmp_path,
        "changed_loop",
        "import time\n\ndef loop():\n    time.sleep(1)\n    time.sleep(0.5)\n",
    )
    with pytest.raises(supernode.FlowerLoopChanged, match="expected"):
        supernode.check_flower_loop(changed)
    no_module = module_from_source(
        tmp_path, "no_time_module", "from time import sleep\n\ndef loop():\n    sleep(3)\n"
    )
    with pytest.raises(supernode.FlowerLoopChanged, match="as a module"):
        supernode.check_flower_loop(no_module)


def test_a_foreign_pull_objects_is_refused(tmp_path: Path) -> None:
    other = module_from_source(tmp_path, "other_pull", "def pull_objects(ids, fn):\n    pass\n")
    with pytest.raises(backoff.PullObjectsChanged):
        backoff.shorten_pull_backoff(other)


# ------------------------------------------------------------------------ behaviour
def test_polling_time_maps_the_two_waits_and_backs_off() -> None:
    clock = FakeClock()
    polling = supernode.PollingTime(0.05, 0.4, 0.02, clock=clock)  # type: ignore[arg-type]
    for _ in range(5):  # consecutive idle waits: no message in between
        polling.sleep(3)
    assert clock.slept == [0.05, 0.1, 0.2, 0.4, 0.4]
    polling.sleep(0.5)  # a message is being handled: the reply wait, and a fresh back-off
    polling.sleep(3)
    assert clock.slept[5:] == [0.02, 0.05]
    clock.now += 1.0  # a long gap between idle waits also means a message was handled
    polling.sleep(3)
    assert clock.slept[7:] == [0.05]
    polling.sleep(1.25)  # any other wait is unchanged
    assert clock.slept[-1] == 1.25
    assert polling.monotonic() == clock.now  # everything else is the clock's


@pytest.mark.parametrize("idle, idle_max, reply", [(0, 1, 1), (1, 0.5, 1), (1, 1, -1)])
def test_polling_time_rejects_bad_intervals(idle: float, idle_max: float, reply: float) -> None:
    with pytest.raises(ValueError):
        supernode.PollingTime(idle, idle_max, reply)


def test_install_replaces_only_the_loop_module_waits(restore_flower: None) -> None:
    clock = supernode.install_poll_intervals(0.05, 0.5, 0.02)
    assert start_client_internal.time is clock
    assert time.sleep is not clock.sleep  # the real module is untouched
    shortened = start_client_internal.pull_objects
    assert shortened.func is inflatable_utils.pull_objects  # type: ignore[attr-defined]
    assert shortened.keywords == {  # type: ignore[attr-defined]
        "initial_backoff": backoff.INITIAL_BACKOFF,
        "backoff_cap": backoff.BACKOFF_CAP,
    }
    supernode.install_poll_intervals(0.05, 0.5, 0.02)  # again: wraps Flower's, not ours
    assert start_client_internal.pull_objects.func is inflatable_utils.pull_objects  # type: ignore[attr-defined]


def test_shortened_pull_retries_a_missing_object_quickly(restore_flower: None) -> None:
    backoff.shorten_pull_backoff(http_grid, initial=0.01, cap=0.02)
    calls = {"a": 0}

    def pull(object_id: str) -> bytes:
        calls[object_id] += 1
        if calls[object_id] < 4:
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return b"content"

    started = time.monotonic()
    assert http_grid.pull_objects(["a"], pull) == {"a": b"content"}
    assert calls["a"] == 4
    assert time.monotonic() - started < 0.5  # Flower's own backoff: 1 + 2 + 4 s


def test_reply_pulls_of_the_server_grid_are_shortened(restore_flower: None) -> None:
    assert quicker_reply_pulls()
    assert http_grid.pull_objects.func is inflatable_utils.pull_objects  # type: ignore[attr-defined]


def test_cli_passes_flower_options_through_in_order() -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(
        [
            "flower-supernode",
            "--insecure",
            "--superlink",
            "127.0.0.1:9092",
            "--idle-poll-max",
            "1.0",
            "--node-config",
            "partition-id=0 num-partitions=3",
        ]
    )
    assert args.command == "flower-supernode"
    assert args.idle_poll_max == 1.0 and args.idle_poll_interval == 0.05
    assert rest == [
        "--insecure",
        "--superlink",
        "127.0.0.1:9092",
        "--node-config",
        "partition-id=0 num-partitions=3",
    ]


def test_other_commands_still_refuse_unknown_options(capsys: pytest.CaptureFixture[str]) -> None:
    from fedalign.cli import main

    with pytest.raises(SystemExit):
        main(["flower-worker", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
