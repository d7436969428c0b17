"""One federated run in this process: prepare, simulate, record, summarise.

:class:`Simulation` composes the layers below: :func:`fedalign.client.prepare` (data,
model, caches), :class:`fedalign.federation.Simulator` (the round loop) and
:class:`fedalign.records.RunFolder` (the run folder, checkpoints, summary). It adds only
what a person at a terminal wants: progress bars and a line per round.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fedalign.client import (
    ModelLoader,
    Prepared,
    PreparedData,
    client_seed,
    client_statistics,
    load_model,
    prepare,
)
from fedalign.config import ExperimentConfig, run_label
from fedalign.federation import Simulator
from fedalign.records import RunFolder, RunSummary, claim_run_folder, routing_snapshot

Tensor = torch.Tensor


def default_out_dir(config: ExperimentConfig, transport: str = "") -> Path:
    """``run.out``, or ``runs/<label>[-<transport>]-<timestamp>``."""
    if config.run.out:
        return Path(config.run.out)
    label = run_label(config.strategy.name, config.strategy.ablation)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "-".join(part for part in (label, transport, stamp) if part)


def prepare_for(
    config: ExperimentConfig,
    data: PreparedData | None,
    model_loader: ModelLoader | None = None,
) -> Prepared:
    """The model and data of ``config``: all prepared, or a fresh model on ``data``
    (``model_loader``: ``(config, num_labels) -> model``, default :func:`load_model`)."""
    if data is None:
        return prepare(config, model_loader=model_loader)
    loader = model_loader or load_model
    model = loader(config, len(data.label_names))
    return Prepared(model=model, data=data)


class Simulation:
    """One federated experiment in this process, with its run folder.

    Parameters
    ----------
    config : ExperimentConfig
        Validated before anything runs.
    out_dir : Path or None, default None
        Run folder; ``None`` uses :func:`default_out_dir`.
    prepared : PreparedData or None, default None
        Reuse tokenized / cached data (``fedalign compare`` runs several strategies on one).
    resume : bool, default False
        Continue from the run folder's checkpoint (which must have been written for the
        same configuration, up to ``federated.rounds`` and ``[run]``, by a compatible
        version); a folder without a checkpoint starts from round 1.
    overwrite : bool, default False
        Replace the run the folder holds. Without ``resume`` or ``overwrite`` a folder that
        holds a run (``config.toml`` or ``metrics.jsonl``) is refused.
    log : callable or None, default print
        Receives the one-line summary of each round.
    model_loader : ModelLoader or None, default None
        Builds the model from ``(config, num_labels)``; None is
        :func:`fedalign.client.load_model` (``run.workers`` > 1: worker processes load
        their own with it).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        out_dir: Path | str | None = None,
        *,
        prepared: PreparedData | None = None,
        resume: bool = False,
        overwrite: bool = False,
        log: Callable[[str], None] | None = print,
        model_loader: ModelLoader | None = None,
    ) -> None:
        config.validate()
        folder = Path(out_dir) if out_dir is not None else default_out_dir(config)
        claim_run_folder(folder, resume=resume, overwrite=overwrite)
        self.config = config
        self.log = log or (lambda _message: None)
        if config.run.threads > 0:
            torch.set_num_threads(config.run.threads)
        ready = prepare_for(config, prepared, model_loader)
        self.model, self.data = ready.model, ready.data
        self.simulator = Simulator(config, ready)
        self.label = run_label(config.strategy.name, config.strategy.ablation)
        self.folder = RunFolder(folder, self.label)
        payload = self.folder.resume(config) if resume else None
        if payload is not None:
            self.simulator.load_state_dict(payload)
            self.log(f"resuming after round {self.simulator.server.completed_rounds}")
        elif not resume:
            self.folder.start_fresh()
        self.folder.write_setup(config, self.data.report, self.model.layout)
        if self.completed_rounds == 0:
            self._record_initial_routing()

    @property
    def completed_rounds(self) -> int:
        return self.simulator.server.completed_rounds

    @property
    def global_parameters(self) -> dict[str, Tensor]:
        return self.simulator.server.global_parameters

    def _record_initial_routing(self) -> None:
        """Round 0 of routing.jsonl: how the initial global model routes each client's data."""
        self.model.load_trainable_state(self.global_parameters)
        clients = list(range(self.data.num_clients))
        seed = self.config.federated.seed
        statistics = [
            client_statistics(
                self.model, self.data.client_rows(c), self.config, client_seed(seed, 0, c)
            )
            for c in clients
        ]
        self.folder.add_routing(routing_snapshot(0, clients, statistics))

    def run_round(self, server_round: int) -> dict[str, Any]:
        """Run one round, record it and checkpoint; returns its metrics line."""
        outcome = self.simulator.run_round(server_round)
        line = self.folder.record_round(outcome, self.simulator.server.strategy.name)
        self.folder.save_checkpoint(self.simulator.state_dict())
        return line

    def _round_message(self, line: dict[str, Any]) -> str:
        accuracy = line.get("global_accuracy")
        return (
            f"[{self.label}] round {line['round']}/{self.config.federated.rounds} "
            f"train_loss={line['train_loss']:.4f} "
            + (f"acc={accuracy:.4f} " if accuracy is not None else "")
            + f"({line['seconds']:.1f}s, {line['bytes_received'] / 2**20:.1f} MiB up)"
        )

    def run(self) -> RunSummary:
        """Run the remaining rounds and write the final records."""
        from tqdm.auto import tqdm

        total = self.config.federated.rounds
        show = self.config.run.progress
        rounds_bar = (
            tqdm(
                total=total,
                initial=self.completed_rounds,
                desc=self.label,
                unit="round",
                leave=False,
            )
            if show
            else None
        )
        try:
            self._run_rounds(total, show, rounds_bar)
        finally:
            self.simulator.close()  # worker processes of run.workers > 1
        if rounds_bar is not None:
            rounds_bar.close()
        return self.finish()

    def _run_rounds(self, total: int, show: bool, rounds_bar: Any) -> None:
        from tqdm.auto import tqdm

        for server_round in range(self.completed_rounds + 1, total + 1):
            steps = None
            if show:
                steps = tqdm(
                    total=self.simulator.round_steps(server_round),
                    desc=f"round {server_round} local steps",
                    unit="step",
                    leave=False,
                    position=1,
                )
                self.simulator.on_step = functools.partial(steps.update, 1)
            try:
                line = self.run_round(server_round)
            finally:
                self.simulator.on_step = None
                if steps is not None:
                    steps.close()
            if rounds_bar is not None:
                rounds_bar.update(1)
                rounds_bar.write(self._round_message(line))
            else:
                self.log(self._round_message(line))

    def finish(self) -> RunSummary:
        return self.folder.finish(self.global_parameters)


def run_experiment(
    config: ExperimentConfig,
    out_dir: Path | str | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    prepared: PreparedData | None = None,
    log: Callable[[str], None] | None = print,
    model_loader: ModelLoader | None = None,
) -> RunSummary:
    """Build a :class:`Simulation` and run it to the end (``resume`` / ``overwrite`` /
    ``model_loader``: see :class:`Simulation`)."""
    return Simulation(
        config,
        out_dir,
        prepared=prepared,
        resume=resume,
        overwrite=overwrite,
        log=log,
        model_loader=model_loader,
    ).run()
