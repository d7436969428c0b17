"""The Flower strategy wrapper with fake Flower replies (no simulation engine, no network).

* the wrapper's aggregate equals the strategy's own ``aggregate`` on the same results,
  bitwise, for FedAvg and FedAlign-MoE (routing statistics travel through the replies);
* the strategy state lives in the wrapper: round 2's messages carry round 1's ``p_g``;
* node discovery, failed replies, personalised start parameters;
* equivalence: one round from the in-process simulator and one round through the wrapper
  and our ClientApp's handlers (fed the same seed and partition) give the same global model.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedalign[flower]')")

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.app.metadata import Metadata
from flwr.supercore.task_identity import TaskIdentity

from fedalign.config import ExperimentConfig
from fedalign.experiments.run import Simulation
from fedalign.federation import strategy_from_config
from fedalign.flower import client_app
from fedalign.flower.messages import (
    CONFIG_KEY,
    FINGERPRINT_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
    decode_instructions,
    decode_state,
    encode_reply,
    encode_state,
    is_packed,
    model_fingerprint,
    run_config_from_config,
)
from fedalign.flower.strategy import (
    DiscoveryError,
    FlowerStrategy,
    RoundReport,
    discover_partitions,
)
from fedalign.protocol import ClientResult, LayerRoutingStatistics
from fedalign.strategies import FedAlignMoE, FedAvg, Strategy
from tests.helpers import ROUTER_WEIGHT, expert_alpha, global_routing, routing_lambda, toy_layout

LAYOUT = toy_layout(router_params=ROUTER_WEIGHT, hidden_size=3)


def parameters(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "moe.router.weight": torch.randn(2, 3, generator=generator).to(dtype),
        "moe.experts.w": torch.randn(2, 3, 4, generator=generator).to(dtype),
        "head.weight": torch.randn(5, generator=generator).to(dtype),
    }


def statistics(seed: int) -> dict[str, LayerRoutingStatistics]:
    generator = torch.Generator().manual_seed(100 + seed)
    distribution = torch.softmax(torch.randn(2, generator=generator), dim=0)
    return {
        "moe": LayerRoutingStatistics(
            routing_distribution=distribution,
            usage=distribution.clone(),
            margin=torch.rand(2, generator=generator),
            mean_hidden=torch.randn(2, 3, generator=generator),
            token_count=torch.tensor([7.0, 5.0]),
            num_tokens=12,
        )
    }


def client_results(server_round: int, dtype: torch.dtype = torch.float32) -> list[ClientResult]:
    return [
        ClientResult(
            client_id=cid,
            num_examples=10 + 7 * cid,
            parameters=parameters(10 * server_round + cid, dtype),
            routing_statistics=statistics(10 * server_round + cid),
            metrics={"task_loss": 1.0 + cid, "routing_loss": 0.1 * cid},
        )
        for cid in range(3)
    ]


NODES = {0: 101, 1: 202, 2: 303}  # partition id -> node id


@pytest.fixture(autouse=True)
def server_identity() -> Iterator[None]:
    """Messages take their run and source from the process's task identity, which the
    ServerApp runtime sets; here the tests play the ServerApp."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def as_delivered(message: Message, message_id: str) -> Message:
    """``message`` as the SuperLink hands it on: with a message id and a source node."""
    metadata = message.metadata
    delivered = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=1,
        dst_node_id=metadata.dst_node_id,
        reply_to_message_id="",
        group_id=metadata.group_id,
        created_at=metadata.created_at,
        ttl=metadata.ttl,
        message_type=metadata.message_type,
    )
    return Message(content=message.content, metadata=delivered)


class FakeGrid:
    """A Grid stand-in: ``respond(message)`` plays the node a message is addressed to."""

    def __init__(
        self, nodes: dict[int, int], respond: Callable[[Message, int], RecordDict | Error | None]
    ) -> None:
        self.nodes = nodes  # node id -> partition id
        self.respond = respond
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = []
        for index, message in enumerate(messages):
            self.sent.append(message)
            delivered = as_delivered(message, f"m{len(self.sent)}-{index}")
            answer = self.respond(delivered, self.nodes[message.metadata.dst_node_id])
            if answer is not None:
                replies.append(Message(answer, reply_to=delivered))
        return replies


