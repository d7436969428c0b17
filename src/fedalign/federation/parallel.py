"""Parallel clients for the simulator: a round's client trainings in worker processes.

With ``run.workers = N > 1`` the :class:`~fedalign.federation.simulator.Simulator` hands
each selected client's round to a pool of N spawned processes. Every worker builds the model
and prepares every client's data once (:func:`fedalign.client.prepare`, seeded: the same
model and prefix cache as the parent's), sets ``max(1, threads // N)`` torch threads, and
then runs :func:`fedalign.client.run_client_round` for each ``(round, client, global
parameters, instructions, optimizer state)`` it receives, returning the
:class:`~fedalign.client.round.ClientRound`. A client's round depends only on those inputs
(all trainable parameters are overwritten, training is seeded per (seed, round, client)),
so results equal the sequential ones bit for bit when a worker uses as many torch threads
as the sequential run (thread count can change floating-point reduction order); the
simulator aggregates them in client order.

Memory: each worker holds a model and the prepared data of every client, on top of the
parent's (which evaluates): about (N + 1) x (model + prepared data + optimiser).
"""

from __future__ import annotations

import multiprocessing
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import torch

from fedalign.client import ClientRound, LossTerm, Prepared, prepare, run_client_round
from fedalign.config import ExperimentConfig
from fedalign.protocol import TrainInstructions

Tensor = torch.Tensor

_WORKER: tuple[ExperimentConfig, Prepared] | None = None


def worker_threads(threads: int, workers: int) -> int:
    """Torch threads per worker: ``max(1, threads // workers)``."""
    return max(1, threads // max(workers, 1))


def _start_worker(config: ExperimentConfig, threads: int) -> None:
    """Pool initializer: threads, then the model and every client's data, once."""
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = (config, prepare(config))


def _train(
    server_round: int,
    client_id: int,
    global_parameters: Mapping[str, Tensor],
    instructions: TrainInstructions,
    optimizer_state: dict[str, Any] | None,
    extra_terms: Sequence[LossTerm],
    residual: Mapping[str, Tensor] | None = None,
) -> ClientRound:
    if _WORKER is None:
        raise RuntimeError("the worker was not initialised (_start_worker did not run)")
    config, prepared = _WORKER
    return run_client_round(
        prepared.model,
        prepared.data,
        config,
        server_round,
        client_id,
        global_parameters,
        instructions,
        optimizer_state,
        residual=residual,
        extra_terms=extra_terms,
    )


class ClientPool:
    """``workers`` spawned processes that run client rounds (see the module docstring).

    Parameters
    ----------
    config : ExperimentConfig
        Validated; ``run.workers`` processes are started.
    threads : int
        Torch threads of the sequential run (the parent's); each worker gets
        :func:`worker_threads`.
    """

    def __init__(self, config: ExperimentConfig, threads: int) -> None:
        self.workers = config.run.workers
        self.threads = worker_threads(threads, self.workers)
        self._pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(config, self.threads),
        )
        # shut the workers down with the pool object, even without close()
        self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=True)

    def submit(
        self,
        server_round: int,
        client_id: int,
        global_parameters: Mapping[str, Tensor],
        instructions: TrainInstructions,
        optimizer_state: dict[str, Any] | None,
        extra_terms: Sequence[LossTerm] = (),
        residual: Mapping[str, Tensor] | None = None,
    ) -> Future[ClientRound]:
        """Queue one client's round; the future's result is its ``ClientRound``."""
        return self._pool.submit(
            _train,
            server_round,
            client_id,
            dict(global_parameters),
            instructions,
            optimizer_state,
            list(extra_terms),
            None if residual is None else dict(residual),
        )

    def close(self) -> None:
        """Stop the workers (waits for queued rounds)."""
        self._finalizer()
