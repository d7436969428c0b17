"""One client's round: the same code behind the simulator and the Flower ClientApp."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedalign.client.inputs import ModelInputs
from fedalign.client.losses import LoadBalancingTerm, LossTerm, build_loss_terms
from fedalign.client.prepare import PreparedData
from fedalign.client.statistics import compute_routing_statistics, semantic_privacy_metrics
from fedalign.client.trainer import train_local
from fedalign.compression import compress_update, parameter_delta
from fedalign.config import ExperimentConfig
from fedalign.models import MoEModel
from fedalign.protocol import ClientResult, RoutingStatistics, TrainInstructions, tensor_bytes

Tensor = torch.Tensor


def client_seed(seed: int, server_round: int, client_id: int) -> int:
    """A seed for one client's round that does not depend on the order clients run in."""
    return int(np.random.default_rng([seed, server_round, client_id, 11]).integers(2**31 - 1))


def client_statistics(
    model: MoEModel, train: ModelInputs, config: ExperimentConfig, seed: int
) -> RoutingStatistics:
    """Routing statistics of the model as it is on one client's training examples."""
    return compute_routing_statistics(
        model,
        train,
        max_examples=config.strategy.stats_max_examples,
        seed=seed,
        hidden_noise_std=config.strategy.hidden_noise_std,
        semantic_privacy=config.strategy.semantic_privacy,
        semantic_clip=config.strategy.semantic_clip,
        semantic_noise_multiplier=config.strategy.semantic_noise_multiplier,
    )


def client_loss_terms(
    config: ExperimentConfig, instructions: TrainInstructions, extra: Sequence[LossTerm] = ()
) -> list[LossTerm]:
    """The client's own terms (load balancing), then the server's, then ``extra``."""
    terms: list[LossTerm] = []
    if config.model.load_balance_coef > 0:
        terms.append(LoadBalancingTerm(config.model.load_balance_coef))
    terms.extend(build_loss_terms(instructions.loss_terms))
    terms.extend(extra)
    return terms


@dataclass
class ClientRound:
    """What one client's round produced.

    Parameters
    ----------
    result : ClientResult
        The reply for the strategy (routing statistics always computed, for diagnostics).
    optimizer_state : dict or None
        AdamW state to keep for the client's next round (``train.keep-optimizer-state``).
    bytes_sent : int
        Server -> client bytes: global parameters plus the instructions' tensors.
    bytes_received : int
        Client -> server bytes: parameters (or the compressed update), plus statistics when
        the strategy asked for them.
    residual : dict of str to Tensor or None, default None
        The error-feedback residual to keep for the client's next round
        (``federated.upload-compression`` other than ``none`` with
        ``federated.error-feedback``).
    """

    result: ClientResult
    optimizer_state: dict[str, Any] | None
    bytes_sent: int
    bytes_received: int
    residual: dict[str, Tensor] | None = None


def run_client_round(
    model: MoEModel,
    data: PreparedData,
    config: ExperimentConfig,
    server_round: int,
    client_id: int,
    global_parameters: Mapping[str, Tensor],
    instructions: TrainInstructions,
    optimizer_state: dict[str, Any] | None = None,
    *,
    residual: Mapping[str, Tensor] | None = None,
    extra_terms: Sequence[LossTerm] = (),
    on_step: Callable[[], None] | None = None,
) -> ClientRound:
    """One client's local round.

    Writes the global (then any personalised) parameters into ``model``, trains on the
    client's examples with the seed of ``(federated.seed, server_round, client_id)`` and
    computes its routing statistics. With ``federated.upload-compression`` other than
    ``none`` the result carries the compressed delta (``ClientResult.update``, empty
    ``parameters``) instead of the parameters (:mod:`fedalign.compression`).

    Parameters
    ----------
    model : MoEModel
        Modified in place.
    data : PreparedData
        Holds this client's rows.
    config : ExperimentConfig
    server_round : int
    client_id : int
    global_parameters : mapping of str to Tensor
        The round's global trainable parameters.
    instructions : TrainInstructions
        From the strategy's ``configure_train``.
    optimizer_state : dict or None, default None
        The client's AdamW state from its previous round.
    residual : mapping of str to Tensor or None, default None
        The client's error-feedback residual from its previous round.
    extra_terms : sequence of LossTerm, default ()
        Further loss terms, added after the instructed ones.
    on_step : callable or None, default None
        Called after every local step (progress bars).
    """
    model.load_trainable_state(global_parameters)
    if instructions.start_parameters:
        model.load_trainable_state(instructions.start_parameters)
    train = data.client_rows(client_id)
    seed = client_seed(config.federated.seed, server_round, client_id)
    outcome = train_local(
        model,
        train,
        client_loss_terms(config, instructions, extra_terms),
        config.train,
        global_parameters=global_parameters,
        seed=seed,
        optimizer_state=optimizer_state,
        keep_optimizer_state=config.train.keep_optimizer_state,
        on_step=on_step,
    )
    # statistics are computed for every strategy (divergence diagnostics), but only
    # count as uploaded when the strategy asked for them
    statistics = client_statistics(model, train, config, seed)
    sent = tensor_bytes(global_parameters) + tensor_bytes(
        [instructions.loss_terms, instructions.start_parameters or {}]
    )
    result = ClientResult(
        client_id=client_id,
        num_examples=len(train),
        parameters=outcome.parameters,
        routing_statistics=statistics,
        metrics=outcome.metrics,
    )
    s = config.strategy
    result.metrics.update(
        semantic_privacy_metrics(
            statistics,
            s.semantic_privacy,
            s.semantic_clip,
            s.semantic_noise_multiplier,
            s.semantic_delta,
        )
    )
    kept = None
    federated = config.federated
    if federated.upload_compression != "none":
        result.update, kept = compress_update(
            parameter_delta(outcome.parameters, global_parameters),
            federated.upload_compression,
            fraction=federated.topk_fraction,
            residual=residual,
            error_feedback=federated.error_feedback,
        )
        result.parameters = {}
    received = tensor_bytes(result.update if result.update is not None else result.parameters)
    if instructions.collect_statistics:
        received += tensor_bytes([s.to_tensors() for s in statistics.values()])
    return ClientRound(result, outcome.optimizer_state, sent, received, kept)
