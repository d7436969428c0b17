"""The warm ClientApp: one model per process for every partition it serves, prepared rows per
partition, replies bitwise equal to those of a fresh (cold) process.

No Flower processes: the ClientApp's ``train`` handler is called with messages built as the
ServerApp builds them; "cold" = the process cache cleared before every message.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedalign[flower]')")

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.app.metadata import Metadata
from flwr.supercore.task_identity import TaskIdentity

from fedalign.client import prepare
from fedalign.config import ConfigError, ExperimentConfig
from fedalign.federation import ServerState, strategy_from_config
from fedalign.flower import client_app
from fedalign.flower.messages import (
    ARRAYS_KEY,
    CLIENT_KEY,
    CONFIG_KEY,
    FINGERPRINT_KEY,
    METRICS_KEY,
    NUM_PARTITIONS_KEY,
    PACKED_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
    FlowerOptions,
    config_from_run_config,
    encode_instructions,
    encode_state,
    model_fingerprint,
    run_config_from_config,
)
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts as a new ClientApp process would (and leaves nothing behind)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    client_app.clear_cache()
    monkeypatch.setattr(client_app, "STATS", client_app.CacheStats())
    yield
    client_app.clear_cache()
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def config_for_test() -> ExperimentConfig:
    config = tiny_config(strategy__name="fedprox", train__local_steps=2)
    config.validate()
    return config


class Server:
    """What the ServerApp holds: the global parameters, instructions and fingerprint."""

    def __init__(self, config: ExperimentConfig) -> None:
        prepared = prepare(config, include_train=False)
        self.state = ServerState(
            strategy_from_config(config, prepared.model.layout), prepared.model.trainable_state()
        )
        self.fingerprint = model_fingerprint(prepared.model)

    def message(self, server_round: int, partition: int, *, packed: bool = True) -> Message:
        instructions = self.state.instructions(server_round, [partition])[partition]
        config = ConfigRecord(
            {
                SERVER_ROUND_KEY: server_round,
                PARTITION_ID_KEY: partition,
                FINGERPRINT_KEY: self.fingerprint,
            }
        )
        content = RecordDict(
            {
                ARRAYS_KEY: encode_state(self.state.global_parameters, packed=packed),
                CONFIG_KEY: config,
            }
        )
        for key, record in encode_instructions(instructions).items():
            content[key] = record
        metadata = Metadata(
            run_id=1,
            message_id=f"m{server_round}-{partition}",
            src_node_id=0,
            dst_node_id=100 + partition,
            reply_to_message_id="",
            group_id=str(server_round),
            created_at=0.0,
            ttl=3600.0,
            message_type=MessageType.TRAIN,
        )
        return Message(content=content, metadata=metadata)


@pytest.fixture(scope="module")
def server() -> Server:
    return Server(config_for_test())


def context(config: ExperimentConfig, partition: int, **options: object) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={PARTITION_ID_KEY: partition, NUM_PARTITIONS_KEY: 3},
        state=RecordDict(),
        run_config=run_config_from_config(config, FlowerOptions(**options)),  # type: ignore[arg-type]
    )


def digest(reply: Message) -> tuple[object, ...]:
    """Everything a reply carries, as comparable bytes and numbers (but wall-clock time)."""
    content = reply.content
    arrays = tuple(
        (name, array.numpy().dtype.str, array.numpy().tobytes())
        for name, array in content.array_records[ARRAYS_KEY].items()
    )
    metrics = tuple(
        sorted((k, v) for k, v in content.metric_records[METRICS_KEY].items() if k != "seconds")
    )
    client = content.config_records[CLIENT_KEY]
    return arrays, metrics, client["statistics"], client[PARTITION_ID_KEY]


SEQUENCE = [(1, 0), (1, 1), (2, 0), (2, 1)]  # a process serving two partitions in turn


def test_warm_replies_equal_cold_replies_bitwise(server: Server) -> None:
    config = config_for_test()
    warm = [digest(client_app.train(server.message(r, p), context(config, p))) for r, p in SEQUENCE]
    assert client_app.STATS.models_built == 1
    assert client_app.STATS.partitions_prepared == 2
    assert client_app.STATS.hits == 2
    cold = []
    for r, p in SEQUENCE:
        client_app.clear_cache()
        cold.append(digest(client_app.train(server.message(r, p), context(config, p))))
    assert client_app.STATS.models_built == 1 + len(SEQUENCE)
    assert warm == cold
    # the rounds and partitions differ from each other (the comparison is not vacuous)
    assert len({d[0] for d in warm}) == len(SEQUENCE)


def test_reply_mirrors_the_packing_of_the_message(server: Server) -> None:
    config = config_for_test()
    packed = client_app.train(server.message(1, 2, packed=True), context(config, 2))
    plain = client_app.train(server.message(1, 2, packed=False), context(config, 2))
    packed_arrays = packed.content.array_records[ARRAYS_KEY]
    plain_arrays = plain.content.array_records[ARRAYS_KEY]
    assert list(packed_arrays.keys()) == [PACKED_KEY]
    assert list(plain_arrays.keys()) == list(server.state.global_parameters)
    flat = np.concatenate([a.numpy().reshape(-1) for a in plain_arrays.values()])
    assert np.array_equal(packed_arrays[PACKED_KEY].numpy(), flat.astype(np.float32))


def test_partition_data_beyond_the_budget_is_dropped_and_rebuilt_exactly(server: Server) -> None:
    config = config_for_test()
    first = digest(client_app.train(server.message(1, 0), context(config, 0, client_cache_mib=0)))
    client_app.train(server.message(1, 1), context(config, 1, client_cache_mib=0))
    again = digest(client_app.train(server.message(1, 0), context(config, 0, client_cache_mib=0)))
    stats = client_app.STATS
    assert (stats.models_built, stats.partitions_prepared, stats.evicted) == (1, 3, 2)
    assert again == first


def test_a_different_model_config_replaces_the_model(server: Server) -> None:
    config = config_for_test()
    client_app.train(server.message(1, 0), context(config, 0))
    other = config_for_test()
    other.model.max_length = 16  # another model input: another cache key
    runtime = client_app.client_runtime(context(other, 0))
    assert client_app.STATS.models_built == 2
    assert runtime.data.client_rows(0).attention_mask.shape[1] <= 16
    # a training-only change keeps the warm model
    trained_more = other.copy()
    trained_more.train.local_steps = 5
    client_app.client_runtime(context(trained_more, 0))
    assert client_app.STATS.models_built == 2


def test_client_prepares_no_global_test_set() -> None:
    runtime = client_app.client_runtime(context(config_for_test(), 1))
    assert len(runtime.data.test) == 0
    assert len(runtime.data.client_rows(1)) > 0
    assert set(runtime.data.client_train) == {1}


def test_flower_options_of_the_client_cache_and_packing() -> None:
    _, options = config_from_run_config(
        {"flower.client-cache-mib": "64", "flower.pack-arrays": "false"}
    )
    assert options.client_cache_mib == 64.0 and options.pack_arrays is False
    with pytest.raises(ConfigError, match=r"flower.client-cache-mib.*>= 0"):
        config_from_run_config({"flower.client-cache-mib": -1})
    with pytest.raises(ConfigError, match=r"flower.pack-arrays.*true or false"):
        config_from_run_config({"flower.pack-arrays": "maybe"})
    assert torch.get_num_threads() == 1
