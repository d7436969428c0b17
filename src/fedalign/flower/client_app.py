"""The Flower ClientApp: our local trainer on one partition.

A SuperNode serves one partition, named by its node config (``partition-id``,
``num-partitions``; the simulation engine sets both, a deployed SuperNode gets them from
``--node-config``). From the run config the ClientApp rebuilds exactly what the in-process
simulator builds — the same data split, partition, tokenisation and model, all seeded by
``federated.seed`` — through :func:`fedalign.client.prepare`, caching the frozen prefix of
its own partition's rows only, and runs :func:`fedalign.client.run_client_round` on its
partition, the very function the simulator runs for that client.

Handlers:

``train``
    Global parameters and instructions in; parameters, routing statistics, example count
    and training losses out (see :mod:`fedalign.flower.messages`). With
    ``train.keep-optimizer-state`` the AdamW state stays on the node, in ``context.state``;
    so does the error-feedback residual of a compressed upload
    (``federated.upload-compression``, ``federated.error-feedback``).
``evaluate``
    Accuracy and loss of the received parameters on the partition's local test split
    (used by Flower's built-in strategies; ours evaluates on the server).
``query``
    The node's ``partition-id`` and ``num-partitions`` (how the server maps nodes to
    partitions).

The model and the prepared data are built once per process and configuration (in
simulation an actor serves many rounds; a deployed SuperNode starts a process per message).
"""

from __future__ import annotations

import io
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fedalign.client import PreparedData, load_model, prepare_data, run_client_round
from fedalign.client import evaluate as evaluate_model
from fedalign.config import ExperimentConfig
from fedalign.data import FederatedData, build_federated_data
from fedalign.flower.messages import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FINGERPRINT_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
    config_from_run_config,
    decode_instructions,
    decode_state,
    encode_reply,
    is_packed,
    model_fingerprint,
    partition_from_node_config,
    record_int,
    record_str,
)
from fedalign.models import MoEModel
from fedalign.protocol import tensor_bytes

OPTIMIZER_STATE_KEY = "fedalign.optimizer-state"
RESIDUAL_KEY = "fedalign.error-feedback"

app = ClientApp()


@dataclass
class _Warm:
    """What a ClientApp process keeps between messages (see :func:`client_runtime`).

    Parameters
    ----------
    key : str
        :func:`cache_key` of the configuration it was built for.
    federated : FederatedData
        The seeded split and partition (every partition's row indices).
    model : MoEModel
        One model for every partition the process serves: its trainable parameters are
        overwritten by each message's global parameters.
    partitions : OrderedDict of int to PreparedData
        Prepared (tokenized, prefix-cached) rows per partition, least recently used first.
    fingerprint : str
        :func:`~fedalign.flower.messages.model_fingerprint` (computed on first use).
    """

    key: str
    federated: FederatedData
    model: MoEModel
    partitions: OrderedDict[int, PreparedData] = field(default_factory=OrderedDict)
    fingerprint: str = ""


@dataclass
class ClientRuntime:
    """What a ClientApp works with: configuration, its partition, model and data.

    Parameters
    ----------
    config : ExperimentConfig
        From the run config, with ``partition.num-clients`` set to the node's
        ``num-partitions``.
    partition_id : int
    model : MoEModel
    data : PreparedData
        This partition's rows only (no global test set).
    """

    config: ExperimentConfig
    partition_id: int
    model: MoEModel
    data: PreparedData
    _warm: _Warm

    @property
    def fingerprint(self) -> str:
        """:func:`~fedalign.flower.messages.model_fingerprint` of the model (computed once)."""
        if not self._warm.fingerprint:
            self._warm.fingerprint = model_fingerprint(self.model)
        return self._warm.fingerprint


@dataclass
class CacheStats:
    """Counts of what :func:`client_runtime` built or reused in this process.

    Parameters
    ----------
    models_built, partitions_prepared, hits, evicted : int
        Models built (a first message, or a new configuration), partitions prepared,
        messages served from the cache entirely, partition data dropped for the budget.
    """

    models_built: int = 0
    partitions_prepared: int = 0
    hits: int = 0
    evicted: int = 0


_WARM: _Warm | None = None
STATS = CacheStats()


def cache_key(config: ExperimentConfig) -> str:
    """What the model and the partition split depend on: ``model.*``, ``data.*``,
    ``partition.*``, ``federated.seed`` and where / in which precision the model lives
    (``run.device``, ``run.precision``, ``run.frozen-dtype``); not the partition id."""
    values = config.to_dict()
    relevant = {
        "model": values["model"],
        "data": values["data"],
        "partition": values["partition"],
        "seed": config.federated.seed,
        "placement": [config.run.device, config.run.precision, config.run.frozen_dtype],
    }
    return json.dumps(relevant, sort_keys=True)


def clear_cache() -> None:
    """Drop the warm model and data (the next message builds them again)."""
    global _WARM
    _WARM = None


def _partition_data(
    warm: _Warm, config: ExperimentConfig, partition_id: int, budget_bytes: float
) -> PreparedData:
    data = warm.partitions.get(partition_id)
    if data is not None:
        warm.partitions.move_to_end(partition_id)
        return data
    data = prepare_data(
        config, warm.model, warm.federated, clients=[partition_id], include_test=False
    )
    STATS.partitions_prepared += 1
    warm.partitions[partition_id] = data
    # keep the most recently used partitions within the budget (always the current one)
    while len(warm.partitions) > 1 and _nbytes(warm) > budget_bytes:
        warm.partitions.popitem(last=False)
        STATS.evicted += 1
    return data


def _nbytes(warm: _Warm) -> int:
    return sum(data.train.nbytes() for data in warm.partitions.values())