def partition_answer(message: Message, partition_id: int, count: int = 3) -> RecordDict:
    assert message.metadata.message_type == MessageType.QUERY
    answer = ConfigRecord({PARTITION_ID_KEY: partition_id, NUM_PARTITIONS_KEY: count})
    return RecordDict({CONFIG_KEY: answer})


def wrap(strategy: Strategy, initial: dict[str, torch.Tensor], **kwargs: Any) -> FlowerStrategy:
    return FlowerStrategy(strategy, initial, num_clients=3, seed=0, **kwargs)


def run_round(
    wrapper: FlowerStrategy, grid: FakeGrid, server_round: int
) -> tuple[list[Message], Any]:
    """configure_train -> the fake nodes -> aggregate_train, as ``Strategy.start`` does."""
    messages = list(
        wrapper.configure_train(server_round, wrapper.initial_arrays(), ConfigRecord(), grid)
    )
    replies = grid.send_and_receive(messages)
    return messages, wrapper.aggregate_train(server_round, replies)


def replying_with(results: dict[int, list[ClientResult]]):
    """Fake nodes that answer train messages with prepared results (per round)."""

    def respond(message: Message, partition_id: int) -> RecordDict:
        if message.metadata.message_type == MessageType.QUERY:
            return partition_answer(message, partition_id)
        server_round = int(message.content[CONFIG_KEY][SERVER_ROUND_KEY])
        return encode_reply(results[server_round][partition_id])

    return respond


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fedavg_aggregate_equals_the_strategy_on_the_same_results(dtype: torch.dtype) -> None:
    initial = parameters(0, dtype)
    results = {1: client_results(1, dtype)}
    grid = FakeGrid({v: k for k, v in NODES.items()}, replying_with(results))
    wrapper = wrap(FedAvg(LAYOUT), initial)
    messages, (arrays, metrics) = run_round(wrapper, grid, 1)

    expected = FedAvg(LAYOUT).aggregate(1, initial, results[1], {})
    for name, value in expected.parameters.items():
        assert wrapper.global_parameters[name].dtype == dtype
        assert torch.equal(wrapper.global_parameters[name], value), name
    decoded = decode_state(arrays, like=initial)
    assert all(torch.equal(decoded[k], expected.parameters[k]) for k in decoded)
    # one message per client, to the node serving its partition, with its partition id
    train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
    assert sorted(m.metadata.dst_node_id for m in train) == sorted(NODES.values())
    for message in train:
        config = message.content[CONFIG_KEY]
        assert NODES[int(config[PARTITION_ID_KEY])] == message.metadata.dst_node_id
        assert int(config[SERVER_ROUND_KEY]) == 1
    assert metrics["num-clients"] == 3
    assert metrics["train_loss"] == pytest.approx(2.0)


def test_fedalign_state_lives_in_the_wrapper_between_rounds() -> None:
    """Two FedAlign-MoE rounds: same aggregate as the strategy driven by hand, and round 2's
    messages carry the global routing distribution and expert strengths of round 1."""
    initial = parameters(0)
    results = {1: client_results(1), 2: client_results(2)}
    grid = FakeGrid({v: k for k, v in NODES.items()}, replying_with(results))
    wrapper = wrap(FedAlignMoE(LAYOUT, routing_lambda=0.3), initial)
    reference = FedAlignMoE(LAYOUT, routing_lambda=0.3)

    state = reference.initial_state()
    global_parameters = initial
    for server_round in (1, 2):
        instructions = reference.configure_train(server_round, [0, 1, 2], state)
        messages, _ = run_round(wrapper, grid, server_round)
        for message in messages:
            cid = int(message.content[CONFIG_KEY][PARTITION_ID_KEY])
            sent = decode_instructions(message.content)
            assert routing_lambda(sent) == routing_lambda(instructions[cid])
            assert sent.collect_statistics is True
            assert global_routing(sent).keys() == global_routing(instructions[cid]).keys()
            for layer, value in global_routing(instructions[cid]).items():
                assert torch.equal(global_routing(sent)[layer], value)
            for layer, value in expert_alpha(instructions[cid]).items():
                assert torch.equal(expert_alpha(sent)[layer], value)
        outcome = reference.aggregate(server_round, global_parameters, results[server_round], state)
        state, global_parameters = outcome.state, outcome.parameters
        for name, value in global_parameters.items():
            assert torch.equal(wrapper.global_parameters[name], value), (server_round, name)
        assert torch.equal(
            wrapper.server.strategy_state["global_routing"]["moe"], state["global_routing"]["moe"]
        )
    # round 2 used p_g from round 1: lambda switched on
    assert routing_lambda(decode_instructions(messages[0].content)) == 0.3


