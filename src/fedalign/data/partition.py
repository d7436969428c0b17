"""Split the pooled training data across federated clients.

:func:`partition_labels` gives each client a set of example indices using one of three
schemes (``dirichlet`` label skew, ``pathological`` k-classes-per-client, ``iid``).
:func:`build_federated_data` loads the data, partitions it and splits every client's share
into a local train and local test part; :class:`PartitionReport` tabulates the result.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedalign.config import ConfigError, DataConfig, PartitionConfig
from fedalign.data.datasets import DataSplits, TextDataset, load_data

DIRICHLET_MAX_TRIES = 1000
"""How many Dirichlet draws :func:`partition_labels` tries before giving up."""


# ------------------------------------------------------------------------- validation
def _check_against_labels(
    labels: np.ndarray,
    method: str,
    num_clients: int,
    classes_per_client: int,
    min_client_size: int,
) -> None:
    """Checks that compare the arguments with the data."""
    n = len(labels)
    if num_clients > n:
        raise ConfigError(
            f"partition.num-clients ({num_clients}) exceeds the number of training examples "
            f"({n}); use at most {n} clients"
        )
    num_present = len(np.unique(labels))
    if method == "pathological" and classes_per_client > num_present:
        raise ConfigError(
            f"partition.classes-per-client ({classes_per_client}) exceeds the number of "
            f"classes ({num_present}); accepted: 1..{num_present}"
        )
    if method == "dirichlet" and num_clients * min_client_size > n:
        raise ConfigError(
            f"partition.min-client-size ({min_client_size}) x partition.num-clients "
            f"({num_clients}) exceeds the {n} training examples; lower the minimum client "
            "size or the number of clients"
        )


# ------------------------------------------------------------------------- partitioners
def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, min_client_size: int, seed: int
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(DIRICHLET_MAX_TRIES):
        cuts_per_class: list[np.ndarray] = []
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in members:
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = np.floor(np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            cuts = np.clip(cuts, 0, len(idx))
            cuts_per_class.append(cuts)
            sizes += np.diff(np.concatenate(([0], cuts, [len(idx)])))
        if sizes.min() >= min_client_size:
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for idx, cuts in zip(members, cuts_per_class):
                for client, piece in enumerate(np.split(idx, cuts)):
                    parts[client].append(piece)
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise ConfigError(
        f"partition.alpha ({alpha}): no Dirichlet draw in {DIRICHLET_MAX_TRIES} tries gave "
        f"every one of {num_clients} clients >= {min_client_size} examples "
        f"({len(labels)} examples in all); use a larger partition.alpha, a smaller "
        "partition.min-client-size or fewer partition.num-clients"
    )


def _pathological(
    labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    num_classes = len(classes)
    # Client i holds the classes at positions i*k .. i*k+k-1 (mod C) of a seeded class
    # order: k distinct classes each, every class covered when clients * k >= C, and the
    # number of holders per class differs by at most one.
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    client_classes: list[list[int]] = []
    for client in range(num_clients):
        mine = [
            int(classes[(client * classes_per_client + j) % num_classes])
            for j in range(classes_per_client)
        ]
        client_classes.append(mine)
        for c in mine:
            holders[c].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, clients in holders.items():
        if not clients:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < len(clients):
            raise ConfigError(
                f"partition.num-clients ({num_clients}): class {c} has {len(idx)} examples "
                f"but {len(clients)} clients should hold it; use fewer clients or a smaller "
                "partition.classes-per-client"
            )
        for client, shard in zip(clients, np.array_split(idx, len(clients))):
            parts[client].append(shard)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def _iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        np.sort(part).astype(np.int64)
        for part in np.array_split(rng.permutation(num_examples), num_clients)
    ]


def partition_labels(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    *,
    alpha: float = 0.1,
    classes_per_client: int = 2,
    min_client_size: int = 10,
    seed: int = 0,
) -> list[np.ndarray]:
    """Assign example indices to clients.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer class label of every example, shape ``(N,)``.
    num_clients : int
        Number of clients (1 .. N).
    method : str
        ``"dirichlet"``: for every class, client proportions drawn from
        ``Dirichlet(alpha)``; the whole draw is repeated (at most
        :data:`DIRICHLET_MAX_TRIES` times) until every client has ``min_client_size``
        examples. ``"pathological"``: every client holds ``classes_per_client`` classes
        (consecutive classes of a seeded class order, wrapping round, so every class is
        covered when ``num_clients * classes_per_client >= C``) and each class is split into
        equal random shards among its holders. ``"iid"``: a shuffled split into sizes that
        differ by at most one.
    alpha : float, default 0.1
        Dirichlet concentration (``dirichlet`` only; smaller is more skewed).
    classes_per_client : int, default 2
        Classes per client (``pathological`` only).
    min_client_size : int, default 10
        Minimum examples per client (``dirichlet`` only; the other methods give every client
        at least one example).
    seed : int, default 0
        Seeds the partition: same seed, same result.

    Returns
    -------
    list of numpy.ndarray
        One sorted int64 index array per client. The arrays are disjoint and their union is
        every index (for ``pathological`` only when every class is covered).

    Raises
    ------
    ConfigError
        For an argument :meth:`PartitionConfig.validate` refuses (whatever the method: an
        unknown method, ``alpha <= 0``, ...), more clients than examples,
        ``classes_per_client`` larger than the number of classes, a minimum size that cannot
        be met, or (pathological) a class with fewer examples than clients holding it. The
        message names the ``partition.*`` field.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    PartitionConfig(
        method=method,
        num_clients=num_clients,
        alpha=alpha,
        classes_per_client=classes_per_client,
        min_client_size=min_client_size,
    ).validate()
    _check_against_labels(labels, method, num_clients, classes_per_client, min_client_size)
    if method == "dirichlet":
        return _dirichlet(labels, num_clients, alpha, min_client_size, seed)
    if method == "pathological":
        return _pathological(labels, num_clients, classes_per_client, seed)
    return _iid(len(labels), num_clients, seed)


