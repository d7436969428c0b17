"""Run folders are never replaced silently; checkpoints resume only with their config."""

from __future__ import annotations

from pathlib import Path

import pytest

import fedalign
from fedalign.cli import main
from fedalign.errors import RunFolderError
from fedalign.experiments import run_comparison
from fedalign.experiments.run import Simulation
from fedalign.records import (
    RunFolder,
    check_resumable,
    claim_run_folder,
    config_fingerprint,
    read_jsonl,
)
from tests.helpers import tiny_config
from tests.test_cli import TINY

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_claim_refuses_a_folder_that_holds_a_run(tmp_path: Path) -> None:
    claim_run_folder(tmp_path / "missing")
    claim_run_folder(tmp_path)  # empty folder
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(RunFolderError, match=r"metrics\.jsonl found.*--resume.*--overwrite"):
        claim_run_folder(tmp_path)
    claim_run_folder(tmp_path, resume=True)
    claim_run_folder(tmp_path, overwrite=True)
    with pytest.raises(RunFolderError, match="not both"):
        claim_run_folder(tmp_path, resume=True, overwrite=True)


def test_fingerprint_ignores_run_section_and_rounds() -> None:
    base = tiny_config()
    other = tiny_config(federated__rounds=9, run__out="elsewhere", run__threads=1)
    assert config_fingerprint(base) == config_fingerprint(other)
    assert config_fingerprint(base) != config_fingerprint(tiny_config(train__lr=0.5))
    # what changes the numbers does count: a bf16 run is another run
    assert config_fingerprint(base) == config_fingerprint(tiny_config(run__precision="fp32"))
    assert config_fingerprint(base) != config_fingerprint(tiny_config(run__precision="bf16"))
    assert config_fingerprint(base) != config_fingerprint(tiny_config(run__frozen_dtype="bf16"))


def test_a_checkpoint_resumes_only_at_its_precision(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path, "fedalign")
    folder.config = tiny_config()
    folder.save_checkpoint({"round": 1})
    payload = folder.recorder.load_checkpoint()
    assert payload is not None
    check_resumable(payload, tiny_config(run__threads=1), tmp_path)
    with pytest.raises(RunFolderError, match=r"run\.precision"):
        check_resumable(payload, tiny_config(run__precision="bf16"), tmp_path)


def test_checkpoint_records_version_and_config(tmp_path: Path) -> None:
    config = tiny_config()
    folder = RunFolder(tmp_path, "fedalign")
    folder.config = config
    folder.save_checkpoint({"round": 1})
    payload = folder.recorder.load_checkpoint()
    assert payload is not None
    assert payload["fedalign_version"] == fedalign.__version__
    assert payload["config_fingerprint"] == config_fingerprint(config)
    check_resumable(payload, tiny_config(federated__rounds=7), tmp_path)
    with pytest.raises(RunFolderError, match=r"train\.lr: checkpoint 0\.001, now 0\.5"):
        check_resumable(payload, tiny_config(train__lr=0.5), tmp_path)
    with pytest.raises(RunFolderError, match=r"fedalign 0\.0\.1, incompatible"):
        check_resumable({**payload, "fedalign_version": "0.0.1"}, config, tmp_path)
    patch = {**payload, "fedalign_version": fedalign.__version__ + ".dev3"}
    check_resumable(patch, config, tmp_path)  # same major.minor
    del payload["fedalign_version"]
    with pytest.raises(RunFolderError, match="records no fedalign version"):
        check_resumable(payload, config, tmp_path)


def test_simulation_refuses_resumes_and_overwrites(tmp_path: Path) -> None:
    config = tiny_config(federated__rounds=1)
    first = Simulation(config.copy(), tmp_path / "run", log=None)
    first.run_round(1)
    with pytest.raises(RunFolderError, match="already holds a run"):
        Simulation(config.copy(), tmp_path / "run", log=None)
    with pytest.raises(RunFolderError, match=r"train\.lr"):
        Simulation(tiny_config(federated__rounds=1, train__lr=0.5), tmp_path / "run", resume=True)
    resumed = Simulation(config.copy(), tmp_path / "run", resume=True, log=None)
    assert resumed.completed_rounds == 1
    fresh = Simulation(config.copy(), tmp_path / "run", overwrite=True, log=None)
    assert fresh.completed_rounds == 0
    assert not (tmp_path / "run" / "checkpoint").exists()
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == []


@pytest.mark.slow
def test_cli_run_out_needs_resume_or_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["run", *TINY, "--strategy", "fedavg", "--out", str(out)]
    assert main([*args, "--rounds", "1"]) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    # --out DIR --resume: the command line's config must fit the checkpoint
    assert main([*args, "--resume", "--lr", "0.5"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert [r["round"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert main(["run", "--resume", str(out), "--set", "train.lr=0.5"]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--rounds", "1"]) == 0
    assert [r["round"] for r in read_jsonl(out / "metrics.jsonl")] == [1]


def test_compare_refuses_a_folder_with_a_comparison(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    (out / "fedavg").mkdir(parents=True)
    (out / "fedavg" / "config.toml").write_text("")
    config = tiny_config(federated__rounds=1)
    with pytest.raises(RunFolderError, match="already holds a comparison"):
        run_comparison(config, [("fedavg", "full")], out)


def test_torn_last_jsonl_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}\n{"rou')
    assert read_jsonl(path) == [{"round": 1}, {"round": 2}]
    path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')
    with pytest.raises(ValueError):
        read_jsonl(path)


def test_flower_overwrite_option() -> None:
    pytest.importorskip("flwr")
    from fedalign.config import ConfigError
    from fedalign.flower.messages import config_from_run_config

    assert config_from_run_config({"flower.overwrite": "true"})[1].overwrite is True
    assert config_from_run_config({"flower.overwrite": False})[1].overwrite is False
    with pytest.raises(ConfigError, match=r"flower\.overwrite"):
        config_from_run_config({"flower.overwrite": "maybe"})