def test_on_round_report_and_server_evaluation() -> None:
    initial = parameters(0)
    grid = FakeGrid({v: k for k, v in NODES.items()}, replying_with({1: client_results(1)}))
    reports: list[RoundReport] = []

    def on_round(report: RoundReport) -> dict[str, Any]:
        reports.append(report)
        return {"train_loss": 1.5, "routing_loss": 0.0, "global_accuracy": 0.75}

    wrapper = wrap(FedAvg(LAYOUT), initial, on_round=on_round)
    run_round(wrapper, grid, 1)
    (report,) = reports
    assert report.selected == [0, 1, 2]
    assert [r.result.client_id for r in report.replies] == [0, 1, 2]
    assert report.failed == []
    assert report.replies[2].result.num_examples == 24
    assert torch.equal(
        report.replies[1].result.routing_statistics["moe"].mean_hidden,
        statistics(11)["moe"].mean_hidden,
    )
    evaluation = wrapper.server_evaluation(1, wrapper.initial_arrays())
    assert evaluation is not None and evaluation["global_accuracy"] == 0.75
    assert wrapper.server_evaluation(0, wrapper.initial_arrays()) is None


def run_start(
    overlap: bool, on_round: Any, grid: FakeGrid, rounds: int = 3
) -> tuple[FlowerStrategy, Any, list[int]]:
    """``start`` for ``rounds`` FedAlign-MoE rounds; also returns the rounds passed to
    ``evaluate_fn``, in call order."""
    wrapper = wrap(
        FedAlignMoE(LAYOUT, routing_lambda=0.3),
        parameters(0),
        on_round=on_round,
        overlap_records=overlap,
    )
    evaluated: list[int] = []

    def evaluate_fn(server_round: int, arrays: Any) -> Any:
        evaluated.append(server_round)
        return wrapper.server_evaluation(server_round, arrays)

    result = wrapper.start(
        grid=grid,  # type: ignore[arg-type]
        initial_arrays=wrapper.initial_arrays(),
        num_rounds=rounds,
        evaluate_fn=evaluate_fn,
    )
    return wrapper, result, evaluated


