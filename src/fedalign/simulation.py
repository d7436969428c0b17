"""The single-machine federated simulator.

One model lives in memory. Each round the selected clients take turns: the global
trainable parameters (plus any personalised start) are written into the model, the client
trains on its examples and reports its parameters and routing statistics, and the strategy
aggregates. Per client, the simulator keeps only what must persist between that client's
rounds (its AdamW state when ``train.keep-optimizer-state`` is on, its personalised experts
when the strategy hands them out), never a model copy.

For upcycled encoders whose lower layers are frozen, the frozen prefix runs once per
example before the first round and its outputs are reused every round.

Everything is seeded from ``federated.seed``: client sampling per round and each client's
shuffling and dropout per (round, client), so a run is reproducible and a resumed run
matches an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedalign.config import ExperimentConfig
from fedalign.data import (
    FederatedData,
    PartitionReport,
    TokenizedData,
    build_federated_data,
    tokenize_dataset,
)
from fedalign.models import MoEModel, load_moe_model
from fedalign.records import RunRecorder, plot_convergence, save_state, tensor_bytes
from fedalign.routing import routing_divergence, semantic_dispersion
from fedalign.strategies import build_strategy
from fedalign.strategies.base import (
    AggregationResult,
    ClientResult,
    RoutingStatistics,
    Strategy,
    StrategyState,
    TrainInstructions,
)
from fedalign.training import (
    ExtraLoss,
    ModelInputs,
    compute_prefix_inputs,
    compute_routing_statistics,
    evaluate,
    train_local,
)

Tensor = torch.Tensor


@dataclass
class PreparedData:
    """Tokenized (and, where possible, prefix-cached) examples for every client.

    ``train`` holds the pooled training data; each client's train and local test rows are
    index tensors into it. ``test`` is the global test set.
    """

    train: ModelInputs
    test: ModelInputs
    client_train: list[Tensor]
    client_test: list[Tensor]
    label_names: list[str]
    report: PartitionReport
    prefix_cached: bool
    seconds: float

    @property
    def num_clients(self) -> int:
        return len(self.client_train)


def _inputs(tokenized: TokenizedData) -> ModelInputs:
    return ModelInputs(
        attention_mask=tokenized.attention_mask,
        labels=tokenized.labels,
        input_ids=tokenized.input_ids,
    )


def prepare_data(
    config: ExperimentConfig, model: MoEModel, federated: FederatedData | None = None
) -> PreparedData:
    """Load, partition, tokenize and (when the model allows it) cache the frozen prefix."""
    started = time.perf_counter()
    seed = config.federated.seed
    if federated is None:
        federated = build_federated_data(config.data, config.partition, seed)
    train = _inputs(
        tokenize_dataset(federated.splits.train, model.tokenizer, config.model.max_length)
    )
    test = _inputs(
        tokenize_dataset(federated.splits.test, model.tokenizer, config.model.max_length)
    )
    cached = model.supports_prefix_cache and config.model.cache_prefix
    if cached:
        batch = 64
        assert train.input_ids is not None and test.input_ids is not None
        train = compute_prefix_inputs(
            model, train.input_ids, train.attention_mask, train.labels, batch
        )
        test = compute_prefix_inputs(model, test.input_ids, test.attention_mask, test.labels, batch)
    return PreparedData(
        train=train,
        test=test,
        client_train=[
            torch.as_tensor(c.train_indices, dtype=torch.long) for c in federated.clients
        ],
        client_test=[torch.as_tensor(c.test_indices, dtype=torch.long) for c in federated.clients],
        label_names=list(federated.splits.train.label_names),
        report=federated.report(),
        prefix_cached=cached,
        seconds=time.perf_counter() - started,
    )


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
    )


def sample_clients(seed: int, server_round: int, num_clients: int, fraction: float) -> list[int]:
    """The clients of one round: ``max(1, round(fraction * N))`` of them, seeded per round."""
    count = max(1, round(fraction * num_clients))
    if count >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round, 7])
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))


def client_seed(seed: int, server_round: int, client_id: int) -> int:
    """A seed for one client's round that does not depend on the order clients run in."""
    return int(np.random.default_rng([seed, server_round, client_id, 11]).integers(2**31 - 1))


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
        Client -> server bytes: parameters, plus statistics when the strategy asked for them.
    """

    result: ClientResult
    optimizer_state: dict[str, Any] | None
    bytes_sent: int
    bytes_received: int


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
    extra_losses: Sequence[ExtraLoss] = (),
    on_step: Callable[[], None] | None = None,
) -> ClientRound:
    """One client's local round; the simulator and the Flower ClientApp both call this.

    Writes the global (then any personalised) parameters into ``model``, trains on the
    client's examples with the seed of ``(federated.seed, server_round, client_id)`` and
    computes its routing statistics.

    Parameters
    ----------
    model : MoEModel
        Modified in place.
    data : PreparedData
        Every client's rows; ``client_id`` picks this client's training rows.
    config : ExperimentConfig
    server_round : int
    client_id : int
    global_parameters : mapping of str to Tensor
        The round's global trainable parameters.
    instructions : TrainInstructions
        From :meth:`Strategy.configure_train`.
    optimizer_state : dict or None, default None
        The client's AdamW state from its previous round.
    extra_losses : sequence of ExtraLoss, default ()
        Further loss terms for :func:`~fedalign.training.train_local`.
    on_step : callable or None, default None
        Called after every local step (progress bars).

    Returns
    -------
    ClientRound
    """
    model.load_trainable_state(global_parameters)
    if instructions.start_parameters:
        model.load_trainable_state(instructions.start_parameters)
    train = data.train.select(data.client_train[client_id])
    seed = client_seed(config.federated.seed, server_round, client_id)
    outcome = train_local(
        model,
        train,
        instructions,
        config.train,
        global_parameters=global_parameters,
        load_balance_coef=config.model.load_balance_coef,
        seed=seed,
        optimizer_state=optimizer_state,
        keep_optimizer_state=config.train.keep_optimizer_state,
        on_step=on_step,
        extra_losses=extra_losses,
    )
    # statistics are computed for every strategy (divergence diagnostics), but only
    # count as uploaded when the strategy asked for them
    statistics = client_statistics(model, train, config, seed)
    sent = tensor_bytes(global_parameters) + tensor_bytes(
        [
            instructions.global_routing,
            instructions.expert_alpha,
            instructions.start_parameters or {},
        ]
    )
    received = tensor_bytes(outcome.parameters)
    if instructions.collect_statistics:
        received += tensor_bytes([s.to_tensors() for s in statistics.values()])
    result = ClientResult(
        client_id=client_id,
        num_examples=len(train),
        parameters=outcome.parameters,
        routing_statistics=statistics,
        metrics=outcome.metrics,
    )
    return ClientRound(result, outcome.optimizer_state, sent, received)


def peak_memory_mib() -> float:
    """Peak resident memory of this process (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def routing_snapshot(
    server_round: int, client_ids: Sequence[int], statistics: Sequence[RoutingStatistics]
) -> dict[str, Any]:
    """Per layer: clients x experts usage and routing distribution, and per expert the
    clients x clients cosine similarity of their mean routed hidden states."""
    layers: dict[str, Any] = {}
    names = sorted({name for stats in statistics for name in stats})
    for name in names:
        present = [s[name] for s in statistics if name in s]
        hidden = torch.stack([s.mean_hidden for s in present])  # (C, E, H)
        unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
        similarity = torch.einsum("ceh,deh->ecd", unit, unit)  # (E, C, C)
        layers[name] = {
            "usage": torch.stack([s.usage for s in present]),
            "routing_distribution": torch.stack([s.routing_distribution for s in present]),
            "semantic_similarity": similarity,
        }
    return {"round": server_round, "clients": list(client_ids), "layers": layers}


@dataclass
class RunSummary:
    """The headline numbers of a finished run."""

    strategy: str
    rounds: int
    final_accuracy: float
    final_loss: float
    best_accuracy: float
    mean_local_accuracy: float
    worst_local_accuracy: float
    seconds: float
    seconds_per_round: float
    bytes_sent: int
    bytes_received: int
    peak_memory_mib: float
    accuracy_curve: list[float] = field(default_factory=list)
    out_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Simulation:
    """One federated experiment in this process.

    Parameters
    ----------
    config : ExperimentConfig
        Validated before anything runs.
    out_dir : Path or None, default None
        Run folder; ``None`` uses ``run.out`` or ``runs/<strategy>-<timestamp>``.
    prepared : PreparedData or None, default None
        Reuse tokenized / cached data (``fedalign compare`` runs several strategies on one).
    resume : bool, default False
        Continue from the run folder's checkpoint.
    log : callable or None, default print
        Receives the one-line summary of each round.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        out_dir: Path | str | None = None,
        *,
        prepared: PreparedData | None = None,
        resume: bool = False,
        log: Callable[[str], None] | None = print,
    ) -> None:
        config.validate()
        self.config = config
        self.log = log or (lambda _message: None)
        if config.run.threads > 0:
            torch.set_num_threads(config.run.threads)
        seed = config.federated.seed
        federated = None
        if prepared is None:
            federated = build_federated_data(config.data, config.partition, seed)
            num_labels = federated.splits.train.num_classes
        else:
            num_labels = len(prepared.label_names)
        self.model = load_moe_model(config.model, num_labels=num_labels, seed=seed)
        self.data = (
            prepared if prepared is not None else prepare_data(config, self.model, federated)
        )
        self.strategy: Strategy = build_strategy(config.strategy, self.model.layout)
        self.global_parameters: dict[str, Tensor] = self.model.trainable_state()
        self.strategy_state: StrategyState = self.strategy.initial_state()
        # what persists per client between its rounds (never a model copy)
        self.optimizer_states: dict[int, dict[str, Any]] = {}
        self.personal_parameters: dict[int, dict[str, Tensor]] = {}
        # further client loss terms (see fedalign.training.ExtraLoss); empty by default
        self.extra_losses: list[ExtraLoss] = []
        self._on_step: Callable[[], None] | None = None
        self.completed_rounds = 0
        self.elapsed = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0
        if out_dir is None:
            out_dir = config.run.out or (
                f"runs/{config.strategy.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            )
        self.recorder = RunRecorder(Path(out_dir))
        if resume:
            self._resume()
        else:
            self.recorder.truncate(0)
        self._write_setup()
        if self.completed_rounds == 0:
            self._record_initial_routing()

    # ------------------------------------------------------------------ records
    def _write_setup(self) -> None:
        self.config.save(self.recorder.folder / "config.toml")
        report = self.data.report
        self.recorder.write_text("partition.md", report.to_markdown() + "\n")
        self.recorder.write_text("partition.csv", report.to_csv())
        self.recorder.write_json("partition.json", report.to_dict())
        self.recorder.write_json("layout.json", self.model.layout.to_dict())

    def save_checkpoint(self) -> None:
        self.recorder.save_checkpoint(
            {
                "round": self.completed_rounds,
                "global_parameters": self.global_parameters,
                "strategy_state": self.strategy_state,
                "optimizer_states": self.optimizer_states,
                "personal_parameters": self.personal_parameters,
                "elapsed": self.elapsed,
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
            }
        )

    def _resume(self) -> None:
        payload = self.recorder.load_checkpoint()
        if payload is None:
            self.recorder.truncate(0)
            return
        self.completed_rounds = int(payload["round"])
        self.global_parameters = payload["global_parameters"]
        self.strategy_state = payload["strategy_state"]
        self.optimizer_states = payload["optimizer_states"]
        self.personal_parameters = payload["personal_parameters"]
        self.elapsed = float(payload["elapsed"])
        self.bytes_sent = int(payload["bytes_sent"])
        self.bytes_received = int(payload["bytes_received"])
        self.recorder.truncate(self.completed_rounds)
        self.log(f"resuming after round {self.completed_rounds}")

    def _record_initial_routing(self) -> None:
        """Round 0 of routing.jsonl: how the initial global model routes each client's data."""
        self.model.load_trainable_state(self.global_parameters)
        clients = list(range(self.data.num_clients))
        seed = self.config.federated.seed
        statistics = [
            client_statistics(
                self.model,
                self.data.train.select(self.data.client_train[c]),
                self.config,
                client_seed(seed, 0, c),
            )
            for c in clients
        ]
        self.recorder.add_routing(routing_snapshot(0, clients, statistics))

    def client_state_bytes(self) -> int:
        """Bytes kept per client between rounds, summed over clients."""
        return tensor_bytes(self.optimizer_states) + tensor_bytes(self.personal_parameters)

    # ------------------------------------------------------------------- rounds
    def _train_client(
        self, server_round: int, client_id: int, instructions: TrainInstructions
    ) -> tuple[ClientResult, int, int]:
        done = run_client_round(
            self.model,
            self.data,
            self.config,
            server_round,
            client_id,
            self.global_parameters,
            instructions,
            self.optimizer_states.get(client_id),
            extra_losses=self.extra_losses,
            on_step=self._on_step,
        )
        if done.optimizer_state is not None:
            self.optimizer_states[client_id] = done.optimizer_state
        return done.result, done.bytes_sent, done.bytes_received

    def evaluate_global(self) -> dict[str, Any]:
        """Global test accuracy and loss; mean and worst local test accuracy."""
        self.model.load_trainable_state(self.global_parameters)
        global_eval = evaluate(self.model, self.data.test)
        local = []
        for indices in self.data.client_test:
            if len(indices) == 0:
                continue
            local.append(evaluate(self.model, self.data.train.select(indices)).accuracy)
        return {
            "global_accuracy": global_eval.accuracy,
            "global_loss": global_eval.loss,
            "mean_local_accuracy": float(np.mean(local)) if local else None,
            "worst_local_accuracy": float(np.min(local)) if local else None,
            "local_accuracy": local,
        }

    def run_round(self, server_round: int) -> dict[str, Any]:
        """Run one round; returns its metrics line."""
        started = time.perf_counter()
        config = self.config
        selected = sample_clients(
            config.federated.seed, server_round, self.data.num_clients, config.federated.fraction
        )
        instructions = self.strategy.configure_train(server_round, selected, self.strategy_state)
        for client_id in selected:
            personal = self.personal_parameters.get(client_id)
            if personal and instructions[client_id].start_parameters is None:
                instructions[client_id].start_parameters = personal
        results: list[ClientResult] = []
        per_client_bytes: dict[int, dict[str, int]] = {}
        for client_id in selected:
            result, sent, received = self._train_client(
                server_round, client_id, instructions[client_id]
            )
            results.append(result)
            per_client_bytes[client_id] = {"sent": sent, "received": received}
        train_seconds = time.perf_counter() - started
        aggregation_started = time.perf_counter()
        outcome = self.strategy.aggregate(
            server_round, self.global_parameters, results, self.strategy_state
        )
        return self.record_round(
            server_round,
            selected,
            results,
            outcome,
            per_client_bytes,
            started=started,
            train_seconds=train_seconds,
            aggregation_seconds=time.perf_counter() - aggregation_started,
        )

    def record_round(
        self,
        server_round: int,
        selected: Sequence[int],
        results: Sequence[ClientResult],
        outcome: AggregationResult,
        per_client_bytes: Mapping[int, Mapping[str, int]],
        *,
        started: float,
        train_seconds: float,
        aggregation_seconds: float,
        client_state_bytes: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Adopt an aggregate, evaluate, write the round's records and checkpoint.

        Shared by :meth:`run_round` and the Flower ServerApp, so both write the same run
        folder. Returns the metrics line.
        """
        config = self.config
        self.global_parameters = outcome.parameters
        self.strategy_state = outcome.state
        self.personal_parameters.update(outcome.client_parameters)
        statistics = [r.routing_statistics for r in results]
        line: dict[str, Any] = {
            "round": server_round,
            "clients": list(selected),
            "train_loss": float(np.mean([r.metrics["task_loss"] for r in results])),
            "routing_loss": float(np.mean([r.metrics["routing_loss"] for r in results])),
        }
        last = server_round == config.federated.rounds
        if server_round % config.federated.eval_every == 0 or last:
            line.update(self.evaluate_global())
        else:
            line.update({"global_accuracy": None, "global_loss": None})
        line["routing_divergence"] = routing_divergence(statistics, None)
        line["semantic_dispersion"] = semantic_dispersion(statistics)
        round_sent = sum(v["sent"] for v in per_client_bytes.values())
        round_received = sum(v["received"] for v in per_client_bytes.values())
        self.bytes_sent += round_sent
        self.bytes_received += round_received
        seconds = time.perf_counter() - started
        self.elapsed += seconds
        line.update(
            {
                "seconds": seconds,
                "train_seconds": train_seconds,
                "aggregation_seconds": aggregation_seconds,
                "bytes_sent": round_sent,
                "bytes_received": round_received,
                "bytes_per_client": {k: dict(v) for k, v in per_client_bytes.items()},
                "client_state_bytes": (
                    self.client_state_bytes() if client_state_bytes is None else client_state_bytes
                ),
                **(extra or {}),
            }
        )
        decision = {"round": server_round, "strategy": self.strategy.name, **outcome.record}
        self.completed_rounds = server_round
        self.recorder.add_round(line, decision)
        self.recorder.add_routing(
            routing_snapshot(server_round, [r.client_id for r in results], statistics)
        )
        self.save_checkpoint()
        return line

    def run(self) -> RunSummary:
        """Run the remaining rounds and write the final records."""
        config = self.config
        total = config.federated.rounds
        progress = None
        if config.run.progress:
            from tqdm.auto import tqdm

            progress = tqdm(
                total=total,
                initial=self.completed_rounds,
                desc=f"{self.strategy.name}",
                unit="round",
                leave=False,
            )
        for server_round in range(self.completed_rounds + 1, total + 1):
            steps = None
            if progress is not None:
                from tqdm.auto import tqdm

                # local training of every selected client, one tick per step
                steps = tqdm(
                    total=self._round_steps(server_round),
                    desc=f"round {server_round} local steps",
                    unit="step",
                    leave=False,
                    position=1,
                )
                self._on_step = functools.partial(steps.update, 1)
            try:
                line = self.run_round(server_round)
            finally:
                self._on_step = None
                if steps is not None:
                    steps.close()
            accuracy = line.get("global_accuracy")
            message = (
                f"[{self.strategy.name}] round {server_round}/{total} "
                f"train_loss={line['train_loss']:.4f} "
                + (f"acc={accuracy:.4f} " if accuracy is not None else "")
                + f"({line['seconds']:.1f}s, {line['bytes_received'] / 2**20:.1f} MiB up)"
            )
            if progress is not None:
                progress.update(1)
                progress.write(message)
            else:
                self.log(message)
        if progress is not None:
            progress.close()
        return self.finish()

    def _round_steps(self, server_round: int) -> int:
        """Local steps the selected clients will take in ``server_round`` (progress bars)."""
        config = self.config
        selected = sample_clients(
            config.federated.seed, server_round, self.data.num_clients, config.federated.fraction
        )
        if config.train.local_steps > 0:
            return config.train.local_steps * len(selected)
        batches = [
            max(math.ceil(len(self.data.client_train[c]) / config.train.batch_size), 1)
            for c in selected
        ]
        return sum(batches) * config.train.local_epochs

    def finish(self) -> RunSummary:
        rows = self.recorder.metrics
        evaluated = [r for r in rows if r.get("global_accuracy") is not None]
        final = evaluated[-1] if evaluated else {}
        summary = RunSummary(
            strategy=self.strategy_label(),
            rounds=self.completed_rounds,
            final_accuracy=float(final.get("global_accuracy", float("nan"))),
            final_loss=float(final.get("global_loss", float("nan"))),
            best_accuracy=max((r["global_accuracy"] for r in evaluated), default=float("nan")),
            mean_local_accuracy=_number(final.get("mean_local_accuracy")),
            worst_local_accuracy=_number(final.get("worst_local_accuracy")),
            seconds=self.elapsed,
            seconds_per_round=self.elapsed / max(self.completed_rounds, 1),
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            peak_memory_mib=peak_memory_mib(),
            accuracy_curve=[r["global_accuracy"] for r in evaluated],
            out_dir=str(self.recorder.folder),
        )
        save_state(self.recorder.folder / "final_state.safetensors", self.global_parameters)
        self.recorder.write_json("summary.json", summary.to_dict())
        plot_convergence(
            {summary.strategy: rows}, self.recorder.folder / "convergence.png", summary.strategy
        )
        return summary

    def strategy_label(self) -> str:
        name = self.config.strategy.name
        if name == "fedalign" and self.config.strategy.ablation != "full":
            return f"fedalign:{self.config.strategy.ablation}"
        return name


def run_experiment(
    config: ExperimentConfig,
    out_dir: Path | str | None = None,
    *,
    resume: bool = False,
    prepared: PreparedData | None = None,
    log: Callable[[str], None] | None = print,
) -> RunSummary:
    """Build a :class:`Simulation` and run it to the end."""
    return Simulation(config, out_dir, prepared=prepared, resume=resume, log=log).run()


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)