# ---------------------------------------------------------------------- result objects
@dataclass
class ClientSplit:
    """One client's share of the pooled training data.

    Parameters
    ----------
    client_id : int
        Position of the client, ``0 .. num_clients - 1``.
    train_indices : numpy.ndarray
        Sorted int64 indices into ``DataSplits.train`` used for local training.
    test_indices : numpy.ndarray
        Sorted int64 indices into ``DataSplits.train`` kept as the client's local test
        split (may be empty).
    """

    client_id: int
    train_indices: np.ndarray
    test_indices: np.ndarray


@dataclass
class PartitionReport:
    """Examples per client and class.

    Parameters
    ----------
    counts : numpy.ndarray
        ``(num_clients, num_classes)`` local training examples.
    test_counts : numpy.ndarray
        ``(num_clients, num_classes)`` local test examples.
    label_names : list of str
        Class names, one per column.
    """

    counts: np.ndarray
    test_counts: np.ndarray
    label_names: list[str]

    def _table(self, split: str) -> np.ndarray:
        if split == "train":
            return self.counts
        if split == "test":
            return self.test_counts
        raise ValueError(f"split must be 'train' or 'test' (got {split!r})")

    def to_markdown(self, split: str = "train") -> str:
        """Return a Markdown table: ``client | <one column per class> | total``.

        Parameters
        ----------
        split : str, default "train"
            ``"train"`` (local training counts) or ``"test"`` (local test counts).

        Returns
        -------
        str
            Header, separator, one row per client and a final ``all`` row.
        """
        table = self._table(split)
        header = ["client", *self.label_names, "total"]
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        for client, row in enumerate(table):
            cells = [str(client), *(str(int(v)) for v in row), str(int(row.sum()))]
            lines.append("| " + " | ".join(cells) + " |")
        totals = table.sum(axis=0)
        cells = ["all", *(str(int(v)) for v in totals), str(int(totals.sum()))]
        lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """Return CSV with columns ``client, split, <one per class>, total``.

        Returns
        -------
        str
            One ``train`` and one ``test`` row per client.
        """
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["client", "split", *self.label_names, "total"])
        for client in range(len(self.counts)):
            for split in ("train", "test"):
                row = self._table(split)[client]
                writer.writerow([client, split, *(int(v) for v in row), int(row.sum())])
        return buffer.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able summary.

        Returns
        -------
        dict
            ``label_names``, ``counts`` and ``test_counts`` (nested lists of int),
            ``train_sizes`` and ``test_sizes`` (per client).
        """
        return {
            "label_names": list(self.label_names),
            "counts": [[int(v) for v in row] for row in self.counts],
            "test_counts": [[int(v) for v in row] for row in self.test_counts],
            "train_sizes": [int(v) for v in self.counts.sum(axis=1)],
            "test_sizes": [int(v) for v in self.test_counts.sum(axis=1)],
        }


@dataclass
class FederatedData:
    """The global splits and every client's share of the training pool.

    Parameters
    ----------
    splits : DataSplits
        Pooled training data and global test set.
    clients : list of ClientSplit
        One entry per client, ``clients[i].client_id == i``.
    """

    splits: DataSplits
    clients: list[ClientSplit]

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.clients)

    def _client(self, client_id: int) -> ClientSplit:
        if not 0 <= client_id < len(self.clients):
            raise IndexError(f"client_id must be in [0, {len(self.clients)}) (got {client_id})")
        return self.clients[client_id]

    def client_train(self, client_id: int) -> TextDataset:
        """Return client ``client_id``'s local training data.

        Parameters
        ----------
        client_id : int
            ``0 .. num_clients - 1``.

        Returns
        -------
        TextDataset
        """
        return self.splits.train.subset(self._client(client_id).train_indices)

    def client_test(self, client_id: int) -> TextDataset:
        """Return client ``client_id``'s local test data (possibly empty).

        Parameters
        ----------
        client_id : int
            ``0 .. num_clients - 1``.

        Returns
        -------
        TextDataset
        """
        return self.splits.train.subset(self._client(client_id).test_indices)

    def report(self) -> PartitionReport:
        """Count examples per client and class.

        Returns
        -------
        PartitionReport
        """
        labels = self.splits.train.labels
        num_classes = self.splits.train.num_classes

        def count(indices: np.ndarray) -> np.ndarray:
            return np.bincount(labels[indices], minlength=num_classes)

        return PartitionReport(
            counts=np.stack([count(c.train_indices) for c in self.clients]).astype(np.int64),
            test_counts=np.stack([count(c.test_indices) for c in self.clients]).astype(np.int64),
            label_names=list(self.splits.train.label_names),
        )


def split_local(
    indices: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into local train and local test.

    Parameters
    ----------
    indices : numpy.ndarray
        The client's indices.
    test_fraction : float
        Fraction (floored) kept for local test; at least one example always stays in train.
    rng : numpy.random.Generator
        Draws the test examples.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Sorted int64 train and test indices.
    """
    n = len(indices)
    n_test = min(math.floor(test_fraction * n), max(n - 1, 0))
    order = rng.permutation(n)
    test = np.sort(indices[order[:n_test]]).astype(np.int64)
    train = np.sort(indices[order[n_test:]]).astype(np.int64)
    return train, test


