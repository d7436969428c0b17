"""A real loopback deployment with warm ClientApps: ``flower-superlink``, two
``flower-supernode --isolation process`` and a ``fedalign flower-worker`` each, then
``flwr run``. The final model must be bitwise the in-process simulator's, and each worker
must have built its model once for all its messages.

Starts five long-lived processes and takes about 1.5 min on a quiet 2-core machine (several
minutes on a busy one), so it runs only with ``FEDALIGN_DEPLOYMENT_TESTS=1``; every process
is stopped by process group id, also on failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedalign[flower]')")

from fedalign.experiments.run import run_experiment
from fedalign.flower.loopback import LoopbackDeployment, run_config_argument
from tests.helpers import tiny_config

pytestmark = [
    pytest.mark.flower,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("FEDALIGN_DEPLOYMENT_TESTS") != "1",
        reason="starts a SuperLink and SuperNodes (minutes): set FEDALIGN_DEPLOYMENT_TESTS=1",
    ),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("tls", [False, True])
def test_warm_loopback_deployment_equals_the_simulator(tmp_path: Path, tls: bool) -> None:
    config = tiny_config(partition__num_clients=2, run__threads=1, strategy__name="fedalign")
    run_experiment(config.copy(), tmp_path / "sim", log=None)
    out = tmp_path / "flower"
    with LoopbackDeployment(tmp_path / "deploy", 2, warm=True, tls=tls) as deployment:
        done = deployment.run(REPO, run_config_argument(config, out, REPO), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    simulated = (tmp_path / "sim" / "final_state.safetensors").read_bytes()
    assert (out / "final_state.safetensors").read_bytes() == simulated
    for worker in (0, 1):
        log = (tmp_path / "deploy" / f"worker-{worker}.log").read_text()
        assert log.count("built the model") == 1, log[-2000:]
        assert log.count("train): done") == config.federated.rounds, log[-2000:]