def test_overlapped_records_see_their_round_and_change_nothing_sent() -> None:
    """With ``overlap_records`` round r's records run while round r + 1 is dispatched: the
    messages, the final state, the records and the evaluation metrics are those of a run
    without overlap, and each report describes its own round's server state."""
    results = {r: client_results(r) for r in (1, 2, 3)}
    runs = {}
    for overlap in (False, True):
        grid = FakeGrid({v: k for k, v in NODES.items()}, replying_with(results))
        seen: list[tuple[int, dict[str, torch.Tensor], int]] = []

        def on_round(report: RoundReport, seen: list[Any] = seen) -> dict[str, Any]:
            state = report.server.state_dict()
            seen.append((report.server_round, dict(state["global_parameters"]), state["round"]))
            return {"train_loss": 1.0, "global_accuracy": report.server_round / 10}

        wrapper, result, evaluated = run_start(overlap, on_round, grid)
        runs[overlap] = (wrapper, result, evaluated, seen, grid.sent)
    (plain, plain_result, plain_evaluated, plain_seen, plain_sent) = runs[False]
    (lapped, lapped_result, lapped_evaluated, lapped_seen, lapped_sent) = runs[True]
    assert [r for r, _, _ in lapped_seen] == [1, 2, 3]
    for (r, plain_params, plain_round), (_, lapped_params, lapped_round) in zip(
        plain_seen, lapped_seen, strict=True
    ):
        assert plain_round == lapped_round == r
        assert all(torch.equal(plain_params[k], lapped_params[k]) for k in plain_params)
    for name, value in plain.global_parameters.items():
        assert torch.equal(lapped.global_parameters[name], value), name
    assert len(plain_sent) == len(lapped_sent)
    for a, b in zip(plain_sent, lapped_sent, strict=True):
        if a.metadata.message_type != MessageType.TRAIN:
            continue
        assert routing_lambda(decode_instructions(a.content)) == routing_lambda(
            decode_instructions(b.content)
        )
        sent_a, sent_b = (
            decode_state(m.content.array_records["arrays"], like=parameters(0)) for m in (a, b)
        )
        assert all(torch.equal(sent_a[k], sent_b[k]) for k in sent_a)
    assert plain_evaluated == [0, 1, 2, 3] and lapped_evaluated == [0, 1, 2, 3]
    for r in (1, 2, 3):
        assert lapped_result.evaluate_metrics_serverapp[r]["global_accuracy"] == r / 10
        assert (
            plain_result.evaluate_metrics_serverapp[r]
            == lapped_result.evaluate_metrics_serverapp[r]
        )
        assert lapped.lines[r] == plain.lines[r]


def test_records_of_a_round_run_while_the_next_round_is_sent() -> None:
    """Round 1's records wait until round 2's messages have gone out: this finishes only
    when they run in a thread (``overlap_records``)."""
    results = {r: client_results(r) for r in (1, 2)}
    round_two_sent = threading.Event()
    respond = replying_with(results)

    def respond_and_signal(message: Message, partition_id: int) -> RecordDict:
        if message.metadata.message_type == MessageType.TRAIN and message.metadata.group_id == "2":
            round_two_sent.set()
        return respond(message, partition_id)

    grid = FakeGrid({v: k for k, v in NODES.items()}, respond_and_signal)

    def on_round(report: RoundReport) -> dict[str, Any]:
        if report.server_round == 1:
            assert round_two_sent.wait(timeout=30), "round 2 was not sent while recording round 1"
        return {"train_loss": 1.0}

    wrapper, _, evaluated = run_start(True, on_round, grid, rounds=2)
    assert evaluated == [0, 1, 2] and set(wrapper.lines) == {1, 2}