def build_federated_data(data: DataConfig, partition: PartitionConfig, seed: int) -> FederatedData:
    """Load the data, partition the training pool and split each share locally.

    Parameters
    ----------
    data : DataConfig
        Which data to load (see :func:`fedalign.data.datasets.load_data`).
    partition : PartitionConfig
        ``method``, ``num_clients``, ``alpha``, ``classes_per_client``,
        ``min_client_size`` and ``local_test_fraction``.
    seed : int
        Seeds loading, partitioning and the local splits.

    Returns
    -------
    FederatedData

    Raises
    ------
    ConfigError
        For a bad ``data.*`` or ``partition.*`` value; everything that needs no data is
        checked before loading (:meth:`PartitionConfig.validate`).
    """
    partition.validate()
    splits = load_data(data, seed)
    parts = partition_labels(
        splits.train.labels,
        partition.num_clients,
        partition.method,
        alpha=partition.alpha,
        classes_per_client=partition.classes_per_client,
        min_client_size=partition.min_client_size,
        seed=seed,
    )
    rng = np.random.default_rng([seed, 0x10CA1])
    clients = []
    for client_id, indices in enumerate(parts):
        train, test = split_local(indices, partition.local_test_fraction, rng)
        clients.append(ClientSplit(client_id=client_id, train_indices=train, test_indices=test))
    return FederatedData(splits=splits, clients=clients)
