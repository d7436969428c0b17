"""Conversion between our objects and Flower records, and the configuration both apps read.

What travels, per round and selected client:

Server -> client (``message_type="train"``)
    ``"arrays"`` (ArrayRecord)
        The global trainable parameters (:func:`encode_state`): one float32 vector under
        ``fedalign.packed`` (``flower.pack-arrays``, the default), split by the receiver's
        own names and shapes, or one array per tensor.
    ``"config"`` (ConfigRecord)
        ``server-round``, ``partition-id`` (the client the message is meant for) and
        ``fedalign.model-fingerprint`` (see :func:`model_fingerprint`).
    ``"fedalign.instructions"`` (ConfigRecord) and ``"fedalign.instruction-tensors"`` (ArrayRecord)
        The :class:`~fedalign.protocol.TrainInstructions`: in the first, the loss terms
        (name, coefficient, scalar options; JSON under ``loss-terms``) and flags; in the
        second, each term's per-layer tensors keyed ``"term/<i>/<group>/<layer>"`` (e.g.
        ``p_g`` and ``alpha_i(e)``) and personalised start parameters keyed
        ``"start_parameters/<name>"`` (:func:`encode_instructions`). The codec knows no
        algorithm: a new loss term travels without a change here.

Client -> server (the reply)
    ``"arrays"`` (ArrayRecord)
        The client's trainable parameters after local training; with
        ``federated.upload-compression`` the compressed delta instead, its parts keyed
        ``"<name>/<part>"`` (bfloat16 values travel bit for bit as int16), and the methods and
        shapes as JSON under ``update`` in ``"fedalign.client"`` (:func:`encode_update`);
        uncompressed parameters are packed when the train message's were.
    ``"metrics"`` (MetricRecord)
        ``num-examples`` and the training losses.
    ``"fedalign.client"`` (ConfigRecord)
        ``partition-id``, the bytes the round moved, the size of the optimiser state the
        client keeps, and the routing statistics as safetensors bytes under ``statistics``
        (:func:`encode_reply`).

The reply has exactly one ArrayRecord and one MetricRecord, so Flower's built-in strategies
(``flwr.serverapp.strategy.FedAvg`` and friends) accept it too.

Flower's ArrayRecord stores NumPy arrays, which have no bfloat16: :func:`encode_state` casts
bfloat16 tensors to float32 (exact) and :func:`decode_state` casts back to the receiver's
dtypes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedalign.config import ConfigError, ExperimentConfig
from fedalign.models import MoEModel
from fedalign.protocol import (
    ClientResult,
    CompressedTensor,
    LayerRoutingStatistics,
    LossTermSpec,
    RoutingStatistics,
    TrainInstructions,
)

Tensor = torch.Tensor

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
INSTRUCTIONS_KEY = "fedalign.instructions"
INSTRUCTION_TENSORS_KEY = "fedalign.instruction-tensors"
CLIENT_KEY = "fedalign.client"
FINGERPRINT_KEY = "fedalign.model-fingerprint"
NUM_EXAMPLES_KEY = "num-examples"
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
SERVER_ROUND_KEY = "server-round"
QUERY_KEY = "fedalign.query"
PACKED_KEY = "fedalign.packed"
FLOWER_SECTION = "flower"

_SEPARATOR = "/"


# ----------------------------------------------------------------------------- records
def record_int(record: ConfigRecord | MetricRecord, key: str, default: int | None = None) -> int:
    """``record[key]`` as an int (``default`` when absent).

    Raises
    ------
    KeyError
        When the key is absent and no default is given.
    TypeError
        When the value is not a number.
    """
    if key not in record:
        if default is None:
            raise KeyError(f"record has no {key!r}")
        return default
    value = record[key]
    if isinstance(value, bool | int | float):
        return int(value)
    raise TypeError(f"record value {key!r} must be a number (got {type(value).__name__})")


def record_str(record: ConfigRecord, key: str, default: str = "") -> str:
    """``record[key]`` as a str (``default`` when absent or not a string)."""
    value = record.get(key, default)
    return value if isinstance(value, str) else default


# ----------------------------------------------------------------------------- tensors
def _to_numpy(tensor: Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.contiguous().numpy()


_PACKABLE = (torch.float32, torch.bfloat16, torch.float16)


def packable(state: Mapping[str, Tensor]) -> bool:
    """True when every tensor is float32, bfloat16 or float16 (exact in one float32 vector)."""
    return len(state) > 0 and all(t.dtype in _PACKABLE for t in state.values())


def is_packed(record: ArrayRecord) -> bool:
    """True for a record made by ``encode_state(..., packed=True)``."""
    return list(record.keys()) == [PACKED_KEY]


def encode_state(state: Mapping[str, Tensor], *, packed: bool = False) -> ArrayRecord:
    """Tensors as an ArrayRecord (bfloat16 cast to float32; other dtypes kept).

    Parameters
    ----------
    state : mapping of str to Tensor
    packed : bool, default False
        One float32 vector under :data:`PACKED_KEY` (the tensors flattened in the mapping's
        order) instead of one array per key, when :func:`packable`; the receiver splits
        it by the names and shapes of its own reference (:func:`decode_state`). Flower
        moves every array (and every chunk of a large one) as a separate object, one HTTP
        request per hop: a model of 54 tensors is about 110 objects, packed about 3 + one
        per 2 MB.

    Returns
    -------
    ArrayRecord
        One :class:`flwr.app.Array` per key, in the mapping's order, or one packed array.
    """
    if packed and packable(state):
        flat = torch.cat([t.detach().cpu().reshape(-1).float() for t in state.values()])
        return ArrayRecord({PACKED_KEY: Array(flat.numpy())})
    return ArrayRecord({name: Array(_to_numpy(value)) for name, value in state.items()})


def _unpack(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    sizes = [t.numel() for t in like.values()]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        return None
    state: dict[str, Tensor] = {}
    for (name, reference), piece in zip(like.items(), torch.split(vector, sizes), strict=True):
        state[name] = piece.reshape(reference.shape).to(reference.dtype).clone()
    return state


def decode_state(
    record: ArrayRecord, like: Mapping[str, Tensor] | Mapping[str, torch.dtype] | None = None
) -> dict[str, Tensor]:
    """An ArrayRecord back to tensors.

    Parameters
    ----------
    record : ArrayRecord
    like : mapping of str to Tensor or to torch.dtype, optional
        Reference dtypes: a key found here is cast to its dtype (what restores bfloat16).
        A packed record (:func:`encode_state` with ``packed=True``) needs reference
        tensors: it is split by their names, shapes and dtypes, in their order; a vector
        whose length does not match comes back as it is, under :data:`PACKED_KEY`, so that
        the server's screening rejects it with a reason.

    Returns
    -------
    dict of str to Tensor
        Writable CPU tensors, in the record's order (a packed record: the reference's).

    Raises
    ------
    ValueError
        For a packed record without reference tensors.
    """
    if is_packed(record):
        vector = torch.from_numpy(np.array(record[PACKED_KEY].numpy(), copy=True))
        if like is None or not all(isinstance(t, Tensor) for t in like.values()):
            raise ValueError("a packed ArrayRecord needs reference tensors (like=) to unpack")
        unpacked = _unpack(vector, like)  # type: ignore[arg-type]
        return unpacked if unpacked is not None else {PACKED_KEY: vector}
    state: dict[str, Tensor] = {}
    for name, array in record.items():
        tensor = torch.from_numpy(np.array(array.numpy(), copy=True))
        if like is not None and name in like:
            reference = like[name]
            dtype = reference.dtype if isinstance(reference, Tensor) else reference
            if tensor.dtype != dtype:
                tensor = tensor.to(dtype)
        state[name] = tensor
    return state


# ------------------------------------------------------------------------ instructions
_TERMS_KEY = "loss-terms"
_COLLECT_KEY = "collect-statistics"
_HAS_START_KEY = "has-start-parameters"
_START_PREFIX = "start_parameters"
_TERM_PREFIX = "term"


def encode_instructions(instructions: TrainInstructions) -> dict[str, ConfigRecord | ArrayRecord]:
    """TrainInstructions as two records: the terms' scalars and every tensor.

    Parameters
    ----------
    instructions : TrainInstructions

    Returns
    -------
    dict
        ``{INSTRUCTIONS_KEY: ConfigRecord, INSTRUCTION_TENSORS_KEY: ArrayRecord}``.
    """
    tensors: dict[str, Tensor] = {}
    terms = []
    for index, spec in enumerate(instructions.loss_terms):
        terms.append(
            {
                "name": spec.name,
                "coefficient": spec.coefficient,
                "options": dict(spec.options),
                "tensors": sorted(spec.tensors),
            }
        )
        for group, values in spec.tensors.items():
            for layer, tensor in values.items():
                tensors[_SEPARATOR.join((_TERM_PREFIX, str(index), group, layer))] = tensor
    start = instructions.start_parameters
    for name, tensor in (start or {}).items():
        tensors[f"{_START_PREFIX}{_SEPARATOR}{name}"] = tensor
    scalars = ConfigRecord(
        {
            _TERMS_KEY: json.dumps(terms),
            _COLLECT_KEY: instructions.collect_statistics,
            _HAS_START_KEY: start is not None,
        }
    )
    return {INSTRUCTIONS_KEY: scalars, INSTRUCTION_TENSORS_KEY: encode_state(tensors)}


def decode_instructions(
    content: RecordDict, like: Mapping[str, Tensor] | None = None
) -> TrainInstructions:
    """TrainInstructions from a train message (defaults when the message carries none).

    Parameters
    ----------
    content : RecordDict
        The message content (a message from a Flower built-in strategy has no
        instructions: plain local training).
    like : mapping of str to Tensor, optional
        Reference dtypes for personalised start parameters.
    """
    if INSTRUCTIONS_KEY not in content:
        return TrainInstructions()
    scalars = content.config_records[INSTRUCTIONS_KEY]
    decoded = decode_state(content.array_records.get(INSTRUCTION_TENSORS_KEY, ArrayRecord()))
    specs = []
    for index, term in enumerate(json.loads(str(scalars.get(_TERMS_KEY, "[]")))):
        groups: dict[str, dict[str, Tensor]] = {group: {} for group in term["tensors"]}
        prefix = f"{_TERM_PREFIX}{_SEPARATOR}{index}{_SEPARATOR}"
        for key, tensor in decoded.items():
            if key.startswith(prefix):
                group, layer = key[len(prefix) :].split(_SEPARATOR, 1)
                groups[group][layer] = tensor
        specs.append(
            LossTermSpec(term["name"], float(term["coefficient"]), term["options"], groups)
        )
    start = None
    if bool(scalars.get(_HAS_START_KEY, False)):
        prefix = f"{_START_PREFIX}{_SEPARATOR}"
        start = {k[len(prefix) :]: v for k, v in decoded.items() if k.startswith(prefix)}
        if like is not None:
            start = {
                k: v.to(like[k].dtype) if k in like and v.dtype != like[k].dtype else v
                for k, v in start.items()
            }
    return TrainInstructions(
        loss_terms=specs,
        collect_statistics=bool(scalars.get(_COLLECT_KEY, False)),
        start_parameters=start,
    )


# -------------------------------------------------------------------- routing statistics
def encode_statistics(statistics: RoutingStatistics) -> bytes:
    """Per-layer routing statistics as safetensors bytes (keys ``"<layer>/<field>"``)."""
    tensors: dict[str, Tensor] = {}
    for layer, stats in statistics.items():
        for key, value in stats.to_tensors().items():
            tensor = value.detach().cpu()
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()
            tensors[f"{layer}{_SEPARATOR}{key}"] = tensor.contiguous().clone()
    if not tensors:
        return b""
    # safetensors does not keep the order of its tensors: the layer order rides in metadata
    return bytes(save_safetensors(tensors, metadata={"layers": json.dumps(list(statistics))}))


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    metadata: dict[str, str] = header.get("__metadata__") or {}
    return metadata


def decode_statistics(data: bytes) -> RoutingStatistics:
    """The inverse of :func:`encode_statistics` (layers in their original order)."""
    if not data:
        return {}
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in load_safetensors(data).items():
        layer, _, name = key.rpartition(_SEPARATOR)
        grouped.setdefault(layer, {})[name] = tensor
    order = json.loads(_safetensors_metadata(data).get("layers", "[]"))
    layers = [name for name in order if name in grouped]
    layers += sorted(set(grouped) - set(layers))
    return {layer: LayerRoutingStatistics.from_tensors(grouped[layer]) for layer in layers}


# -------------------------------------------------------------------- compressed update
_UPDATE_KEY = "update"


def encode_update(update: Mapping[str, CompressedTensor]) -> tuple[ArrayRecord, str]:
    """A compressed upload as an ArrayRecord of its parts and JSON of methods and shapes.

    ArrayRecord has no bfloat16: bfloat16 parts (``bf16`` values, the low-bit methods'
    scales) travel as their int16 bit patterns (the same two bytes), so the wire carries the
    payload's real size. No method has int16 parts, so every int16 part is read back as
    bfloat16.
    """
    arrays: dict[str, Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for name, compressed in update.items():
        layout[name] = {"method": compressed.method, "shape": list(compressed.shape)}
        for part, tensor in compressed.parts.items():
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.view(torch.int16)
            arrays[f"{name}{_SEPARATOR}{part}"] = tensor
    return encode_state(arrays), json.dumps(layout)


def decode_update(record: ArrayRecord, layout_json: str) -> dict[str, CompressedTensor]:
    """The inverse of :func:`encode_update` (int16 parts back to bfloat16)."""
    layout = json.loads(layout_json)
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in layout}
    for key, tensor in decode_state(record).items():
        name, _, part = key.rpartition(_SEPARATOR)
        if name not in parts:
            raise ValueError(f"compressed part {key!r} names no tensor of the update")
        if tensor.dtype == torch.int16:
            tensor = tensor.view(torch.bfloat16)
        parts[name][part] = tensor
    return {
        name: CompressedTensor(str(item["method"]), tuple(item["shape"]), parts[name])
        for name, item in layout.items()
    }


# ----------------------------------------------------------------------------- replies
@dataclass
class ClientReply:
    """A decoded train reply: the strategy's ClientResult and what the round cost.

    Parameters
    ----------
    result : ClientResult
    bytes_sent : int
        Server -> client bytes of the round, as the client counted them.
    bytes_received : int
        Client -> server bytes (statistics counted only when the strategy asked).
    optimizer_state_bytes : int
        Bytes of state the client keeps between its rounds (optimiser state and
        error-feedback residual).
    """

    result: ClientResult
    bytes_sent: int = 0
    bytes_received: int = 0
    optimizer_state_bytes: int = 0


def encode_reply(
    result: ClientResult,
    *,
    bytes_sent: int = 0,
    bytes_received: int = 0,
    optimizer_state_bytes: int = 0,
    packed: bool = False,
) -> RecordDict:
    """A ClientResult as reply content (see the module docstring for the layout).

    ``packed`` packs the parameters into one array (see :func:`encode_state`); the
    ClientApp does so when the train message's parameters came packed.
    """
    metrics = MetricRecord({NUM_EXAMPLES_KEY: int(result.num_examples)})
    for key, value in result.metrics.items():
        metrics[key] = float(value)
    client = ConfigRecord(
        {
            PARTITION_ID_KEY: int(result.client_id),
            "bytes-sent": int(bytes_sent),
            "bytes-received": int(bytes_received),
            "optimizer-state-bytes": int(optimizer_state_bytes),
            "statistics": encode_statistics(result.routing_statistics),
        }
    )
    if result.update is not None:
        arrays, client[_UPDATE_KEY] = encode_update(result.update)
    else:
        arrays = encode_state(result.parameters, packed=packed)
    return RecordDict(
        {
            ARRAYS_KEY: arrays,
            METRICS_KEY: metrics,
            CLIENT_KEY: client,
        }
    )


def decode_reply(
    content: RecordDict, like: Mapping[str, Tensor] | None = None, client_id: int | None = None
) -> ClientReply:
    """Reply content back to a :class:`ClientReply`.

    Parameters
    ----------
    content : RecordDict
    like : mapping of str to Tensor, optional
        Reference dtypes for the parameters (the global parameters).
    client_id : int, optional
        Used when the reply names no partition (a ClientApp other than ours).
    """
    client = content.config_records.get(CLIENT_KEY, ConfigRecord())
    metric_record = content.metric_records.get(METRICS_KEY)
    if metric_record is None:
        metric_record = next(iter(content.metric_records.values()), MetricRecord())
    arrays = content.array_records.get(ARRAYS_KEY)
    if arrays is None:
        arrays = next(iter(content.array_records.values()), ArrayRecord())
    if PARTITION_ID_KEY in client:
        client_id = record_int(client, PARTITION_ID_KEY)
    if client_id is None:
        raise ValueError("the reply names no partition-id and none was given")
    metrics = {
        key: float(value)
        for key, value in metric_record.items()
        if key != NUM_EXAMPLES_KEY and isinstance(value, int | float)
    }
    statistics = client.get("statistics", b"")
    layout = client.get(_UPDATE_KEY)
    update = decode_update(arrays, layout) if isinstance(layout, str) else None
    result = ClientResult(
        client_id=client_id,
        num_examples=record_int(metric_record, NUM_EXAMPLES_KEY, 0),
        parameters={} if update is not None else decode_state(arrays, like),
        routing_statistics=decode_statistics(statistics if isinstance(statistics, bytes) else b""),
        metrics=metrics,
        update=update,
    )
    return ClientReply(
        result=result,
        bytes_sent=record_int(client, "bytes-sent", 0),
        bytes_received=record_int(client, "bytes-received", 0),
        optimizer_state_bytes=record_int(client, "optimizer-state-bytes", 0),
    )


# ------------------------------------------------------------------------ configuration
@dataclass
class FlowerOptions:
    """The ``flower.*`` keys of the run config (everything else is an ExperimentConfig key).

    Parameters
    ----------
    discovery_timeout : float, default 600.0
        Seconds the ServerApp waits for a SuperNode of every partition to connect.
    round_timeout : float, default 3600.0
        Seconds the ServerApp waits for the replies of one round.
    overwrite : bool, default False
        Replace a run held in ``run.out`` (otherwise such a folder is refused).
    client_cache_mib : float, default 1024.0
        Prepared partition data a ClientApp process keeps for the partitions it served
        (MiB, least recently used dropped first; the current partition always stays). The
        model is kept regardless (one per process).
    pack_arrays : bool, default True
        Send the parameters as one packed float32 array each way (see
        :func:`encode_state`; exact for float32, bfloat16 and float16 parameters). False
        sends one array per tensor, as Flower's own strategies do.
    poll_interval : float, default 0.1
        Seconds between the ServerApp's requests for a round's missing replies (Flower's
        own Grid: 3 s); see :class:`fedalign.flower.grid.PolledGrid`.
    overlap_evaluation : bool, default True
        Evaluate and record round r on the server while round r + 1's clients train (the
        evaluation never changes what the server sends); False: before sending round r + 1,
        as the simulator does. The records are the same either way.
    """

    discovery_timeout: float = 600.0
    round_timeout: float = 3600.0
    overwrite: bool = False
    client_cache_mib: float = 1024.0
    pack_arrays: bool = True
    poll_interval: float = 0.1
    overlap_evaluation: bool = True


def config_from_run_config(
    run_config: Mapping[str, Any],
) -> tuple[ExperimentConfig, FlowerOptions]:
    """An ExperimentConfig (and the Flower options) from a flat Flower run config.

    Parameters
    ----------
    run_config : mapping
        ``context.run_config``: keys ``"section.key"`` (``[tool.flwr.app.config]`` in
        ``pyproject.toml``, flattened by Flower, plus ``--run-config`` overrides). Lists
        (``model.lora-targets``) are comma-separated strings.

    Returns
    -------
    tuple of ExperimentConfig and FlowerOptions
        The experiment configuration is not validated yet (the ServerApp first adopts the
        federation's number of partitions).

    Raises
    ------
    ConfigError
        For an unknown section or key, or a value of the wrong type.
    """
    config = ExperimentConfig()
    options = FlowerOptions()
    option_names = {item.name for item in fields(FlowerOptions)}
    for key, value in run_config.items():
        section, _, name = key.partition(".")
        if section == FLOWER_SECTION:
            field_name = name.replace("-", "_")
            if field_name not in option_names:
                accepted = sorted(n.replace("_", "-") for n in option_names)
                raise ConfigError(
                    f"unknown run config key {key!r}; accepted in [flower]: {accepted}"
                )
            if field_name in ("overwrite", "pack_arrays", "overlap_evaluation"):
                flag = str(value).lower()
                if flag not in ("true", "false", "1", "0"):
                    raise ConfigError(
                        f"run config key {key!r} expects true or false (got {value!r})"
                    )
                setattr(options, field_name, flag in ("true", "1"))
                continue
            try:
                number = float(value)
            except (TypeError, ValueError) as error:
                raise ConfigError(
                    f"run config key {key!r} expects a number (got {value!r})"
                ) from error
            if field_name == "client_cache_mib" and not number >= 0:
                raise ConfigError(
                    f"run config key {key!r} expects a number >= 0 (MiB; got {value!r})"
                )
            if field_name == "poll_interval" and not number > 0:
                raise ConfigError(
                    f"run config key {key!r} expects a number > 0 (seconds; got {value!r})"
                )
            setattr(options, field_name, number)
            continue
        config.set(key, value)
    return config, options


def run_config_from_config(
    config: ExperimentConfig, options: FlowerOptions | None = None
) -> dict[str, bool | int | float | str]:
    """The flat run config that :func:`config_from_run_config` turns back into ``config``."""
    flat: dict[str, bool | int | float | str] = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            flat[f"{section}.{key}"] = value
    for key, value in dataclasses.asdict(options or FlowerOptions()).items():
        flat[f"{FLOWER_SECTION}.{key.replace('_', '-')}"] = value
    return flat


def partition_from_node_config(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` of a SuperNode.

    Raises
    ------
    ConfigError
        When either is missing or out of range, with the flag that sets them.
    """
    hint = (
        'start the SuperNode with --node-config "partition-id=<i> num-partitions=<n>" '
        "(the simulation engine sets both itself)"
    )
    if PARTITION_ID_KEY not in node_config or NUM_PARTITIONS_KEY not in node_config:
        raise ConfigError(f"node config has no {PARTITION_ID_KEY} / {NUM_PARTITIONS_KEY}: {hint}")
    try:
        partition_id = int(node_config[PARTITION_ID_KEY])
        num_partitions = int(node_config[NUM_PARTITIONS_KEY])
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"node config partition-id / num-partitions must be integers: {hint}"
        ) from error
    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"node config partition-id={partition_id} must be in [0, num-partitions="
            f"{num_partitions}): {hint}"
        )
    return partition_id, num_partitions


def model_fingerprint(model: MoEModel) -> str:
    """A short hash of what must match on every machine: frozen weights and the layout.

    Covers the architecture, the number of labels, the trainable parameter names and the
    name, dtype, shape and bytes of every frozen parameter (trainable values travel each
    round, frozen ones never do: server and clients each build them from the seed or the
    model files).
    """
    digest = hashlib.sha256()
    digest.update(f"{model.architecture}|{model.num_labels}|".encode())
    digest.update(",".join(model.trainable_names).encode())
    trainable = set(model.trainable_names)
    for name, parameter in model.model.named_parameters():
        if name in trainable:
            continue
        tensor = parameter.detach().cpu().contiguous()
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