def test_an_error_in_overlapped_records_reaches_the_server() -> None:
    grid = FakeGrid({v: k for k, v in NODES.items()}, replying_with({1: client_results(1)}))

    def on_round(report: RoundReport) -> dict[str, Any]:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_start(True, on_round, grid, rounds=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_arrays_aggregate_exactly_and_a_bad_length_is_rejected(dtype: torch.dtype) -> None:
    """flower.pack-arrays: one packed array each way gives the aggregate of the named form; a
    reply whose packed vector does not fit the model is rejected with a reason, not fatal."""
    initial = parameters(0, dtype)
    results = client_results(1, dtype)

    def respond(message: Message, partition_id: int) -> RecordDict:
        if message.metadata.message_type == MessageType.QUERY:
            return partition_answer(message, partition_id)
        assert is_packed(message.content["arrays"])
        result = results[partition_id]
        if partition_id == 2:
            result = dataclasses.replace(result, parameters={"w": torch.zeros(3, dtype=dtype)})
        return encode_reply(result, packed=True)

    grid = FakeGrid({v: k for k, v in NODES.items()}, respond)
    reports: list[RoundReport] = []
    wrapper = wrap(
        FedAvg(LAYOUT), initial, pack_arrays=True, on_round=lambda r: reports.append(r) or {}
    )
    _, (arrays, _) = run_round(wrapper, grid, 1)
    assert arrays is not None and is_packed(arrays)
    assert list(reports[0].rejected) == [2]
    expected = FedAvg(LAYOUT).aggregate(1, initial, results[:2], {})
    for name, value in expected.parameters.items():
        assert wrapper.global_parameters[name].dtype == dtype
        assert torch.equal(wrapper.global_parameters[name], value), name
    assert all(
        torch.equal(v, expected.parameters[k])
        for k, v in decode_state(arrays, like=initial).items()
    )


def test_failed_reply_is_left_out() -> None:
    initial = parameters(0)
    results = client_results(1)
    respond_ok = replying_with({1: results})

    def respond(message: Message, partition_id: int) -> RecordDict | Error | None:
        if message.metadata.message_type == MessageType.TRAIN and partition_id == 1:
            return Error(code=0, reason="out of memory")
        if message.metadata.message_type == MessageType.TRAIN and partition_id == 2:
            return None  # no reply before the timeout
        return respond_ok(message, partition_id)

    grid = FakeGrid({v: k for k, v in NODES.items()}, respond)
    reports: list[RoundReport] = []
    wrapper = wrap(FedAvg(LAYOUT), initial, on_round=lambda r: reports.append(r) or {})
    run_round(wrapper, grid, 1)
    assert reports[0].failed == [1, 2]
    expected = FedAvg(LAYOUT).aggregate(1, initial, results[:1], {})
    assert all(torch.equal(wrapper.global_parameters[k], v) for k, v in expected.parameters.items())


def test_no_reply_keeps_the_global_model() -> None:
    initial = parameters(0)

    def respond(message: Message, partition_id: int) -> RecordDict | None:
        if message.metadata.message_type == MessageType.QUERY:
            return partition_answer(message, partition_id)
        return None

    wrapper = wrap(FedAvg(LAYOUT), initial)
    _, (arrays, metrics) = run_round(
        wrapper, FakeGrid({v: k for k, v in NODES.items()}, respond), 1
    )
    assert arrays is None and metrics is None
    assert all(torch.equal(wrapper.global_parameters[k], v) for k, v in initial.items())


def test_personalised_parameters_are_sent_as_start_parameters() -> None:
    class Personalising(FedAvg):
        def aggregate(self, server_round, global_parameters, results, state):  # type: ignore[no-untyped-def]
            outcome = super().aggregate(server_round, global_parameters, results, state)
            outcome.client_parameters = {
                r.client_id: {"head.weight": torch.full((5,), float(r.client_id))} for r in results
            }
            return outcome

    initial = parameters(0)
    results = {1: client_results(1), 2: client_results(2)}
    grid = FakeGrid({v: k for k, v in NODES.items()}, replying_with(results))
    wrapper = wrap(Personalising(LAYOUT), initial)
    first, _ = run_round(wrapper, grid, 1)
    assert all(decode_instructions(m.content).start_parameters is None for m in first)
    second, _ = run_round(wrapper, grid, 2)
    for message in second:
        cid = int(message.content[CONFIG_KEY][PARTITION_ID_KEY])
        start = decode_instructions(message.content).start_parameters
        assert start is not None
        assert torch.equal(start["head.weight"], torch.full((5,), float(cid)))


def test_sampling_follows_the_simulator() -> None:
    from fedalign.federation import sample_clients

    initial = parameters(0)
    nodes = {1000 + p: p for p in range(6)}
    grid = FakeGrid(nodes, lambda m, p: partition_answer(m, p, count=6))
    wrapper = FlowerStrategy(FedAvg(LAYOUT), initial, num_clients=6, seed=3, fraction=0.5)
    messages = list(wrapper.configure_train(4, wrapper.initial_arrays(), ConfigRecord(), grid))
    sent_to = sorted(int(m.content[CONFIG_KEY][PARTITION_ID_KEY]) for m in messages)
    assert sent_to == sample_clients(3, 4, 6, 0.5)
    assert all(
        m.metadata.dst_node_id == 1000 + int(m.content[CONFIG_KEY][PARTITION_ID_KEY])
        for m in messages
    )


def test_a_reconnected_node_is_found_again() -> None:
    """A SuperNode that restarts comes back under a new node id: the next round asks the
    unknown node for its partition and sends there."""
    initial = parameters(0)
    results = {1: client_results(1), 2: client_results(2)}
    nodes = {v: k for k, v in NODES.items()}
    grid = FakeGrid(nodes, replying_with(results))
    wrapper = wrap(FedAvg(LAYOUT), initial)
    run_round(wrapper, grid, 1)
    del nodes[202]
    nodes[909] = 1  # partition 1 restarted
    messages, (arrays, _) = run_round(wrapper, grid, 2)
    assert arrays is not None
    assert wrapper.client_nodes == {0: 101, 1: 909, 2: 303}
    queried = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "query"]
    assert queried.count(909) == 1 and queried.count(101) == 1  # 101 asked once, in round 1
    assert 909 in {m.metadata.dst_node_id for m in messages}