def client_runtime(context: Context) -> ClientRuntime:
    """The runtime of this node and run: builds model and data on first use, then reuses.

    The process keeps one model (for the configuration of the last message: a message with
    a different ``model.*`` / ``data.*`` / ``partition.*`` / ``federated.seed`` replaces it)
    and, per partition it has served, that partition's prepared rows, least recently used
    dropped first once they exceed ``flower.client-cache-mib`` (the current partition always
    stays). Reuse is exact: every message overwrites all trainable parameters, training is
    seeded per (seed, round, client), and a partition's rows are prepared by the same call
    whether the process is new or not.

    Parameters
    ----------
    context : Context
        ``run_config`` gives the experiment, ``node_config`` the partition.

    Raises
    ------
    fedalign.config.ConfigError
        For an invalid run config, or a node config without a valid partition.
    """
    global _WARM
    config, options = config_from_run_config(context.run_config)
    partition_id, num_partitions = partition_from_node_config(context.node_config)
    config.partition.num_clients = num_partitions
    config.validate()
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    key = cache_key(config)
    warm = _WARM
    if warm is None or warm.key != key:
        _WARM = warm = None  # one model per process: free the old one first
        started = time.perf_counter()
        seed = config.federated.seed
        federated = build_federated_data(config.data, config.partition, seed)
        model = load_model(config, num_labels=federated.splits.train.num_classes)
        warm = _WARM = _Warm(key=key, federated=federated, model=model)
        STATS.models_built += 1
        log(INFO, "ClientApp: built the model in %.1f s", time.perf_counter() - started)
    elif partition_id in warm.partitions:
        STATS.hits += 1
    started = time.perf_counter()
    known = partition_id in warm.partitions
    data = _partition_data(warm, config, partition_id, options.client_cache_mib * 2**20)
    if not known:
        log(
            INFO,
            "ClientApp: prepared partition %d in %.1f s",
            partition_id,
            time.perf_counter() - started,
        )
    return ClientRuntime(config, partition_id, warm.model, data, warm)


def _check_message(runtime: ClientRuntime, config: ConfigRecord) -> None:
    expected = record_int(config, PARTITION_ID_KEY, runtime.partition_id)
    if expected != runtime.partition_id:
        raise RuntimeError(
            f"message for partition {expected} reached the node of partition {runtime.partition_id}"
        )
    fingerprint = record_str(config, FINGERPRINT_KEY)
    if fingerprint and fingerprint != runtime.fingerprint:
        raise RuntimeError(
            f"model fingerprint {runtime.fingerprint} differs from the server's {fingerprint}: "
            "the frozen weights differ (check that every machine has the same model files, "
            "fedalign, torch and transformers versions, and the same model.* run config)"
        )


def _load_kept(context: Context, key: str, field: str) -> dict[str, Any] | None:
    record = context.state.config_records.get(key)
    if record is None or field not in record:
        return None
    data = record[field]
    assert isinstance(data, bytes)
    state: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=True)
    return state


def _store_kept(context: Context, key: str, field: str, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    context.state[key] = ConfigRecord({field: buffer.getvalue()})


def _load_optimizer_state(context: Context) -> dict[str, Any] | None:
    return _load_kept(context, OPTIMIZER_STATE_KEY, "adamw")


def _store_optimizer_state(context: Context, state: dict[str, Any]) -> None:
    _store_kept(context, OPTIMIZER_STATE_KEY, "adamw", state)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training on this node's partition (the simulator's client round)."""
    runtime = client_runtime(context)
    config_record = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    _check_message(runtime, config_record)
    server_round = record_int(config_record, SERVER_ROUND_KEY, 1)
    reference = runtime.model.trainable_state()
    arrays = msg.content.array_records[ARRAYS_KEY]
    global_parameters = decode_state(arrays, like=reference)
    instructions = decode_instructions(msg.content, like=reference)
    optimizer_state = None
    if runtime.config.train.keep_optimizer_state:
        optimizer_state = _load_optimizer_state(context)
    done = run_client_round(
        runtime.model,
        runtime.data,
        runtime.config,
        server_round,
        runtime.partition_id,
        global_parameters,
        instructions,
        optimizer_state,
        residual=_load_kept(context, RESIDUAL_KEY, "residual"),
    )
    kept = 0
    if done.optimizer_state is not None:
        _store_optimizer_state(context, done.optimizer_state)
        kept = tensor_bytes(done.optimizer_state)
    if done.residual is not None:
        _store_kept(context, RESIDUAL_KEY, "residual", done.residual)
        kept += tensor_bytes(done.residual)
    content = encode_reply(
        done.result,
        bytes_sent=done.bytes_sent,
        bytes_received=done.bytes_received,
        optimizer_state_bytes=kept,
        packed=is_packed(arrays),  # reply in the form the parameters came in
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy and loss of the received parameters on the partition's local test split."""
    runtime = client_runtime(context)
    config_record = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    _check_message(runtime, config_record)
    reference = runtime.model.trainable_state()
    runtime.model.load_trainable_state(
        decode_state(msg.content.array_records[ARRAYS_KEY], like=reference)
    )
    result = evaluate_model(runtime.model, runtime.data.local_test_rows(runtime.partition_id))
    metrics = MetricRecord({NUM_EXAMPLES_KEY: result.num_examples})
    if result.num_examples > 0:
        metrics["accuracy"] = result.accuracy
        metrics["loss"] = result.loss
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """This node's partition (no model is built)."""
    partition_id, num_partitions = partition_from_node_config(context.node_config)
    answer = ConfigRecord({PARTITION_ID_KEY: partition_id, NUM_PARTITIONS_KEY: num_partitions})
    return Message(content=RecordDict({CONFIG_KEY: answer}), reply_to=msg)
