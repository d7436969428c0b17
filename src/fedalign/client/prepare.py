"""Data, model and caches for a run: the one ``prepare`` every entry point uses.

The simulator, ``fedalign compare``, the benchmark and the Flower apps all call
:func:`prepare`: it builds the partition (seeded), loads the model (seeded, after the
partition, so the order of random draws is the same everywhere), tokenizes, and, where the
model allows it, runs the frozen prefix once per example. A Flower ClientApp asks only for
its own partition's rows; the Flower ServerApp only for the test rows.

The model goes to ``run.device`` with ``run.precision`` (:func:`load_model`); the prepared
examples stay on the CPU and each batch moves to the device when it is used.

With ``strategy.semantic-privacy = public-probe`` the server side (the simulator, or a
Flower server preparing ``include_train=False``) also gets ``PreparedData.probe``:
``strategy.probe-examples`` examples drawn (seeded) from the held-out test pool that
``data.max-test-examples`` left out of the global test set, so the probe never overlaps
the examples of the reported accuracy nor any client's data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedalign.client.inputs import ModelInputs, compute_prefix_inputs
from fedalign.config import ConfigError, ExperimentConfig
from fedalign.data import (
    FederatedData,
    PartitionReport,
    TextDataset,
    build_federated_data,
    tokenize_examples,
)
from fedalign.models import MoEModel, load_moe_model, set_deterministic

Tensor = torch.Tensor

PREFIX_BATCH = 64
"""Examples per batch when the frozen prefix is cached."""

ModelLoader = Callable[[ExperimentConfig, int], MoEModel]
"""``(config, num_labels) -> model``: how a run builds its model (default :func:`load_model`;
a benchmark may pass a cached one)."""


@dataclass
class PreparedData:
    """Tokenized (and, where possible, prefix-cached) examples of the prepared clients.

    ``train`` holds the pooled rows of the prepared clients; ``client_train[c]`` and
    ``client_test[c]`` are index tensors into it. ``test`` is the global test set.

    Parameters
    ----------
    train, test : ModelInputs
    client_train, client_test : dict of int to Tensor
        Only the prepared clients have entries.
    num_clients : int
        Clients in the partition (prepared or not).
    label_names : list of str
    report : PartitionReport
    prefix_cached : bool
    seconds : float
    probe : ModelInputs or None, default None
        The server's probe set (``public-probe`` only).
    validation : ModelInputs or None, default None
        The server's validation set (``data.validation-examples`` > 0 and the global test
        set prepared).
    """

    train: ModelInputs
    test: ModelInputs
    client_train: dict[int, Tensor]
    client_test: dict[int, Tensor]
    num_clients: int
    label_names: list[str]
    report: PartitionReport
    prefix_cached: bool
    seconds: float
    probe: ModelInputs | None = None
    validation: ModelInputs | None = None

    def client_rows(self, client_id: int) -> ModelInputs:
        """One client's training examples."""
        return self.train.select(self.client_train[client_id])

    def local_test_rows(self, client_id: int) -> ModelInputs:
        """One client's local test examples."""
        return self.train.select(self.client_test[client_id])


@dataclass
class Prepared:
    """A loaded model and the data prepared for it."""

    model: MoEModel
    data: PreparedData


def _as_index(values: np.ndarray | Sequence[int]) -> Tensor:
    return torch.as_tensor(
        list(values) if not hasattr(values, "__len__") else values, dtype=torch.long
    )


def _pool_rows(
    federated: FederatedData, clients: Sequence[int], include_train: bool
) -> tuple[Tensor | None, dict[int, Tensor], dict[int, Tensor]]:
    """Pool rows to keep (None = all) and each client's indices into the kept rows."""
    everyone = len(clients) == len(federated.clients) and include_train
    if everyone:
        train = {c: _as_index(federated.clients[c].train_indices) for c in clients}
        test = {c: _as_index(federated.clients[c].test_indices) for c in clients}
        return None, train, test
    wanted: list[int] = []
    for c in clients:
        if include_train:
            wanted.extend(federated.clients[c].train_indices)
        wanted.extend(federated.clients[c].test_indices)
    kept = torch.as_tensor(sorted(set(wanted)), dtype=torch.long)
    position = {int(row): i for i, row in enumerate(kept.tolist())}

    def remap(rows: np.ndarray) -> Tensor:
        return _as_index([position[int(r)] for r in rows])

    train = {
        c: remap(federated.clients[c].train_indices) if include_train else _as_index([])
        for c in clients
    }
    test = {c: remap(federated.clients[c].test_indices) for c in clients}
    return kept, train, test


def _inputs(dataset: TextDataset, model: MoEModel, max_length: int) -> ModelInputs:
    tokenized = tokenize_examples(dataset, model.tokenizer, max_length)
    return ModelInputs(
        attention_mask=tokenized.attention_mask,
        labels=tokenized.labels,
        input_ids=tokenized.input_ids,
        target_mask=tokenized.target_mask,
        task=tokenized.task,
    )