def test_discovery_maps_partitions_and_rejects_inconsistent_nodes() -> None:
    grid = FakeGrid({11: 1, 12: 0, 13: 2}, partition_answer)
    assert discover_partitions(grid, timeout=1) == {0: 12, 1: 11, 2: 13}

    duplicate = FakeGrid({11: 0, 12: 0, 13: 2}, partition_answer)
    with pytest.raises(DiscoveryError, match="same partition-id"):
        discover_partitions(duplicate, timeout=1)

    disagree = FakeGrid({11: 0, 12: 1}, lambda m, p: partition_answer(m, p, count=2 + p))
    with pytest.raises(DiscoveryError, match="num-partitions"):
        discover_partitions(disagree, timeout=1)

    missing = FakeGrid({11: 0, 12: 2}, partition_answer)
    with pytest.raises(DiscoveryError, match=r"partition\(s\) \[1\]"):
        discover_partitions(missing, timeout=0.05, poll_interval=0.01)

    failing = FakeGrid({11: 0}, lambda m, p: Error(code=0, reason="no partition-id"))
    with pytest.raises(DiscoveryError, match="no partition-id"):
        discover_partitions(failing, timeout=1)


# ----------------------------------------------------------------------- equivalence
def tiny_config(strategy: str) -> ExperimentConfig:
    config = ExperimentConfig()
    config.model.name = "tiny-upcycled"
    config.model.max_length = 24
    config.data.max_train_examples = 240
    config.data.max_test_examples = 80
    config.partition.num_clients = 3
    config.partition.alpha = 0.5
    config.partition.min_client_size = 10
    config.federated.rounds = 10  # with eval-every 10: no evaluation in these tests
    config.federated.eval_every = 10
    config.train.local_steps = 2
    config.train.batch_size = 8
    config.train.lr = 1e-3
    config.strategy.name = strategy
    config.strategy.stats_max_examples = 32
    config.run.progress = False
    return config


def client_context(config: ExperimentConfig, partition_id: int) -> Context:
    return Context(
        run_id=1,
        node_id=NODES[partition_id],
        node_config={PARTITION_ID_KEY: partition_id, NUM_PARTITIONS_KEY: 3},
        state=RecordDict(),
        run_config=run_config_from_config(config),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "rounds", "compression", "packed"),
    [
        ("fedavg", 1, "none", False),
        ("fedalign", 2, "none", True),
        ("fedalign", 2, "topk", True),
        ("fedavg", 2, "bf16", False),
    ],
)
def test_simulator_and_flower_wrapper_give_the_same_aggregate(
    strategy: str, rounds: int, compression: str, packed: bool, tmp_path: Path
) -> None:
    """Same seed, same partition: the simulator's rounds and the wrapper's rounds (with our
    ClientApp's handlers answering, each building its own model and data from the run
    config) give bitwise the same global parameters. FedAlign-MoE runs two rounds so that
    round 2's instructions (p_g, alpha) travel too; compressed uploads travel compressed,
    and the error-feedback residual kept in the node's context matches the simulator's."""
    config = tiny_config(strategy)
    config.federated.upload_compression = compression
    simulation = Simulation(config.copy(), tmp_path / "sim", log=None)
    # the wrapper starts from the simulator's initial state, with its own strategy object
    wrapper = FlowerStrategy(
        strategy_from_config(config, simulation.model.layout),
        simulation.global_parameters,
        num_clients=3,
        seed=config.federated.seed,
        fingerprint=model_fingerprint(simulation.model),
        pack_arrays=packed,
    )
    contexts = {p: client_context(config, p) for p in range(3)}

    def respond(message: Message, partition_id: int) -> RecordDict:
        if message.metadata.message_type == MessageType.QUERY:
            return client_app.query(message, contexts[partition_id]).content
        return client_app.train(message, contexts[partition_id]).content

    grid = FakeGrid({v: k for k, v in NODES.items()}, respond)
    for server_round in range(1, rounds + 1):
        simulation.run_round(server_round)
        _, (arrays, _) = run_round(wrapper, grid, server_round)
        assert arrays is not None
        assert simulation.global_parameters.keys() == wrapper.global_parameters.keys()
        for name, value in simulation.global_parameters.items():
            assert torch.equal(wrapper.global_parameters[name], value), (server_round, name)
    if compression != "none":
        for partition_id, context in contexts.items():
            kept = client_app._load_kept(context, client_app.RESIDUAL_KEY, "residual")
            assert kept is not None
            expected = simulation.simulator.residuals[partition_id]
            assert all(torch.equal(kept[name], expected[name]) for name in expected)
    if strategy == "fedalign":
        assert simulation.simulator.server.strategy_state["global_routing"]
        for layer, value in simulation.simulator.server.strategy_state["global_routing"].items():
            assert torch.equal(wrapper.server.strategy_state["global_routing"][layer], value)


