"""The single-machine round loop: clients take turns on one model in memory.

Each round the selected clients train one after another: the global trainable parameters
(plus any personalised start) are written into the model, the client trains on its
examples and reports its parameters and routing statistics, and the strategy aggregates.
Per client, the simulator keeps only what must persist between that client's rounds (its
AdamW state when ``train.keep-optimizer-state`` is on; personalised experts live in the
:class:`~fedalign.federation.server.ServerState`), never a model copy.

Everything is seeded from ``federated.seed``: client sampling per round and each client's
shuffling and dropout per (round, client), so a resumed run matches an uninterrupted one.
Run folders, progress bars and summaries are not this module's business
(:mod:`fedalign.records`, :mod:`fedalign.experiments.run`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedalign.client import LossTerm, Prepared, run_client_round, total_local_steps
from fedalign.config import ExperimentConfig
from fedalign.federation.evaluation import evaluate_global
from fedalign.federation.rounds import RoundOutcome, evaluation_due
from fedalign.federation.sampling import sample_clients
from fedalign.federation.server import ServerState, strategy_from_config
from fedalign.protocol import ClientResult, tensor_bytes

Tensor = torch.Tensor


class Simulator:
    """Rounds of one federated experiment in this process.

    Parameters
    ----------
    config : ExperimentConfig
        Validated.
    prepared : Prepared
        The model and every client's prepared data (:func:`fedalign.client.prepare`).
    """

    def __init__(self, config: ExperimentConfig, prepared: Prepared) -> None:
        self.config = config
        self.model = prepared.model
        self.data = prepared.data
        strategy = strategy_from_config(config, self.model.layout)
        self.server = ServerState(strategy, self.model.trainable_state())
        # what persists per client between its rounds (never a model copy)
        self.optimizer_states: dict[int, dict[str, Any]] = {}
        # further client loss terms (see fedalign.client.losses); empty by default
        self.extra_terms: list[LossTerm] = []
        self.on_step: Callable[[], None] | None = None

    def selected(self, server_round: int) -> list[int]:
        federated = self.config.federated
        return sample_clients(
            federated.seed, server_round, self.data.num_clients, federated.fraction
        )

    def round_steps(self, server_round: int) -> int:
        """Local steps the selected clients will take in ``server_round`` (progress bars)."""
        return sum(
            total_local_steps(len(self.data.client_train[c]), self.config.train)
            for c in self.selected(server_round)
        )

    def client_state_bytes(self) -> int:
        """Bytes kept per client between rounds, summed over clients."""
        return tensor_bytes(self.optimizer_states) + tensor_bytes(self.server.personal_parameters)

    def evaluate(self) -> dict[str, Any]:
        """:func:`evaluate_global` of the current global parameters."""
        return evaluate_global(
            self.model,
            self.data,
            self.server.global_parameters,
            self.config.federated.min_local_test,
        )

    def _train_clients(
        self, server_round: int, selected: list[int]
    ) -> tuple[list[ClientResult], dict[int, dict[str, int]]]:
        instructions = self.server.instructions(server_round, selected)
        results: list[ClientResult] = []
        per_client: dict[int, dict[str, int]] = {}
        for client_id in selected:
            done = run_client_round(
                self.model,
                self.data,
                self.config,
                server_round,
                client_id,
                self.server.global_parameters,
                instructions[client_id],
                self.optimizer_states.get(client_id),
                extra_terms=self.extra_terms,
                on_step=self.on_step,
            )
            if done.optimizer_state is not None:
                self.optimizer_states[client_id] = done.optimizer_state
            results.append(done.result)
            per_client[client_id] = {"sent": done.bytes_sent, "received": done.bytes_received}
        return results, per_client

    def run_round(self, server_round: int) -> RoundOutcome:
        """Train the round's clients, aggregate, adopt, and evaluate when due."""
        started = time.perf_counter()
        selected = self.selected(server_round)
        results, per_client = self._train_clients(server_round, selected)
        train_seconds = time.perf_counter() - started
        aggregation_started = time.perf_counter()
        aggregation = self.server.aggregate(server_round, results)
        aggregation_seconds = time.perf_counter() - aggregation_started
        self.server.adopt(server_round, aggregation)
        due = evaluation_due(self.config, server_round)
        return RoundOutcome(
            server_round=server_round,
            selected=selected,
            results=results,
            aggregation=aggregation,
            bytes_per_client=per_client,
            started=started,
            train_seconds=train_seconds,
            aggregation_seconds=aggregation_seconds,
            client_state_bytes=self.client_state_bytes(),
            evaluation=self.evaluate() if due else None,
        )

    def state_dict(self) -> dict[str, Any]:
        """Server state and the clients' kept optimizer states (exact resume)."""
        return {**self.server.state_dict(), "optimizer_states": self.optimizer_states}

    def load_state_dict(self, payload: Mapping[str, Any]) -> None:
        self.server.load_state_dict(payload)
        self.optimizer_states = payload["optimizer_states"]