def _cache(model: MoEModel, inputs: ModelInputs) -> ModelInputs:
    assert inputs.input_ids is not None
    return compute_prefix_inputs(
        model, inputs.input_ids, inputs.attention_mask, inputs.labels, PREFIX_BATCH
    )


PROBE_SEED = 0x9B0E
"""Mixed with ``federated.seed`` to draw the probe examples from the spare test pool."""


def probe_dataset(config: ExperimentConfig, federated: FederatedData) -> TextDataset:
    """``strategy.probe-examples`` examples of the held-out pool outside the global test set.

    Raises
    ------
    ConfigError
        When ``data.max-test-examples`` leaves fewer spare held-out examples than asked.
    """
    wanted = config.strategy.probe_examples
    spare = federated.splits.spare_test
    available = 0 if spare is None else len(spare)
    if spare is None or available < wanted:
        raise ConfigError(
            f"strategy.probe-examples = {wanted} needs that many held-out examples outside "
            f"the global test set, but data.max-test-examples = "
            f"{config.data.max_test_examples} leaves {available}: lower "
            "strategy.probe-examples or data.max-test-examples"
        )
    rng = np.random.default_rng([config.federated.seed, PROBE_SEED])
    return spare.subset(np.sort(rng.choice(available, size=wanted, replace=False)))


def prepare_data(
    config: ExperimentConfig,
    model: MoEModel,
    federated: FederatedData,
    *,
    clients: Sequence[int] | None = None,
    include_train: bool = True,
    include_test: bool = True,
) -> PreparedData:
    """Tokenize the rows of ``clients``, the global test set and the server's validation
    set; cache the frozen prefix.

    Parameters
    ----------
    clients : sequence of int or None, default None
        Clients whose rows are prepared (None = all).
    include_train : bool, default True
        Prepare the clients' training rows (False: only their local test rows).
    include_test : bool, default True
        Prepare the global test set and the validation set (False: ``test`` has no rows
        and there is no validation set; a Flower ClientApp, which never evaluates on them).
    """
    started = time.perf_counter()
    chosen = list(range(len(federated.clients))) if clients is None else list(clients)
    kept, client_train, client_test = _pool_rows(federated, chosen, include_train)
    train = _inputs(federated.splits.train, model, config.model.max_length)
    if kept is not None:
        train = train.rows(kept)
    test = _inputs(federated.splits.test, model, config.model.max_length)
    if not include_test:
        test = test.rows(torch.zeros(0, dtype=torch.long))
    cached = model.supports_prefix_cache and config.model.cache_prefix
    if cached:
        train, test = _cache(model, train), _cache(model, test)
    validation = None
    if include_test and federated.splits.validation is not None:
        validation = _inputs(federated.splits.validation, model, config.model.max_length)
        if cached:
            validation = _cache(model, validation)
    probe = None
    server_side = clients is None or not include_train
    if config.strategy.semantic_privacy == "public-probe" and server_side:
        probe = _inputs(probe_dataset(config, federated), model, config.model.max_length)
        if cached:
            probe = _cache(model, probe)
    return PreparedData(
        train=train,
        test=test,
        client_train=client_train,
        client_test=client_test,
        num_clients=len(federated.clients),
        label_names=list(federated.splits.train.label_names),
        report=federated.report(),
        prefix_cached=cached,
        seconds=time.perf_counter() - started,
        probe=probe,
        validation=validation,
    )


def load_model(config: ExperimentConfig, num_labels: int) -> MoEModel:
    """The model of ``config`` (seeded by ``federated.seed``) with the head its data need,
    on ``run.device`` with ``run.precision``; applies ``run.deterministic``."""
    set_deterministic(config.run.deterministic)
    return load_moe_model(
        config.model,
        num_labels=num_labels,
        seed=config.federated.seed,
        head=config.model_head(),
        device=config.run.device,
        precision=config.run.precision,
        frozen_dtype=config.run.frozen_dtype,
    )


def prepare(
    config: ExperimentConfig,
    *,
    clients: Sequence[int] | None = None,
    include_train: bool = True,
    include_test: bool = True,
    model_loader: ModelLoader | None = None,
) -> Prepared:
    """Partition, model and prepared data for ``config`` (seeded by ``federated.seed``).

    Parameters
    ----------
    config : ExperimentConfig
    clients : sequence of int or None, default None
        Clients whose rows are prepared (None = all; a Flower ClientApp passes its own).
    include_train : bool, default True
        False prepares only local test rows and the global test set (a server evaluating).
    include_test : bool, default True
        False leaves out the global test set (a client that never evaluates on it).
    model_loader : ModelLoader or None, default None
        Builds the model from ``(config, num_labels)``; None is :func:`load_model`.
    """
    seed = config.federated.seed
    federated = build_federated_data(config.data, config.partition, seed)
    loader = model_loader or load_model
    model = loader(config, federated.splits.train.num_classes)
    data = prepare_data(
        config,
        model,
        federated,
        clients=clients,
        include_train=include_train,
        include_test=include_test,
    )
    return Prepared(model=model, data=data)
