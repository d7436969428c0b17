"""The Flower ServerApp: our strategy behind Flower's Grid, and the run folder of ``fedalign run``.

``main`` reads the run config (``[tool.flwr.app.config]`` plus ``--run-config``
overrides) into an :class:`~fedalign.config.ExperimentConfig`, asks the SuperNodes for their
partitions, and adopts their ``num-partitions`` as ``partition.num-clients``. The server
prepares only what it evaluates on (:func:`fedalign.client.prepare` with
``include_train=False``: the global test set and each partition's local test split, no
client's training data). The :class:`~fedalign.flower.strategy.FlowerStrategy` runs the
rounds on a :class:`~fedalign.federation.ServerState` (the simulator's), and after every
aggregation :class:`RunFolderRecords` evaluates the global model when due and writes the
round through :class:`~fedalign.records.RunFolder`, as the simulator does (by default in a
thread while the next round's clients train, ``flower.overlap-evaluation``). The Grid
Flower hands over is wrapped in a :class:`~fedalign.flower.grid.PolledGrid`, which asks
for replies every ``flower.poll-interval`` seconds (Flower's: 3), and a reply object
that is still being uploaded is asked for again after 0.02 s instead of 1 s
(:func:`~fedalign.flower.grid.quicker_reply_pulls`). Differences from
a simulator run folder: ``routing.jsonl`` has no round 0 (the server never sees client
training data), metrics lines carry ``failed_clients``, and ``provenance.json`` describes
the ServerApp's machine (``"transport": "flower"``: aggregation and evaluation; the clients
train on their SuperNodes' machines).

A relative ``run.out`` resolves against the working directory of the process that runs the
ServerApp (the SuperLink's, or the simulation's); an empty one gives
``runs/<strategy>-flower-<timestamp>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedalign.client import Prepared, prepare
from fedalign.config import ExperimentConfig, run_label
from fedalign.federation import (
    RoundOutcome,
    clipped_extra,
    evaluate_global,
    evaluation_due,
    semantic_probe_for,
    strategy_from_config,
)
from fedalign.flower.grid import PolledGrid, quicker_reply_pulls
from fedalign.flower.messages import config_from_run_config, model_fingerprint
from fedalign.flower.strategy import FlowerStrategy, RoundReport, discover_partitions
from fedalign.protocol import tensor_bytes
from fedalign.records import RunFolder, RunSummary, claim_run_folder

app = ServerApp()


class RunFolderRecords:
    """The ``on_round`` callback that keeps a run folder in the simulator's format.

    Parameters
    ----------
    config : ExperimentConfig
    prepared : Prepared
        The server's model and test data (no client training rows).
    folder : RunFolder
    """

    def __init__(self, config: ExperimentConfig, prepared: Prepared, folder: RunFolder) -> None:
        self.config = config
        self.prepared = prepared
        self.folder = folder
        self.optimizer_state_bytes: dict[int, int] = {}

    def __call__(self, report: RoundReport) -> dict[str, Any]:
        """Evaluate when due, write the round's lines and checkpoint; returns the metrics line."""
        config = self.config
        server = report.server
        for reply in report.replies:
            self.optimizer_state_bytes[reply.result.client_id] = reply.optimizer_state_bytes
        evaluation = None
        if evaluation_due(config, report.server_round):
            evaluation = evaluate_global(
                self.prepared.model,
                self.prepared.data,
                server.global_parameters,
                config.federated.min_local_test,
                [reply.result for reply in report.replies],
            )
        outcome = RoundOutcome(
            server_round=report.server_round,
            selected=list(report.selected),
            results=[reply.result for reply in report.replies],
            aggregation=report.outcome,
            bytes_per_client={
                reply.result.client_id: {
                    "sent": reply.bytes_sent,
                    "received": reply.bytes_received,
                }
                for reply in report.replies
            },
            started=report.started,
            train_seconds=report.train_seconds,
            aggregation_seconds=report.aggregation_seconds,
            client_state_bytes=tensor_bytes(server.personal_parameters)
            + sum(self.optimizer_state_bytes.values()),
            evaluation=evaluation,
            extra={
                "failed_clients": report.failed,
                "rejected_clients": {str(k): v for k, v in sorted(report.rejected.items())},
                **clipped_extra(report.clipped),
            },
        )
        line = self.folder.record_round(outcome, server.strategy.name)
        self.folder.save_checkpoint({**server.state_dict(), "optimizer_states": {}})
        accuracy = line.get("global_accuracy")
        log(
            INFO,
            "[%s] round %d/%d train_loss=%.4f %s(%.1fs, %.1f MiB up)",
            self.folder.label,
            report.server_round,
            config.federated.rounds,
            line["train_loss"],
            f"acc={accuracy:.4f} " if accuracy is not None else "",
            line["seconds"],
            line["bytes_received"] / 2**20,
        )
        return line


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
    grid = PolledGrid(grid, poll_interval=options.poll_interval)
    quicker_reply_pulls()
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
    prepared = prepare(config, include_train=False)
    claim_run_folder(out_dir, overwrite=options.overwrite, command="flwr run")
    folder = RunFolder(out_dir, run_label(config.strategy.name, config.strategy.ablation))
    folder.start_fresh()
    folder.write_setup(config, prepared.data.report, prepared.model.layout, transport="flower")
    records = RunFolderRecords(config, prepared, folder)
    strategy = FlowerStrategy(
        strategy_from_config(config, prepared.model.layout),
        prepared.model.trainable_state(),
        num_clients=num_partitions,
        seed=config.federated.seed,
        fraction=config.federated.fraction,
        client_nodes=client_nodes,
        fingerprint=model_fingerprint(prepared.model),
        on_round=records,
        discovery_timeout=options.discovery_timeout,
        clip_update_norm=config.federated.clip_update_norm,
        screen_norm_multiple=config.federated.screen_norm_multiple,
        semantic_probe=semantic_probe_for(config, prepared.model, prepared.data),
        pack_arrays=options.pack_arrays,
        overlap_records=options.overlap_evaluation,
    )
    strategy.start(
        grid=grid,
        initial_arrays=strategy.initial_arrays(),
        num_rounds=config.federated.rounds,
        timeout=options.round_timeout,
        evaluate_fn=strategy.server_evaluation,
    )
    summary = folder.finish(strategy.global_parameters)
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
