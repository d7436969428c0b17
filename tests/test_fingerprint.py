"""Behaviour fingerprint: fixed tiny runs give bitwise-identical final states and decisions.

The digests below were recorded on the code *before* the layered redesign (issue 9) and
must not change when code only moves: any refactoring that alters a single bit of a final
state or a decision record fails here. A deliberate change of numerics (a new default, a
fixed bug) updates the digests in the same commit and says why.

Each case pins every option it depends on, so later changes of defaults do not move it.
Run ``python tests/test_fingerprint.py`` to print the current digests.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from fedalign.config import ExperimentConfig
from fedalign.records import read_jsonl

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# The options every case shares: a tiny upcycled encoder on WordNet glosses.
BASE = {
    "model.name": "tiny-upcycled",
    "model.expert-init": "copy",
    "model.max-length": 24,
    "model.load-balance-coef": 0.0,
    "model.router-noise-std": 0.02,
    "model.cache-prefix": True,
    "model.trainable": "moe+head",
    "data.max-train-examples": 240,
    "data.max-test-examples": 80,
    "partition.method": "dirichlet",
    "partition.num-clients": 3,
    "partition.alpha": 0.5,
    "partition.min-client-size": 10,
    "federated.rounds": 2,
    "federated.fraction": 1.0,
    "federated.seed": 0,
    "train.local-steps": 3,
    "train.batch-size": 8,
    "train.lr": 1e-3,
    "train.weight-decay": 0.0,
    "train.grad-clip": 1.0,
    "strategy.stats-max-examples": 32,
    "strategy.hidden-noise-std": 0.0,
    "run.progress": False,
}

CASES: dict[str, dict[str, object]] = {
    "fedavg": {"strategy.name": "fedavg"},
    "fedprox": {"strategy.name": "fedprox", "strategy.proximal-mu": 0.1},
    "fedmoe": {"strategy.name": "fedmoe", "strategy.fedmoe-u-min": 0.01},
    "fedadam": {"strategy.name": "fedadam", "strategy.server-lr": 0.01},
    "fedalign": {
        "strategy.name": "fedalign",
        "strategy.ablation": "full",
        "strategy.routing-lambda": 0.1,
        "strategy.beta": 1.0,
        "strategy.overlap": "geometric",
        "strategy.personalized-experts": True,
        "model.load-balance-coef": 0.01,
        "federated.rounds": 3,
    },
    "fedalign-adaptive-reg-qwen3": {
        "strategy.name": "fedalign",
        "strategy.ablation": "adaptive-reg",
        "strategy.routing-lambda": 0.5,
        "strategy.overlap": "bhattacharyya",
        "model.name": "tiny-qwen3moe",
        "train.keep-optimizer-state": True,
        "partition.num-clients": 4,
        "federated.fraction": 0.75,
        "federated.rounds": 3,
    },
}

# Recorded before the redesign; see the module docstring.
EXPECTED: dict[str, tuple[str, str]] = {
    "fedadam": (
        "83f389a9d3ac72200fb7d15adcf4025d5f3aab4e50e4947e2991a79c0f1e95f5",
        "35c3bbdc62e394199bebe8ad92992edc4f65e8a25e3eeda1a80574d31f139364",
    ),
    "fedalign": (
        "4638afb46c424fb1b56315fbe5e3dfec1d652e080cea36ad6f53ebbcbcc28e67",
        "c9c9af0c5007a8bb7d8c8346bb178a913b3aaa35db4464d758c7943d9be5b069",
    ),
    "fedalign-adaptive-reg-qwen3": (
        "d3b26b9b4dcbe49395e27aacc5a00317c65e50c92068b29bb5774831abe60ae6",
        "5a046d118edadf7a12ffe37a038459436940c47cc1398d42088614eaa816416b",
    ),
    "fedavg": (
        "23c65aebed0a5b6ddc5c5597ccc676f8eb800033e5438d0a72b32ef5883eaa48",
        "2d7cd28e5f1fbd2740941ac4d617db9c457687e6cf8ec28e1a755152eaacab62",
    ),
    "fedmoe": (
        "262e1de201ac206aec06133059007215078b82e655e2bd38250d8ed7046f9396",
        "68fe69f7c3730305caa18642b8718d0e82291ac4af4026cf03e293f1c624d503",
    ),
    "fedprox": (
        "d423d3b4ffb2b756b8cf5857f7534bdf87242f19cabc796c141a8051387a9d56",
        "69f7c9ffac1a1320a3ed479a42874ddecd38befbbd86bdb8d3ab7996f44a407f",
    ),
}


def case_config(name: str) -> ExperimentConfig:
    config = ExperimentConfig()
    for key, value in {**BASE, **CASES[name]}.items():
        config.set(key, value)
    return config


def state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def decisions_digest(folder: Path) -> str:
    rows = read_jsonl(folder / "decisions.jsonl")
    text = json.dumps(rows, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def run_case(name: str, folder: Path) -> tuple[str, str]:
    from safetensors.torch import load_file

    from fedalign.experiments.run import run_experiment

    run_experiment(case_config(name), folder, log=None)
    state = load_file(str(folder / "final_state.safetensors"))
    return state_digest(state), decisions_digest(folder)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fingerprint_unchanged(name: str, tmp_path: Path) -> None:
    assert run_case(name, tmp_path / name) == EXPECTED[name]


if __name__ == "__main__":  # print the digests of the code as it is
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for case in sorted(CASES) if len(sys.argv) < 2 else sys.argv[1:]:
            print(f'    "{case}": {run_case(case, Path(tmp) / case)!r},', flush=True)
