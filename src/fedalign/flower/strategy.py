"""Any of our strategies as a Flower strategy, holding the strategy state between rounds.

:class:`FlowerStrategy` subclasses ``flwr.serverapp.strategy.Strategy``. It contains no
algorithm: each round it calls

* :func:`fedalign.federation.sample_clients` to pick the round's clients (the simulator's
  seeded sampling, so both pick the same partitions),
* :meth:`fedalign.federation.ServerState.instructions` for their instructions, sent with
  the global parameters to the SuperNode serving each partition, and
* :meth:`fedalign.federation.ServerState.aggregate` / ``adopt`` on the decoded replies, in
  client order,

so the global parameters, the strategy state and any personalised parameters live in the
same :class:`~fedalign.federation.ServerState` the simulator uses. Which SuperNode serves
which partition is learnt once with a ``query`` message (:func:`discover_partitions`) and
again whenever a mapped node has gone.

An optional ``on_round`` callback receives a :class:`RoundReport` after every aggregation
(the ServerApp writes the run folder from it and evaluates the global model); the metrics
it returns become the round's MetricRecord and the server-side evaluation result. With
``overlap_records`` the callback of round r runs in a thread while round r + 1's messages go
out and its clients train: it reads a copy of the server state of round r, and it is waited
for before round r + 1 is aggregated (and before :meth:`FlowerStrategy.start` returns), so
the records are written in order and nothing the server sends depends on it.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.serverapp.strategy import Strategy as FlwrStrategy

from fedalign.config import FederatedConfig
from fedalign.federation import SemanticProbeFn, ServerState, sample_clients
from fedalign.flower.messages import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FINGERPRINT_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    QUERY_KEY,
    SERVER_ROUND_KEY,
    ClientReply,
    decode_reply,
    decode_state,
    encode_instructions,
    encode_state,
    record_int,
)
from fedalign.protocol import TrainInstructions
from fedalign.strategies import AggregationResult, Strategy

Tensor = torch.Tensor

# metrics of a round line that also go to Flower's MetricRecords (when present)
_TRAIN_METRICS = ("train_loss", "routing_loss")
_EVALUATION_METRICS = (
    "global_accuracy",
    "global_loss",
    "mean_local_accuracy",
    "worst_local_accuracy",
    "validation_accuracy",
)


class DiscoveryError(RuntimeError):
    """The SuperNodes do not form a complete, consistent set of partitions."""


def discover_partitions(
    grid: Grid,
    *,
    num_partitions: int | None = None,
    timeout: float = 600.0,
    known: Mapping[int, int] | None = None,
    poll_interval: float = 1.0,
    query_timeout: float = 120.0,
) -> dict[int, int]:
    """Ask connected SuperNodes for their partition until every partition has one.

    Each new node gets a ``query`` message; our ClientApp answers with the
    ``partition-id`` and ``num-partitions`` of its node config.

    Parameters
    ----------
    grid : Grid
    num_partitions : int, optional
        The expected number of partitions; learnt from the first reply when not given.
    timeout : float, default 600.0
        Seconds to wait for the set to be complete.
    known : mapping of int to int, optional
        Partition id -> node id already known (still-connected entries are kept).
    poll_interval : float, default 1.0
        Seconds between looks at the connected nodes.
    query_timeout : float, default 120.0
        Seconds to wait for the replies to one batch of queries.

    Returns
    -------
    dict of int to int
        Partition id -> node id, for partitions ``0 .. num-partitions - 1``.

    Raises
    ------
    DiscoveryError
        When two nodes claim the same partition, nodes disagree on ``num-partitions``, a
        node's ClientApp fails to answer with its partition, or the timeout passes first.
    """
    deadline = time.monotonic() + timeout
    partition_of: dict[int, int] = {}  # node id -> partition id
    connected = set(grid.get_node_ids())
    for partition_id, node_id in (known or {}).items():
        if node_id in connected:
            partition_of[node_id] = partition_id
    asked: set[int] = set(partition_of)
    while True:
        connected = set(grid.get_node_ids())
        new_nodes = sorted(connected - asked)
        if new_nodes:
            messages = [
                Message(
                    content=RecordDict({CONFIG_KEY: ConfigRecord({QUERY_KEY: "partition"})}),
                    dst_node_id=node_id,
                    message_type=MessageType.QUERY,
                    group_id="fedalign-discovery",
                )
                for node_id in new_nodes
            ]
            answered: set[int] = set()
            for reply in grid.send_and_receive(messages, timeout=query_timeout):
                node_id = reply.metadata.src_node_id
                if reply.has_error():
                    raise DiscoveryError(
                        f"SuperNode {node_id} did not report its partition: {reply.error.reason}"
                    )
                answer = reply.content.config_records.get(CONFIG_KEY, ConfigRecord())
                partition_id = record_int(answer, PARTITION_ID_KEY)
                count = record_int(answer, NUM_PARTITIONS_KEY)
                if num_partitions is not None and count != num_partitions:
                    raise DiscoveryError(
                        f"SuperNode {node_id} reports num-partitions={count}, expected "
                        f"{num_partitions}: every node needs the same num-partitions"
                    )
                num_partitions = count
                partition_of[node_id] = partition_id
                answered.add(node_id)
            # nodes that did not answer in time are asked again on the next pass
            asked.update(answered)
        claimed: dict[int, list[int]] = {}
        for node_id, partition_id in partition_of.items():
            if node_id in connected:
                claimed.setdefault(partition_id, []).append(node_id)
        duplicates = {p: nodes for p, nodes in claimed.items() if len(nodes) > 1}
        if duplicates:
            raise DiscoveryError(
                "several SuperNodes claim the same partition-id "
                f"(partition: nodes) {duplicates}; give each node its own partition-id"
            )
        if num_partitions is not None and set(claimed) == set(range(num_partitions)):
            mapping = {p: nodes[0] for p, nodes in sorted(claimed.items())}
            log(INFO, "Partitions of the SuperNodes (partition: node): %s", mapping)
            return mapping
        if time.monotonic() > deadline:
            missing = (
                sorted(set(range(num_partitions)) - set(claimed))
                if num_partitions is not None
                else "all"
            )
            raise DiscoveryError(
                f"no SuperNode for partition(s) {missing} after {timeout:.0f}s "
                f"({len(connected)} node(s) connected); start one per partition with "
                '--node-config "partition-id=<i> num-partitions=<n>"'
            )
        time.sleep(poll_interval)


@dataclass
class RoundReport:
    """Everything one round produced, for records.

    Parameters
    ----------
    server_round : int
    selected : list of int
        The clients (partition ids) the round was sent to.
    replies : list of ClientReply
        Successful replies, sorted by client id.
    failed : list of int
        Selected clients whose reply was an error or missing.
    instructions : dict of int to TrainInstructions
    outcome : AggregationResult
        Already adopted by ``server``.
    server : ServerState
        The server state after the round.
    started : float
        ``time.perf_counter()`` when the round was configured.
    train_seconds : float
        From configuring the round to having every reply (transport included).
    aggregation_seconds : float
    rejected : dict of int to str, default empty
        Clients whose reply failed validation (:meth:`ServerState.screen`), with the reason;
        they are not in ``replies`` and were never aggregated.
    clipped : dict of int to float, default empty
        Clients whose update was clipped by the screening, with its norm before.
    """

    server_round: int
    selected: list[int]
    replies: list[ClientReply]
    failed: list[int]
    instructions: dict[int, TrainInstructions]
    outcome: AggregationResult
    server: ServerState
    started: float
    train_seconds: float
    aggregation_seconds: float
    rejected: dict[int, str] = field(default_factory=dict)
    clipped: dict[int, float] = field(default_factory=dict)


RoundCallback = Callable[[RoundReport], Mapping[str, Any]]


@dataclass
class _PendingRound:
    selected: list[int]
    instructions: dict[int, TrainInstructions]
    started: float


class _RecordsJob(threading.Thread):
    """``on_round(report)`` in a thread; :meth:`result` joins and returns (or raises)."""

    def __init__(self, callback: RoundCallback, report: RoundReport) -> None:
        super().__init__(name=f"fedalign-records-{report.server_round}")
        self.callback = callback
        self.report = report
        self.line: dict[str, Any] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.line = dict(self.callback(self.report))
        except BaseException as error:  # re-raised in the ServerApp's thread by result()
            self.error = error

    def result(self) -> dict[str, Any]:
        self.join()
        if self.error is not None:
            raise self.error
        return self.line


class FlowerStrategy(FlwrStrategy):
    """One of our strategies as a ``flwr.serverapp.strategy.Strategy``.

    Parameters
    ----------
    strategy : fedalign.strategies.Strategy
        The algorithm (FedAvg, FedProx, FedMoE, FedAlign-MoE and its ablations, ...).
    global_parameters : mapping of str to Tensor
        Initial global trainable parameters (their dtypes are restored on every decode).
    num_clients : int
        Partitions of the federation.
    seed : int, default 0
        ``federated.seed``: seeds client sampling exactly as the simulator does.
    fraction : float, default 1.0
        ``federated.fraction``.
    client_nodes : mapping of int to int, optional
        Partition id -> node id; discovered on the first round when not given.
    fingerprint : str, default ""
        Sent to clients, which refuse to train on a different model (see
        :func:`fedalign.flower.messages.model_fingerprint`); empty skips the check.
    on_round : callable, optional
        Called with a :class:`RoundReport` after each aggregation; returns the round's
        metrics (a line of ``metrics.jsonl``).
    discovery_timeout : float, default 600.0
        Seconds :func:`discover_partitions` may wait.
    clip_update_norm : float, default 0.0
        ``federated.clip-update-norm`` (0 = off), see :meth:`ServerState.screen`.
    screen_norm_multiple : float, default ``FederatedConfig.screen_norm_multiple``
        ``federated.screen-norm-multiple`` (0 = off), see :meth:`ServerState.screen`.
    semantic_probe : callable or None, default None
        ``strategy.semantic-privacy = public-probe``: the server's probe measurement, see
        :class:`~fedalign.federation.ServerState`.
    pack_arrays : bool, default False
        Send the global parameters as one packed array (``flower.pack-arrays``, see
        :func:`fedalign.flower.messages.encode_state`); our ClientApp replies in kind.
    overlap_records : bool, default False
        Run ``on_round`` of round r in a thread while round r + 1 is sent and trained
        (``flower.overlap-evaluation``); :meth:`start` then hands Flower's ``evaluate_fn``
        each round once its records are done. False: ``on_round`` runs inside
        :meth:`aggregate_train`, and :meth:`start` is Flower's.
    """

    def __init__(
        self,
        strategy: Strategy,
        global_parameters: Mapping[str, Tensor],
        *,
        num_clients: int,
        seed: int = 0,
        fraction: float = 1.0,
        client_nodes: Mapping[int, int] | None = None,
        fingerprint: str = "",
        on_round: RoundCallback | None = None,
        discovery_timeout: float = 600.0,
        clip_update_norm: float = 0.0,
        screen_norm_multiple: float = FederatedConfig.screen_norm_multiple,
        semantic_probe: SemanticProbeFn | None = None,
        pack_arrays: bool = False,
        overlap_records: bool = False,
    ) -> None:
        self.strategy = strategy
        self.pack_arrays = pack_arrays
        self.overlap_records = overlap_records
        self.server = ServerState(
            strategy,
            {k: v.detach().clone() for k, v in global_parameters.items()},
            clip_update_norm=clip_update_norm,
            screen_norm_multiple=screen_norm_multiple,
            semantic_probe=semantic_probe,
        )
        self.num_clients = num_clients
        self.seed = seed
        self.fraction = fraction
        self.client_nodes: dict[int, int] = dict(client_nodes or {})
        self.fingerprint = fingerprint
        self.on_round = on_round
        self.discovery_timeout = discovery_timeout
        self.lines: dict[int, dict[str, Any]] = {}
        self._pending: dict[int, _PendingRound] = {}
        self._records: _RecordsJob | None = None
        self._sent: tuple[ArrayRecord, dict[str, Tensor]] | None = None

    @property
    def global_parameters(self) -> dict[str, Tensor]:
        return self.server.global_parameters

    # ------------------------------------------------------------------ Flower API
    def summary(self) -> None:
        """Log what runs."""
        log(INFO, "\t├──> fedalign strategy: %s", self.strategy.name)
        log(INFO, "\t├──> Clients (partitions): %d, fraction %.2f", self.num_clients, self.fraction)
        log(INFO, "\t└──> Sampling seed: %d", self.seed)

    def initial_arrays(self) -> ArrayRecord:
        """The current global parameters as an ArrayRecord (for ``start(initial_arrays=)``)."""
        return encode_state(self.global_parameters, packed=self.pack_arrays)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled client, to the node serving its partition.

        Each message carries the global parameters, ``config`` plus ``server-round``,
        ``partition-id`` and the model fingerprint, and the client's instructions.
        """
        started = time.perf_counter()
        sent = self._sent
        if sent is not None and arrays is sent[0] and sent[1] is self.global_parameters:
            pass  # our own encoding of the current global parameters: nothing to decode
        elif len(arrays) > 0:
            self.server.global_parameters = decode_state(arrays, like=self.global_parameters)
        else:
            arrays = self._encode_global()
        selected = sample_clients(self.seed, server_round, self.num_clients, self.fraction)
        self._ensure_nodes(grid, selected)
        instructions = self.server.instructions(server_round, selected)
        self._pending[server_round] = _PendingRound(selected, instructions, started)
        messages = []
        for client_id in selected:
            train_config = ConfigRecord(dict(config))
            train_config[SERVER_ROUND_KEY] = server_round
            train_config[PARTITION_ID_KEY] = client_id
            if self.fingerprint:
                train_config[FINGERPRINT_KEY] = self.fingerprint
            content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: train_config})
            for key, record in encode_instructions(instructions[client_id]).items():
                content[key] = record
            messages.append(
                Message(
                    content=content,
                    dst_node_id=self.client_nodes[client_id],
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                )
            )
        log(INFO, "configure_train: round %d, clients %s", server_round, selected)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the replies and call the strategy's ``aggregate``.

        Replies that carry an error are left out (and listed in the round's report); with
        none left the global model stays as it was and ``(None, None)`` is returned.
        """
        pending = self._pending.pop(server_round, None)
        if pending is None:
            raise RuntimeError(f"aggregate_train for round {server_round}, never configured")
        self.finish_records()  # round r - 1's records read the state this round replaces
        node_partition = {node: cid for cid, node in self.client_nodes.items()}
        decoded: list[ClientReply] = []
        failed: list[int] = []
        for reply in replies:
            source = reply.metadata.src_node_id
            expected = node_partition.get(source)
            if reply.has_error():
                log(WARNING, "client on node %s failed: %s", source, reply.error.reason)
                if expected is not None:
                    failed.append(expected)
                continue
            client_reply = decode_reply(reply.content, self.global_parameters, expected)
            if expected is not None and client_reply.result.client_id != expected:
                raise RuntimeError(
                    f"node {source} serves partition {expected} but replied as "
                    f"partition {client_reply.result.client_id}"
                )
            decoded.append(client_reply)
        received = {r.result.client_id for r in decoded}
        failed = sorted(set(failed) | (set(pending.selected) - received))
        if failed:
            log(WARNING, "round %d: no result from clients %s", server_round, failed)
        decoded.sort(key=lambda r: r.result.client_id)
        screening = self.server.screen([r.result for r in decoded])
        for client_id, reason in screening.rejected.items():
            log(WARNING, "round %d: rejected client %s: %s", server_round, client_id, reason)
        accepted = {result.client_id: result for result in screening.accepted}
        kept: list[ClientReply] = []
        for client_reply in decoded:  # the screened (maybe clipped) result, once per client
            result = accepted.pop(client_reply.result.client_id, None)
            if result is not None:
                kept.append(dataclasses.replace(client_reply, result=result))
        decoded = kept
        if not decoded:
            log(WARNING, "round %d: no client result, the global model is unchanged", server_round)
            return None, None
        train_seconds = time.perf_counter() - pending.started
        aggregation_started = time.perf_counter()
        outcome = self.server.aggregate(server_round, [r.result for r in decoded], screening)
        aggregation_seconds = time.perf_counter() - aggregation_started
        self.server.adopt(server_round, outcome)
        line: dict[str, Any] = {
            "train_loss": _mean([r.result.metrics.get("task_loss") for r in decoded]),
            "routing_loss": _mean([r.result.metrics.get("routing_loss") for r in decoded]),
        }
        self.lines[server_round] = line
        if self.on_round is not None:
            report = RoundReport(
                server_round=server_round,
                selected=pending.selected,
                replies=decoded,
                failed=failed,
                instructions=pending.instructions,
                outcome=outcome,
                server=self._server_snapshot() if self.overlap_records else self.server,
                started=pending.started,
                train_seconds=train_seconds,
                aggregation_seconds=aggregation_seconds,
                rejected=screening.rejected,
                clipped=screening.clipped,
            )
            if self.overlap_records:
                self._records = _RecordsJob(self.on_round, report)
                self._records.start()
            else:
                self.lines[server_round] = dict(self.on_round(report))
        metrics = MetricRecord(
            {k: float(line[k]) for k in _TRAIN_METRICS if line.get(k) is not None}
        )
        metrics["num-clients"] = len(decoded)
        return self._encode_global(), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the ServerApp evaluates on the server every round."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def server_evaluation(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``evaluate_fn`` for :meth:`start`: the round's server-side evaluation metrics.

        The evaluation itself runs in ``on_round`` (so that it lands in the same
        ``metrics.jsonl`` line as the round); this hands its numbers to Flower. Round 0
        and rounds without evaluation give ``None``.
        """
        line = self.lines.get(server_round, {})
        values = {k: float(line[k]) for k in _EVALUATION_METRICS if line.get(k) is not None}
        return MetricRecord(values) if values else None  # type: ignore[arg-type]

    def finish_records(self) -> None:
        """Wait for the records of the last aggregated round (``overlap_records``); raises
        what ``on_round`` raised."""
        job, self._records = self._records, None
        if job is not None:
            self.lines[job.report.server_round] = job.result()

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's ``Strategy.start``; with ``overlap_records`` the same steps, except that
        round r's ``evaluate_fn`` is called once its records are done (after round r + 1's
        aggregation, or at the end), with round r's arrays."""
        if not self.overlap_records:
            return super().start(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                evaluate_fn,
            )
        log(INFO, "Starting %s strategy (records overlap the next round):", type(self).__name__)
        log(INFO, "\t├── Number of rounds: %d", num_rounds)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        started = time.time()
        waiting: list[tuple[int, ArrayRecord]] = []  # rounds whose evaluate_fn is due

        def evaluate_waiting() -> None:
            while waiting and waiting[0][0] not in self._unfinished_rounds():
                server_round, round_arrays = waiting.pop(0)
                if evaluate_fn is not None:
                    metrics = evaluate_fn(server_round, round_arrays)
                    log(INFO, "Global evaluation, round %d: %s", server_round, metrics)
                    if metrics is not None:
                        result.evaluate_metrics_serverapp[server_round] = metrics

        if evaluate_fn is not None:
            initial = evaluate_fn(0, initial_arrays)
            if initial is not None:
                result.evaluate_metrics_serverapp[0] = initial
        arrays = initial_arrays
        for server_round in range(1, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(server_round, arrays, train_config, grid),
                timeout=timeout,
            )
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            evaluate_replies = grid.send_and_receive(
                messages=self.configure_evaluate(server_round, arrays, evaluate_config, grid),
                timeout=timeout,
            )
            evaluate_metrics = self.aggregate_evaluate(server_round, evaluate_replies)
            if evaluate_metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = evaluate_metrics
            waiting.append((server_round, arrays))
            evaluate_waiting()
        self.finish_records()
        evaluate_waiting()
        log(INFO, "Strategy execution finished in %.2fs", time.time() - started)
        return result

    # ------------------------------------------------------------------- helpers
    def _unfinished_rounds(self) -> set[int]:
        job = self._records
        return {job.report.server_round} if job is not None else set()

    def _encode_global(self) -> ArrayRecord:
        """The global parameters as an ArrayRecord (remembered: :meth:`configure_train`
        does not decode it again)."""
        arrays = encode_state(self.global_parameters, packed=self.pack_arrays)
        self._sent = (arrays, self.global_parameters)
        return arrays

    def _server_snapshot(self) -> ServerState:
        """The server state as it is now, for a records thread: a shallow copy whose
        personalised-parameter dict is its own (:meth:`ServerState.adopt` updates it in
        place; everything else it replaces)."""
        snapshot = copy.copy(self.server)
        snapshot.personal_parameters = dict(self.server.personal_parameters)
        return snapshot

    def _ensure_nodes(self, grid: Grid, selected: Sequence[int]) -> None:
        connected = set(grid.get_node_ids())
        if all(self.client_nodes.get(cid) in connected for cid in selected):
            return
        self.client_nodes = discover_partitions(
            grid,
            num_partitions=self.num_clients,
            timeout=self.discovery_timeout,
            known=self.client_nodes,
        )


def _mean(values: Sequence[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return float(np.mean(present)) if present else None
