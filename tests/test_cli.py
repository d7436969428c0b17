"""The command line: run, resume, subcommands and clear errors (compare: tests/experiments)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedalign.cli import build_parser, main, parse_strategy_list
from fedalign.records import read_jsonl
from tests.helpers import TINY_CLI as TINY


def test_help_lists_subcommands_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "run" in text and "compare" in text
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()  # type: ignore[union-attr]
    for option in ("--strategy", "--alpha", "--rounds", "--seed", "--out", "--set", "--resume"):
        assert option in help_text


def test_run_writes_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", *TINY, "--strategy", "fedprox", "--out", str(out)]) == 0
    assert "final accuracy" in capsys.readouterr().out
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    assert 'name = "fedprox"' in (out / "config.toml").read_text()
    # resume with more rounds continues the same folder
    assert main(["run", "--resume", str(out), "--rounds", "3"]) == 0
    assert [r["round"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_bad_input_exits_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *TINY, "--alpha", "0"]) == 2
    assert "partition.alpha" in capsys.readouterr().err
    assert main(["run", *TINY, "--strategy", "nope"]) == 2
    assert "strategy.name" in capsys.readouterr().err
    assert main(["run", *TINY, "--model", "tiny-nothing"]) == 2
    assert "model.name" in capsys.readouterr().err
    # a strategy option out of range: one error type, one line naming the key, exit 2
    assert main(["run", *TINY, "--strategy", "fedprox", "--set", "strategy.proximal-mu=-1"]) == 2
    err = capsys.readouterr().err
    assert "strategy.proximal-mu must be >= 0.0 (got -1.0)" in err and "Traceback" not in err
    assert main(["run", *TINY, "--set", "strategy.selection=top-half"]) == 2
    assert "strategy.selection must be one of ['hard', 'soft']" in capsys.readouterr().err


def test_run_help_lists_every_strategy_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for line in ("fedprox: proximal-mu=0.01", "fedmoe: fedmoe-u-min=0.01", "routing-form="):
        assert line in text


def test_strategy_list_parsing() -> None:
    assert parse_strategy_list("fedavg, fedalign:consistency") == [
        ("fedavg", "full"),
        ("fedalign", "consistency"),
    ]


def test_flower_worker_rejects_bad_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("flwr", reason="Flower is not installed")
    ca = tmp_path / "ca.crt"
    ca.write_text("not used")
    assert main(["flower-worker", "--insecure", "--root-certificates", str(ca)]) == 2
    assert "mutually exclusive" in capsys.readouterr().err
    assert main(["flower-worker", "--poll-interval", "0"]) == 2
    assert "--poll-interval must be > 0 (got 0.0)" in capsys.readouterr().err
