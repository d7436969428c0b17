"""The single-machine round loop: clients take turns on one model in memory.

Each round the selected clients train one after another: the global trainable parameters
(plus any personalised start) are written into the model, the client trains on its
examples and reports its parameters and routing statistics, and the strategy aggregates.
Per client, the simulator keeps only what must persist between that client's rounds (its
AdamW state when ``train.keep-optimizer-state`` is on, its error-feedback residual when
``federated.upload-compression`` compresses with ``federated.error-feedback``; personalised
experts live in the :class:`~fedalign.federation.server.ServerState`), never a model copy.

Everything is seeded from ``federated.seed``: client sampling per round and each client's
shuffling and dropout per (round, client), so a resumed run matches an uninterrupted one.
Run folders, progress bars and summaries are not this module's business
(:mod:`fedalign.records`, :mod:`fedalign.experiments.run`).

Parallel clients: with ``run.workers`` > 1 the selected clients' rounds run in worker
processes (:mod:`fedalign.federation.parallel`), and their results are taken in client
order, so the aggregate is the sequential one.

Failing clients: ``federated.fault-rate`` > 0 injects faults (``raise``, ``vanish``,
``hang``) drawn from ``federated.fault-seed`` per (round, client), independent of every
other random stream. A failed client contributes nothing; the results that arrive are
screened (:meth:`ServerState.screen`), and the round is aggregated when at least
``federated.min-clients`` of them are valid, else :class:`~fedalign.errors.FederationError`
stops the run (the previous round's checkpoint stays resumable). Every failure and
rejection is in the round's ``extra`` (``failed_clients``, ``rejected_clients``).

Malicious clients: ``federated.attack`` (``scale``, ``sign-flip``) poisons the updates of
``federated.attack-clients`` before upload (:mod:`fedalign.federation.attacks`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedalign.client import LossTerm, Prepared, run_client_round, total_local_steps
from fedalign.config import ExperimentConfig
from fedalign.errors import FederationError
from fedalign.federation.attacks import poison_result
from fedalign.federation.evaluation import evaluate_global
from fedalign.federation.parallel import ClientPool
from fedalign.federation.probe import semantic_probe_for
from fedalign.federation.rounds import RoundOutcome, clipped_extra, evaluation_due
from fedalign.federation.sampling import sample_clients
from fedalign.federation.server import ServerState, strategy_from_config
from fedalign.protocol import ClientResult, tensor_bytes

Tensor = torch.Tensor

FAULT_REASONS = {
    "raise": "raised an error (injected fault)",
    "vanish": "vanished: no reply (injected fault)",
    "hang": "timed out: no reply before the deadline (injected hang)",
}
"""What the metrics line says about a client that failed with each kind of fault."""


class InjectedFault(RuntimeError):
    """The exception an injected ``raise`` fault throws inside a client round."""


def injected_fault(
    fault_seed: int, server_round: int, client_id: int, rate: float, kinds: list[str]
) -> str | None:
    """The fault (a kind of ``kinds``) client ``client_id`` suffers in ``server_round``, or
    None. Drawn from its own stream, seeded by ``(fault_seed, round, client)``."""
    if rate <= 0:
        return None
    rng = np.random.default_rng([fault_seed, server_round, client_id, 0xFA17])
    if rng.random() >= rate:
        return None
    return kinds[int(rng.integers(len(kinds)))]


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
        self.server = ServerState(
            strategy,
            self.model.trainable_state(),
            clip_update_norm=config.federated.clip_update_norm,
            screen_norm_multiple=config.federated.screen_norm_multiple,
            semantic_probe=semantic_probe_for(config, self.model, self.data),
        )
        # what persists per client between its rounds (never a model copy)
        self.optimizer_states: dict[int, dict[str, Any]] = {}
        self.residuals: dict[int, dict[str, Tensor]] = {}
        # further client loss terms (see fedalign.client.losses); empty by default
        self.extra_terms: list[LossTerm] = []
        self.on_step: Callable[[], None] | None = None
        # run.workers > 1: worker processes, started with the first round
        self._pool: ClientPool | None = None

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
        return (
            tensor_bytes(self.optimizer_states)
            + tensor_bytes(self.residuals)
            + tensor_bytes(self.server.personal_parameters)
        )

    def evaluate(self, results: Sequence[ClientResult] = ()) -> dict[str, Any]:
        """:func:`evaluate_global` of the current global parameters (with the routing
        breakdown of ``results``, the round's client results, when given)."""
        return evaluate_global(
            self.model,
            self.data,
            self.server.global_parameters,
            self.config.federated.min_local_test,
            results,
        )

    def _client_round(self, server_round: int, client_id: int, instructions: Any) -> Any:
        """One client's round, or :class:`InjectedFault` / None for an injected fault."""
        federated = self.config.federated
        fault = injected_fault(
            federated.fault_seed,
            server_round,
            client_id,
            federated.fault_rate,
            federated.fault_kinds,
        )
        if fault == "raise":
            raise InjectedFault(FAULT_REASONS["raise"])
        if fault is not None:
            return fault
        done = run_client_round(
            self.model,
            self.data,
            self.config,
            server_round,
            client_id,
            self.server.global_parameters,
            instructions,
            self.optimizer_states.get(client_id),
            residual=self.residuals.get(client_id),
            extra_terms=self.extra_terms,
            on_step=self.on_step,
        )
        return self._poisoned(client_id, done)

    def _poisoned(self, client_id: int, done: Any) -> Any:
        """``done`` with its update poisoned when ``client_id`` is an attacking client."""
        federated = self.config.federated
        if federated.attack != "none" and client_id in federated.attack_clients:
            done.result = poison_result(
                self.server.global_parameters, done.result, federated.attack, federated.attack_scale
            )
        return done

    def _parallel_rounds(
        self, server_round: int, selected: list[int], instructions: Mapping[int, Any]
    ) -> dict[int, Any]:
        """Every selected client's round on the worker pool (``run.workers`` > 1): a
        ``ClientRound``, or the injected fault (decided here, as in sequential mode)."""
        if self._pool is None:
            self._pool = ClientPool(self.config, torch.get_num_threads())
        federated = self.config.federated
        futures: dict[int, Any] = {}
        for client_id in selected:
            fault = injected_fault(
                federated.fault_seed,
                server_round,
                client_id,
                federated.fault_rate,
                federated.fault_kinds,
            )
            if fault is not None:
                futures[client_id] = fault
                continue
            futures[client_id] = self._pool.submit(
                server_round,
                client_id,
                self.server.global_parameters,
                instructions[client_id],
                self.optimizer_states.get(client_id),
                self.extra_terms,
                residual=self.residuals.get(client_id),
            )
        done: dict[int, Any] = {}
        for client_id in selected:  # in client order, whatever order workers finish in
            outcome = futures[client_id]
            if isinstance(outcome, str):
                done[client_id] = outcome
                continue
            done[client_id] = self._poisoned(client_id, outcome.result())
            if self.on_step is not None:
                steps = total_local_steps(len(self.data.client_train[client_id]), self.config.train)
                for _ in range(steps):
                    self.on_step()
        return done

    def _train_clients(
        self, server_round: int, selected: list[int]
    ) -> tuple[list[ClientResult], dict[int, dict[str, int]], dict[int, str]]:
        instructions = self.server.instructions(server_round, selected)
        results: list[ClientResult] = []
        per_client: dict[int, dict[str, int]] = {}
        failed: dict[int, str] = {}
        parallel = (
            self._parallel_rounds(server_round, selected, instructions)
            if self.config.run.workers > 1
            else None
        )
        for client_id in selected:
            if parallel is not None and parallel[client_id] == "raise":
                failed[client_id] = FAULT_REASONS["raise"]
                continue
            try:
                done = (
                    parallel[client_id]
                    if parallel is not None
                    else self._client_round(server_round, client_id, instructions[client_id])
                )
            except InjectedFault as error:
                failed[client_id] = str(error)
                continue
            if isinstance(done, str):
                failed[client_id] = FAULT_REASONS[done]
                continue
            if done.optimizer_state is not None:
                self.optimizer_states[client_id] = done.optimizer_state
            if done.residual is not None:
                self.residuals[client_id] = done.residual
            results.append(done.result)
            per_client[client_id] = {"sent": done.bytes_sent, "received": done.bytes_received}
        return results, per_client, failed

    def run_round(self, server_round: int) -> RoundOutcome:
        """Train the round's clients, aggregate, adopt, and evaluate when due."""
        started = time.perf_counter()
        selected = self.selected(server_round)
        arrived, per_client, failed = self._train_clients(server_round, selected)
        train_seconds = time.perf_counter() - started
        aggregation_started = time.perf_counter()
        screening = self.server.screen(arrived)
        # compressed uploads were restored into new results: free the originals before
        # the strategy runs (peak memory per client)
        del arrived
        results = screening.accepted
        minimum = self.config.federated.min_clients
        if len(results) < minimum:
            raise FederationError(
                f"round {server_round}: {len(results)} valid client result(s) of "
                f"{len(selected)} selected, fewer than federated.min-clients = {minimum} "
                f"(failed: {failed or 'none'}; rejected: {screening.rejected or 'none'}); "
                "the run stops here, the last checkpoint can be resumed"
            )
        aggregation = self.server.aggregate(server_round, results, screening)
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
            evaluation=self.evaluate(results) if due else None,
            extra=round_extra(failed, screening.rejected, screening.clipped),
        )

    def close(self) -> None:
        """Stop the worker processes of ``run.workers`` > 1 (a later round restarts them)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def state_dict(self) -> dict[str, Any]:
        """Server state and the clients' kept optimizer states and error-feedback residuals
        (exact resume)."""
        return {
            **self.server.state_dict(),
            "optimizer_states": self.optimizer_states,
            "residuals": self.residuals,
        }

    def load_state_dict(self, payload: Mapping[str, Any]) -> None:
        self.server.load_state_dict(payload)
        self.optimizer_states = payload["optimizer_states"]
        self.residuals = payload.get("residuals", {})


def round_extra(
    failed: Mapping[int, str], rejected: Mapping[int, str], clipped: Mapping[int, float]
) -> dict[str, Any]:
    """The metrics line's record of a round's failures, rejections and clipped updates.

    ``failed_clients`` lists the clients without a result (as the Flower ServerApp does),
    ``failure_reasons`` says why; ``rejected_clients`` maps each rejected client to the
    reason; ``clipped_clients`` (only when some update was clipped) maps a client to its
    update norm before clipping.
    """
    return {
        "failed_clients": sorted(failed),
        "failure_reasons": {str(k): v for k, v in sorted(failed.items())},
        "rejected_clients": {str(k): v for k, v in sorted(rejected.items())},
        **clipped_extra(clipped),
    }
