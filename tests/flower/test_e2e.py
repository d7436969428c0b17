"""End to end: ``flwr run .`` from the repository root, as docs/flower.md says.

A 2-round FedAlign-MoE simulation with 3 SuperNodes on the tiny upcycled model: the run
must finish, write the run folder of ``fedalign run`` and change the global model.

``FLWR_HOME`` is a temporary folder and ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``
(otherwise ``flwr run`` would ``uv sync`` the project). The local SuperLink that ``flwr run``
starts listens on free ports (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` /
``FLWR_LOCAL_CONTROL_API_PORT``) and keeps running after the run: the test stops it, and
every process under it, by process id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedalign[flower]')")
psutil = pytest.importorskip("psutil")

pytestmark = [pytest.mark.flower, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RUN_CONFIG = {
    "model.name": "'tiny-upcycled'",
    "model.max-length": "24",
    "data.max-train-examples": "300",
    "data.max-test-examples": "80",
    "partition.alpha": "0.5",
    "partition.min-client-size": "10",
    "train.local-steps": "2",
    "train.batch-size": "8",
    "train.lr": "0.001",
    "federated.rounds": "2",
    "strategy.name": "'fedalign'",
    "strategy.stats-max-examples": "32",
    # one torch thread in every process: float reductions split by the thread count, and
    # the in-process run below must not inherit a count an earlier test left behind
    "run.threads": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def superlinks_on(port: int) -> list[psutil.Process]:
    """The ``flower-superlink`` processes listening on ``port`` (ours: the port is fresh)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if any("flower-superlink" in part for part in cmdline) and str(port) in cmdline:
            found.append(process)
    return found


def stop(processes: list[psutil.Process]) -> None:
    """SIGTERM each process and its descendants by pid, then SIGKILL what is left."""
    tree: dict[int, psutil.Process] = {}
    for process in processes:
        try:
            tree[process.pid] = process
            for child in process.children(recursive=True):
                tree[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    for process in tree.values():
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(list(tree.values()), timeout=15)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=5)


def initial_global_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    """The global model before round 1, rebuilt from the run's config.toml (seeded)."""
    from fedalign.config import ExperimentConfig
    from fedalign.data import build_federated_data
    from fedalign.models import load_moe_model

    config = ExperimentConfig.from_toml(run_dir / "config.toml")
    federated = build_federated_data(config.data, config.partition, config.federated.seed)
    model = load_moe_model(
        config.model, num_labels=federated.splits.train.num_classes, seed=config.federated.seed
    )
    return model.trainable_state()


def test_flwr_run_simulation_with_three_supernodes(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    flwr = bin_dir / "flwr"
    if not flwr.exists():
        flwr = Path(shutil.which("flwr") or "flwr")
    run_dir = tmp_path / "run"
    http_port, control_port = free_port(), free_port()
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(tmp_path / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    overrides = " ".join(f"{k}={v}" for k, v in RUN_CONFIG.items())
    overrides += f" run.out='{run_dir}'"
    command = [
        str(flwr),
        "run",
        ".",
        "--stream",
        "--federation-config",
        "num-supernodes=3",
        "--run-config",
        overrides,
    ]
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        output = ""
    finally:
        ours = [psutil.Process(process.pid)] if process.poll() is None else []
        stop(ours + superlinks_on(http_port))
        process.wait(timeout=30)
    seconds = time.perf_counter() - started
    log_file = tmp_path / "flwr-home" / "local-superlink" / "superlink.log"
    superlink_log = log_file.read_text()[-4000:] if log_file.exists() else ""
    assert process.returncode == 0, f"flwr run failed:\n{output[-6000:]}\n{superlink_log}"
    assert not superlinks_on(http_port), "the local SuperLink is still running"

    # the run folder of `fedalign run`
    for name in (
        "config.toml",
        "metrics.jsonl",
        "decisions.jsonl",
        "routing.jsonl",
        "summary.json",
        "provenance.json",
        "final_state.safetensors",
        "partition.json",
        "layout.json",
        "convergence.png",
    ):
        assert (run_dir / name).exists(), f"{name} missing after {seconds:.0f}s:\n{output[-4000:]}"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(m["clients"] == [0, 1, 2] and m["failed_clients"] == [] for m in metrics)
    assert all(m["global_accuracy"] is not None for m in metrics)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["strategy"] == "fedalign"
    assert summary["provenance"]["transport"] == "flower"  # the ServerApp's machine
    assert "partition.num-clients is 10 in the run config" in output  # adopted 3 partitions

    # the global model changed
    from safetensors.torch import load_file

    final = load_file(str(run_dir / "final_state.safetensors"))
    initial = initial_global_parameters(run_dir)
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k]) for k in final)

    # `fedalign run` in this process, same config: bitwise the same final global model
    from fedalign.config import ExperimentConfig
    from fedalign.experiments import run_experiment

    config = ExperimentConfig.from_toml(run_dir / "config.toml")
    config.run.out = ""
    previous = torch.get_num_threads()
    try:
        run_experiment(config, tmp_path / "in-process", log=None)
    finally:
        torch.set_num_threads(previous)
    simulated = load_file(str(tmp_path / "in-process" / "final_state.safetensors"))
    assert simulated.keys() == final.keys()
    assert all(torch.equal(simulated[k], final[k]) for k in final)
    print(f"flwr run (simulation, 3 SuperNodes, 2 rounds): {seconds:.1f}s")
