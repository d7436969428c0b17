"""Conversion between our objects and Flower records, and the run config of the Flower app."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedalign[flower]')")

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.config import flatten_dict
from flwr.serverapp.strategy.strategy_utils import (
    validate_message_reply_consistency,
)

from fedalign.compression import compress_update
from fedalign.config import ConfigError, ExperimentConfig
from fedalign.flower.messages import (
    ARRAYS_KEY,
    INSTRUCTION_TENSORS_KEY,
    INSTRUCTIONS_KEY,
    PACKED_KEY,
    FlowerOptions,
    config_from_run_config,
    decode_instructions,
    decode_reply,
    decode_state,
    decode_statistics,
    encode_instructions,
    encode_reply,
    encode_state,
    encode_statistics,
    is_packed,
    model_fingerprint,
    packable,
    partition_from_node_config,
    run_config_from_config,
)
from fedalign.protocol import (
    ClientResult,
    LayerRoutingStatistics,
    LossTermSpec,
    TrainInstructions,
    tensor_bytes,
)

REPO = Path(__file__).resolve().parents[2]


def layer_statistics(seed: int, experts: int = 4, hidden: int = 6) -> LayerRoutingStatistics:
    generator = torch.Generator().manual_seed(seed)
    distribution = torch.softmax(torch.randn(experts, generator=generator), dim=0)
    return LayerRoutingStatistics(
        routing_distribution=distribution,
        usage=torch.rand(experts, generator=generator),
        margin=torch.rand(experts, generator=generator),
        mean_hidden=torch.randn(experts, hidden, generator=generator),
        token_count=torch.tensor([3.0, 0.0, 9.0, 1.0][:experts]),
        num_tokens=13,
    )


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- tensors
def test_packed_state_round_trip_is_exact() -> None:
    state = {
        "b.weight": torch.randn(3, 4),
        "a.bias": torch.randn(4).bfloat16(),
        "half": torch.randn(2, 2).half(),
        "scalar": torch.tensor(2.5),
    }
    record = encode_state(state, packed=True)
    assert list(record.keys()) == [PACKED_KEY] and is_packed(record)
    assert record[PACKED_KEY].numpy().shape == (12 + 4 + 4 + 1,)
    assert_same(decode_state(record, like=state), state)
    with pytest.raises(ValueError, match="reference tensors"):
        decode_state(record)
    # a vector that does not fit the reference comes back whole (the server rejects it)
    short = encode_state({"w": torch.zeros(5)}, packed=True)
    assert list(decode_state(short, like=state)) == [PACKED_KEY]
    # float64 and integers are not packable: one array per tensor, as without packing
    exact = {"d": torch.randn(2, dtype=torch.float64), "n": torch.arange(3)}
    assert list(encode_state(exact, packed=True).keys()) == ["d", "n"]
    assert not packable(exact) and packable(state)


def test_state_round_trip_is_exact_and_keeps_order() -> None:
    state = {
        "b.weight": torch.randn(3, 4),
        "a.bias": torch.randn(4, dtype=torch.float64),
        "counts": torch.arange(5),
        "half": torch.randn(2, 2).half(),
        "scalar": torch.tensor(2.5),
    }
    record = encode_state(state)
    assert isinstance(record, ArrayRecord)
    assert_same(decode_state(record), state)


def test_bfloat16_travels_as_float32_and_comes_back() -> None:
    state = {"w": torch.randn(4, 3).to(torch.bfloat16), "v": torch.randn(2)}
    record = encode_state(state)
    assert record["w"].dtype == "float32"  # ArrayRecord has no bfloat16
    plain = decode_state(record)
    assert plain["w"].dtype == torch.float32
    assert torch.equal(plain["w"], state["w"].float())
    assert_same(decode_state(record, like=state), state)
    assert_same(decode_state(record, like={"w": torch.bfloat16}), state)


def test_decoded_tensors_are_writable_copies() -> None:
    record = encode_state({"w": torch.zeros(3)})
    first = decode_state(record)["w"]
    first += 1
    assert torch.equal(decode_state(record)["w"], torch.zeros(3))


# ------------------------------------------------------------------------ instructions
def test_instructions_round_trip() -> None:
    routing = LossTermSpec(
        "routing-alignment",
        coefficient=0.1,
        options={"form": "batch-kl", "strict": True, "k": 2},
        tensors={
            "target": {"layer.0.mlp": torch.tensor([0.5, 0.25, 0.25])},
            "alpha": {"layer.0.mlp": torch.tensor([1.0, 0.5, 2.0])},
        },
    )
    instructions = TrainInstructions(
        loss_terms=[LossTermSpec("proximal", coefficient=0.125), routing],
        collect_statistics=True,
        start_parameters={"layer.0.mlp.experts.w": torch.randn(3, 2).to(torch.bfloat16)},
    )
    records = encode_instructions(instructions)
    assert isinstance(records[INSTRUCTIONS_KEY], ConfigRecord)
    assert isinstance(records[INSTRUCTION_TENSORS_KEY], ArrayRecord)
    content = RecordDict(dict(records))
    like = {"layer.0.mlp.experts.w": torch.zeros(3, 2, dtype=torch.bfloat16)}
    decoded = decode_instructions(content, like=like)
    assert [t.name for t in decoded.loss_terms] == ["proximal", "routing-alignment"]
    assert decoded.loss_terms[0].coefficient == 0.125
    assert decoded.loss_terms[0].tensors == {}
    decoded_routing = decoded.loss_terms[1]
    assert decoded_routing.coefficient == 0.1
    assert decoded_routing.options == {"form": "batch-kl", "strict": True, "k": 2}
    assert_same(decoded_routing.tensors["target"], routing.tensors["target"])
    assert_same(decoded_routing.tensors["alpha"], routing.tensors["alpha"])
    assert decoded.collect_statistics is True
    assert decoded.start_parameters is not None
    assert_same(decoded.start_parameters, instructions.start_parameters or {})


def test_default_instructions_round_trip_and_missing_instructions() -> None:
    decoded = decode_instructions(RecordDict(dict(encode_instructions(TrainInstructions()))))
    assert decoded == TrainInstructions()
    assert decoded.start_parameters is None
    # an empty (not None) personalised start stays empty
    empty = decode_instructions(
        RecordDict(dict(encode_instructions(TrainInstructions(start_parameters={}))))
    )
    assert empty.start_parameters == {}
    # a message from a Flower built-in strategy carries no instructions
    assert decode_instructions(RecordDict({ARRAYS_KEY: ArrayRecord()})) == TrainInstructions()


# ---------------------------------------------------------------- statistics and replies
def test_statistics_round_trip() -> None:
    statistics = {
        "encoder.layer.2.intermediate": layer_statistics(0),
        "encoder.layer.3.intermediate": layer_statistics(1),
    }
    decoded = decode_statistics(encode_statistics(statistics))
    assert list(decoded) == list(statistics)
    for layer, stats in statistics.items():
        assert_same(decoded[layer].to_tensors(), stats.to_tensors())
        assert decoded[layer].num_tokens == 13
    assert decode_statistics(encode_statistics({})) == {}


def test_reply_round_trip_and_built_in_strategy_compatibility() -> None:
    result = ClientResult(
        client_id=2,
        num_examples=37,
        parameters={"router.weight": torch.randn(4, 6), "head.bias": torch.randn(3)},
        routing_statistics={"moe": layer_statistics(3)},
        metrics={"task_loss": 1.25, "routing_loss": 0.5, "steps": 3.0},
    )
    content = encode_reply(result, bytes_sent=100, bytes_received=80, optimizer_state_bytes=64)
    # exactly one ArrayRecord and one MetricRecord with num-examples: FedAvg accepts it
    validate_message_reply_consistency([content, content], "num-examples", True)
    reply = decode_reply(content, like=result.parameters)
    assert reply.result.client_id == 2
    assert reply.result.num_examples == 37
    assert reply.result.metrics == result.metrics
    assert_same(reply.result.parameters, result.parameters)
    assert_same(
        reply.result.routing_statistics["moe"].to_tensors(),
        result.routing_statistics["moe"].to_tensors(),
    )
    assert (reply.bytes_sent, reply.bytes_received, reply.optimizer_state_bytes) == (100, 80, 64)


def test_reply_parameters_restore_bfloat16() -> None:
    result = ClientResult(
        client_id=0, num_examples=1, parameters={"w": torch.randn(3).to(torch.bfloat16)}
    )
    reply = decode_reply(encode_reply(result), like={"w": torch.zeros(3, dtype=torch.bfloat16)})
    assert_same(reply.result.parameters, result.parameters)


@pytest.mark.parametrize("method", ["bf16", "int8", "int4", "int3", "int2", "topk"])
def test_compressed_reply_travels_compressed(method: str) -> None:
    delta = {"router.weight": torch.randn(4, 6), "head.bias": torch.randn(3)}
    update, _ = compress_update(delta, method, fraction=0.5)
    result = ClientResult(client_id=1, num_examples=5, parameters={}, update=update)
    content = encode_reply(result)
    arrays = content.array_records[ARRAYS_KEY]
    # the wire holds the payload's real size (bf16 as int16 bit patterns, not float32)
    assert sum(array.numpy().nbytes for array in arrays.values()) == tensor_bytes(update)
    reply = decode_reply(content, like={"router.weight": torch.zeros(4, 6)})
    assert reply.result.parameters == {} and reply.result.update is not None
    assert list(reply.result.update) == list(update)
    for name, packed in update.items():
        decoded = reply.result.update[name]
        assert (decoded.method, decoded.shape) == (packed.method, packed.shape)
        assert_same(decoded.parts, packed.parts)


# ------------------------------------------------------------------------ configuration
def pyproject_run_config() -> dict:
    with (REPO / "pyproject.toml").open("rb") as handle:
        data = tomllib.load(handle)
    return flatten_dict(data["tool"]["flwr"]["app"]["config"])


def test_pyproject_run_config_lists_every_key_and_is_valid() -> None:
    """Flower only accepts --run-config overrides of keys present in pyproject.toml."""
    flat = pyproject_run_config()
    config, options = config_from_run_config(flat)
    config.validate()
    # one source of defaults: pyproject's values are the dataclasses', key by key
    defaults = run_config_from_config(ExperimentConfig(), FlowerOptions())
    assert list(flat) == list(defaults)
    for key, value in defaults.items():
        assert flat[key] == value, key
    assert config.to_dict() == ExperimentConfig().to_dict()
    assert config.model.lora_targets == ["query", "value"]
    assert options == FlowerOptions()
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    components = data["tool"]["flwr"]["app"]["components"]
    assert components["serverapp"] == "fedalign.flower.server_app:app"
    assert components["clientapp"] == "fedalign.flower.client_app:app"


def test_run_config_round_trip_and_errors() -> None:
    config = ExperimentConfig()
    config.model.name = "tiny-qwen3moe"
    config.model.lora_targets = ["q_proj", "v_proj"]
    config.strategy.ablation = "adaptive-reg"
    config.train.keep_optimizer_state = True
    options = FlowerOptions(discovery_timeout=5.0, round_timeout=7.0)
    back, back_options = config_from_run_config(run_config_from_config(config, options))
    assert back.to_dict() == config.to_dict()
    assert back_options == options
    with pytest.raises(ConfigError, match="unknown config key"):
        config_from_run_config({"model.nmae": "x"})
    with pytest.raises(ConfigError, match=r"accepted in \[flower\]"):
        config_from_run_config({"flower.timeout": 1.0})
    with pytest.raises(ConfigError, match="expects a number"):
        config_from_run_config({"flower.round-timeout": "soon"})


def test_partition_from_node_config() -> None:
    assert partition_from_node_config({"partition-id": 2, "num-partitions": 3}) == (2, 3)
    with pytest.raises(ConfigError, match="--node-config"):
        partition_from_node_config({})
    with pytest.raises(ConfigError, match=r"must be in \[0, num-partitions=3\)"):
        partition_from_node_config({"partition-id": 3, "num-partitions": 3})


def test_model_fingerprint_covers_frozen_weights_only() -> None:
    from fedalign.config import ModelConfig
    from fedalign.models import load_moe_model

    config = ModelConfig(name="tiny-upcycled", max_length=16)
    model = load_moe_model(config, num_labels=4, seed=0)
    fingerprint = model_fingerprint(model)
    assert fingerprint == model_fingerprint(load_moe_model(config, num_labels=4, seed=0))
    # training changes trainable values only: the fingerprint stays
    model.load_trainable_state({k: v + 1 for k, v in model.trainable_state().items()})
    assert model_fingerprint(model) == fingerprint
    assert model_fingerprint(load_moe_model(config, num_labels=4, seed=1)) != fingerprint