def test_client_refuses_a_different_model(tmp_path: Path) -> None:
    config = tiny_config("fedavg")
    server = Simulation(config.copy(), tmp_path / "server", log=None)
    message = Message(
        content=RecordDict(
            {
                "arrays": encode_state(server.global_parameters),
                CONFIG_KEY: ConfigRecord(
                    {SERVER_ROUND_KEY: 1, PARTITION_ID_KEY: 0, FINGERPRINT_KEY: "0" * 16}
                ),
            }
        ),
        dst_node_id=NODES[0],
        message_type=MessageType.TRAIN,
    )
    with pytest.raises(RuntimeError, match="fingerprint"):
        client_app.train(as_delivered(message, "x"), client_context(config, 0))
    with pytest.raises(RuntimeError, match="partition 0 reached the node of partition 1"):
        client_app.train(as_delivered(message, "y"), client_context(config, 1))


@pytest.mark.slow
def test_client_keeps_optimizer_state_in_context(tmp_path: Path) -> None:
    config = tiny_config("fedavg")
    config.train.keep_optimizer_state = True
    server = Simulation(config.copy(), tmp_path / "server", log=None)
    context = client_context(config, 0)
    for server_round in (1, 2):
        message = Message(
            content=RecordDict(
                {
                    "arrays": encode_state(server.global_parameters),
                    CONFIG_KEY: ConfigRecord({SERVER_ROUND_KEY: server_round}),
                }
            ),
            dst_node_id=NODES[0],
            message_type=MessageType.TRAIN,
        )
        reply = client_app.train(as_delivered(message, f"r{server_round}"), context)
        assert int(reply.content["fedalign.client"]["optimizer-state-bytes"]) > 0
        assert client_app.OPTIMIZER_STATE_KEY in context.state


def test_client_evaluate_on_local_test_split(tmp_path: Path) -> None:
    config = tiny_config("fedavg")
    server = Simulation(config.copy(), tmp_path / "server", log=None)
    message = Message(
        content=RecordDict({"arrays": encode_state(server.global_parameters)}),
        dst_node_id=NODES[2],
        message_type=MessageType.EVALUATE,
    )
    reply = client_app.evaluate(as_delivered(message, "e"), client_context(config, 2))
    metrics = reply.content["metrics"]
    assert int(metrics["num-examples"]) == len(server.data.client_test[2])
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_query_without_node_config_names_the_flag() -> None:
    message = Message(
        content=RecordDict({CONFIG_KEY: ConfigRecord()}),
        dst_node_id=1,
        message_type=MessageType.QUERY,
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(Exception, match="--node-config"):
        client_app.query(as_delivered(message, "q"), context)
