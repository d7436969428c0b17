"""Runs of ``configs/demo.toml`` for the robustness and privacy measurements.

Shared by ``benchmarks/robustness.py`` and ``benchmarks/privacy.py``: every run of a seed
shares the seed's partition, tokenization and prefix cache (:class:`LazyData`) and its
initial model (:class:`CachedModels`); runs go one after another on one torch thread.
Finished runs (a ``summary.json``) are reused, so a script can be stopped and restarted.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedalign.client import load_model
from fedalign.config import ExperimentConfig
from fedalign.experiments.compare import prepare_shared_data
from fedalign.experiments.run import Simulation
from fedalign.models import MoEModel
from fedalign.protocol import ClientResult

ROOT = Path(__file__).resolve().parent.parent


class CachedModels:
    """A :data:`~fedalign.client.ModelLoader` that builds each initial model once and hands
    out copies (loading is deterministic in the configuration and seed; the MoEfication fit
    costs about 7 CPU seconds a run). Keeps the two most recent models."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.models: dict[str, MoEModel] = {}

    def __call__(self, config: ExperimentConfig, num_labels: int) -> MoEModel:
        key = json.dumps(
            [
                dataclasses.asdict(config.model),
                config.model_head(),
                config.federated.seed,
                config.run.device,
                config.run.precision,
                config.run.frozen_dtype,
                config.run.deterministic,
                num_labels,
            ],
            sort_keys=True,
            default=str,
        )
        if key not in self.models:  # load_model's inputs: the key above
            self.models[key] = load_model(config, num_labels)
            while len(self.models) > self.size:
                self.models.pop(next(iter(self.models)))
        return copy.deepcopy(self.models[key])


CACHED_MODELS = CachedModels()
"""The loader every run of these scripts uses."""


def base_config(
    seed: int, rounds: int | None, train_examples: int | None, probe_examples: int
) -> ExperimentConfig:
    """``configs/demo.toml`` with the seed, evaluated after the last round only; ``rounds``
    and ``train_examples`` replace the file's values when given."""
    config = ExperimentConfig.from_toml(ROOT / "configs" / "demo.toml")
    if train_examples is not None:
        config.data.max_train_examples = train_examples
    if rounds is not None:
        config.federated.rounds = rounds
    config.federated.seed = seed
    config.federated.eval_every = config.federated.rounds  # only the final accuracy counts
    config.strategy.probe_examples = probe_examples
    config.run.progress = False
    config.run.threads = 1
    return config


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


class LazyData:
    """The seed's shared prepared data, built on first use (reused runs need none)."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.data: Any = None

    def get(self) -> Any:
        if self.data is None:
            self.data = prepare_shared_data(self.config)
        return self.data


def update_cosines(
    before: Mapping[str, torch.Tensor], results: Sequence[ClientResult]
) -> dict[str, float]:
    """Per client: the cosine of its update (as aggregated) with the example-weighted mean
    update of the round's other clients."""
    updates = torch.stack(
        [
            torch.cat(
                [(r.parameters[n].float() - v.float()).reshape(-1) for n, v in before.items()]
            )
            for r in results
        ]
    )  # (clients, parameters)
    weights = torch.tensor([float(r.num_examples) for r in results])
    total = (updates * weights[:, None]).sum(0)
    cosines: dict[str, float] = {}
    for index, result in enumerate(results):
        others = total - weights[index] * updates[index]
        if len(results) < 2 or float(weights.sum() - weights[index]) <= 0:
            continue
        cosines[str(result.client_id)] = float(
            torch.nn.functional.cosine_similarity(updates[index], others, dim=0)
        )
    return cosines


def run_one(config: ExperimentConfig, folder: Path, data: LazyData) -> dict[str, Any]:
    """Run (or reuse) one configuration: its ``summary.json`` plus ``rounds``, per round the
    clipped clients and every client's :func:`update_cosines` (``rounds.json``)."""
    summary_path = folder / "summary.json"
    rounds_path = folder / "rounds.json"
    if summary_path.exists() and rounds_path.exists():
        return {
            **json.loads(summary_path.read_text()),
            "rounds": json.loads(rounds_path.read_text()),
        }
    started = time.perf_counter()
    simulation = Simulation(
        config,
        folder,
        prepared=data.get(),
        overwrite=True,
        log=None,
        model_loader=CACHED_MODELS,
    )
    rounds: list[dict[str, Any]] = []
    for server_round in range(1, config.federated.rounds + 1):
        before = dict(simulation.global_parameters)
        outcome = simulation.simulator.run_round(server_round)
        rounds.append(
            {
                "round": server_round,
                "clipped": sorted(outcome.extra.get("clipped_clients", {})),
                "cosines": update_cosines(before, outcome.results),
            }
        )
        simulation.folder.record_round(outcome, simulation.simulator.server.strategy.name)
    summary = simulation.finish()
    rounds_path.write_text(json.dumps(rounds))
    print(
        f"{folder.name}: final accuracy {summary.final_accuracy:.4f} "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return {**json.loads(summary_path.read_text()), "rounds": rounds}


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
