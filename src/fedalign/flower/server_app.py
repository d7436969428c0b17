"""The Flower ServerApp: our strategy behind Flower's Grid, and the run folder of ``fedalign run``.

``main`` reads the run config (``[tool.flwr.app.config]`` plus ``--run-config``
overrides) into an :class:`~fedalign.config.ExperimentConfig`, asks the SuperNodes for their
partitions, and adopts their ``num-partitions`` as ``partition.num-clients``. It then
builds, once, what the in-process simulator builds on the server side — the
:class:`~fedalign.simulation.Simulation` object (model, data, strategy, run folder and its
setup files), which here never trains: clients train on the SuperNodes. The
:class:`~fedalign.flower.strategy.FlowerStrategy` runs the rounds, and after every
aggregation :class:`RunFolderRecords` evaluates the global model on the server (global test
set and every partition's local test split), and appends to ``metrics.jsonl``,
``decisions.jsonl`` and ``routing.jsonl`` and checkpoints, as the simulator does. At the end
``summary.json``, ``final_state.safetensors`` and ``convergence.png`` are written by the
simulator's own ``finish``.

A relative ``run.out`` resolves against the working directory of the process that runs the
ServerApp (the SuperLink's, or the simulation's); an empty one gives
``runs/<strategy>-flower-<timestamp>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedalign.config import ExperimentConfig
from fedalign.flower.messages import config_from_run_config, model_fingerprint
from fedalign.flower.strategy import FlowerStrategy, RoundReport, discover_partitions
from fedalign.records import tensor_bytes
from fedalign.simulation import RunSummary, Simulation

app = ServerApp()


class RunFolderRecords:
    """The ``on_round`` callback that keeps a run folder in the simulator's format.

    Parameters
    ----------
    simulation : Simulation
        Holds the server-side model, data, recorder and counters (it never trains here).
    """

    def __init__(self, simulation: Simulation) -> None:
        self.simulation = simulation
        self.optimizer_state_bytes: dict[int, int] = {}

    def __call__(self, report: RoundReport) -> dict[str, Any]:
        """Evaluate, write the round's lines and checkpoint; returns the metrics line."""
        sim = self.simulation
        config = sim.config
        # the wrapper holds the personalised parameters: adopt them as they are
        sim.personal_parameters = report.personal_parameters
        per_client = {
            reply.result.client_id: {"sent": reply.bytes_sent, "received": reply.bytes_received}
            for reply in report.replies
        }
        for reply in report.replies:
            self.optimizer_state_bytes[reply.result.client_id] = reply.optimizer_state_bytes
        outcome = dataclasses.replace(
            report.outcome,
            parameters=report.global_parameters,
            state=report.strategy_state,
            client_parameters={},
        )
        line = sim.record_round(
            report.server_round,
            report.selected,
            [reply.result for reply in report.replies],
            outcome,
            per_client,
            started=report.started,
            train_seconds=report.train_seconds,
            aggregation_seconds=report.aggregation_seconds,
            client_state_bytes=tensor_bytes(report.personal_parameters)
            + sum(self.optimizer_state_bytes.values()),
            extra={"failed_clients": report.failed},
        )
        server_round = report.server_round
        seconds = line["seconds"]
        round_received = line["bytes_received"]
        accuracy = line.get("global_accuracy")
        log(
            INFO,
            "[%s] round %d/%d train_loss=%.4f %s(%.1fs, %.1f MiB up)",
            sim.strategy.name,
            server_round,
            config.federated.rounds,
            line["train_loss"],
            f"acc={accuracy:.4f} " if accuracy is not None else "",
            seconds,
            round_received / 2**20,
        )
        return line

    def finish(self) -> RunSummary:
        """``summary.json``, ``final_state.safetensors`` and ``convergence.png``."""
        return self.simulation.finish()


def default_out_dir(config: ExperimentConfig) -> Path:
    """``run.out``, or ``runs/<strategy>-flower-<timestamp>``, as an absolute path."""
    out = config.run.out or (
        f"runs/{config.strategy.name}-flower-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    )
    return Path(out).expanduser().resolve()


def run_server(grid: Grid, run_config: Mapping[str, Any]) -> RunSummary:
    """Everything the ServerApp does; returns the run's summary.

    Parameters
    ----------
    grid : Grid
    run_config : mapping
        The flat Flower run config (see
        :func:`~fedalign.flower.messages.config_from_run_config`).
    """
    config, options = config_from_run_config(run_config)
    client_nodes = discover_partitions(grid, timeout=options.discovery_timeout)
    num_partitions = len(client_nodes)
    if num_partitions != config.partition.num_clients:
        log(
            WARNING,
            "partition.num-clients is %d in the run config but the SuperNodes serve %d "
            "partitions: the run uses %d clients",
            config.partition.num_clients,
            num_partitions,
            num_partitions,
        )
        config.partition.num_clients = num_partitions
    config.validate()
    out_dir = default_out_dir(config)
    log(INFO, "Run folder: %s", out_dir)
    simulation = Simulation(config, out_dir, log=lambda message: log(INFO, message))
    records = RunFolderRecords(simulation)
    strategy = FlowerStrategy(
        simulation.strategy,
        simulation.global_parameters,
        num_clients=num_partitions,
        seed=config.federated.seed,
        fraction=config.federated.fraction,
        client_nodes=client_nodes,
        fingerprint=model_fingerprint(simulation.model),
        on_round=records,
        discovery_timeout=options.discovery_timeout,
    )
    strategy.start(
        grid=grid,
        initial_arrays=strategy.initial_arrays(),
        num_rounds=config.federated.rounds,
        timeout=options.round_timeout,
        evaluate_fn=strategy.server_evaluation,
    )
    summary = records.finish()
    log(
        INFO,
        "[%s] done: final accuracy %.4f after %d rounds; records in %s",
        summary.strategy,
        summary.final_accuracy,
        summary.rounds,
        summary.out_dir,
    )
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp entry point (``[tool.flwr.app.components] serverapp``)."""
    run_server(grid, context.run_config)
