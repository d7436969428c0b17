"""Tests for fedalign.data.partition: partition schemes, local splits and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedalign.config import ConfigError, DataConfig, PartitionConfig
from fedalign.data import build_federated_data, partition_labels
from fedalign.data.partition import DIRICHLET_MAX_TRIES


def _labels(num_classes: int = 8, per_class: int = 250, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def _assert_disjoint_and_complete(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no duplicates


def _mean_entropy(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    entropies = []
    for part in parts:
        p = np.bincount(labels[part], minlength=num_classes) / len(part)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


@pytest.mark.parametrize("method", ["dirichlet", "pathological", "iid"])
def test_partitions_are_disjoint_complete_and_seeded(method: str) -> None:
    labels = _labels()
    a = partition_labels(labels, 10, method, seed=5)
    b = partition_labels(labels, 10, method, seed=5)
    c = partition_labels(labels, 10, method, seed=6)
    assert len(a) == 10
    _assert_disjoint_and_complete(a, len(labels))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    labels = _labels()
    skewed = partition_labels(labels, 10, "dirichlet", alpha=0.1, seed=0)
    flat = partition_labels(labels, 10, "dirichlet", alpha=100.0, seed=0)
    h_skewed = _mean_entropy(labels, skewed, 8)
    h_flat = _mean_entropy(labels, flat, 8)
    assert h_flat > 0.95 * np.log(8)
    assert h_skewed < h_flat - 0.5


def test_dirichlet_respects_min_client_size() -> None:
    labels = _labels()
    free = partition_labels(labels, 10, "dirichlet", alpha=0.1, min_client_size=0, seed=0)
    assert min(len(p) for p in free) < 60  # the first draw breaks the minimum ...
    parts = partition_labels(labels, 10, "dirichlet", alpha=0.1, min_client_size=60, seed=0)
    assert min(len(p) for p in parts) >= 60  # ... so a later draw was taken
    _assert_disjoint_and_complete(parts, len(labels))


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    labels = _labels(num_classes=2, per_class=50)
    with pytest.raises(ConfigError, match=str(DIRICHLET_MAX_TRIES)) as info:
        partition_labels(labels, 9, "dirichlet", alpha=0.01, min_client_size=10, seed=0)
    message = str(info.value)
    assert message.startswith("partition.alpha")
    assert "larger partition.alpha" in message and "partition.min-client-size" in message


@pytest.mark.parametrize(("num_clients", "k"), [(10, 2), (4, 2), (3, 3), (8, 1), (5, 8)])
def test_pathological_gives_exactly_k_classes(num_clients: int, k: int) -> None:
    labels = _labels()
    parts = partition_labels(labels, num_clients, "pathological", classes_per_client=k, seed=2)
    for part in parts:
        assert len(np.unique(labels[part])) == k
    covered = np.unique(np.concatenate([labels[p] for p in parts]))
    if num_clients * k >= 8:
        assert len(covered) == 8
        _assert_disjoint_and_complete(parts, len(labels))
    else:
        assert len(covered) == num_clients * k
    holders = np.zeros(8, dtype=int)
    for part in parts:
        holders[np.unique(labels[part])] += 1
    assert holders[holders > 0].max() - holders[holders > 0].min() <= 1


def test_iid_sizes_differ_by_at_most_one() -> None:
    labels = _labels(per_class=101)
    parts = partition_labels(labels, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _mean_entropy(labels, parts, 8) > 0.97 * np.log(8)


@pytest.mark.parametrize(
    ("kwargs", "field", "mentions"),
    [
        ({"num_clients": 4, "method": "shards"}, "partition.method", ["dirichlet", "iid"]),
        ({"num_clients": 4, "method": "dirichlet", "alpha": 0.0}, "partition.alpha", ["> 0"]),
        ({"num_clients": 4, "method": "dirichlet", "alpha": -1.0}, "partition.alpha", []),
        ({"num_clients": 0, "method": "iid"}, "partition.num-clients", [">= 1"]),
        ({"num_clients": 41, "method": "iid"}, "partition.num-clients", ["40"]),
        (
            {"num_clients": 2, "method": "pathological", "classes_per_client": 5},
            "partition.classes-per-client",
            ["1..4"],
        ),
        (
            {"num_clients": 2, "method": "pathological", "classes_per_client": 0},
            "partition.classes-per-client",
            [],
        ),
        (
            {"num_clients": 5, "method": "dirichlet", "min_client_size": 9},
            "partition.min-client-size",
            [],
        ),
    ],
)
def test_bad_partition_arguments_raise(
    kwargs: dict[str, Any], field: str, mentions: list[str]
) -> None:
    labels = _labels(num_classes=4, per_class=10)
    with pytest.raises(ConfigError) as info:
        partition_labels(labels, **kwargs)
    assert str(info.value).startswith(field)
    for word in mentions:
        assert word in str(info.value)


def test_pathological_class_too_small_for_its_holders() -> None:
    labels = np.array([0, 0, 0, 0, 1])
    with pytest.raises(ConfigError, match=r"^partition\.num-clients"):
        partition_labels(labels, 4, "pathological", classes_per_client=1)


# ------------------------------------------------------------------ federated data
def _small_config(**partition: Any) -> tuple[DataConfig, PartitionConfig]:
    return DataConfig(max_train_examples=2000, max_test_examples=400), PartitionConfig(**partition)


def test_build_federated_data_on_wordnet() -> None:
    data, partition = _small_config(num_clients=6, alpha=0.5, local_test_fraction=0.25)
    fed = build_federated_data(data, partition, seed=0)
    assert len(fed.clients) == 6 and fed.num_clients == 6
    train_pool = len(fed.splits.train)
    assert train_pool == 2000
    everything = np.concatenate([np.r_[c.train_indices, c.test_indices] for c in fed.clients])
    assert np.array_equal(np.sort(everything), np.arange(train_pool))
    for client in fed.clients:
        share = len(client.train_indices) + len(client.test_indices)
        assert len(client.test_indices) == int(0.25 * share)
        assert not set(client.train_indices.tolist()) & set(client.test_indices.tolist())
        local = fed.client_train(client.client_id)
        assert local.texts == [fed.splits.train.texts[i] for i in client.train_indices]
        assert len(fed.client_test(client.client_id)) == len(client.test_indices)
    # the global test set never reaches a client
    client_texts = {t for c in range(6) for t in fed.client_train(c).texts}
    assert not client_texts & set(fed.splits.test.texts)
    again = build_federated_data(data, partition, seed=0)
    assert all(
        np.array_equal(a.test_indices, b.test_indices) for a, b in zip(fed.clients, again.clients)
    )
    with pytest.raises(IndexError):
        fed.client_train(6)


def test_local_split_keeps_one_training_example(tmp_path: Path) -> None:
    path = tmp_path / "tiny.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(24)) + "\n"
    )
    data = DataConfig(dataset=str(path), test_fraction=0.2)
    fed = build_federated_data(
        data, PartitionConfig(method="iid", num_clients=20, local_test_fraction=0.9), seed=0
    )
    for client in fed.clients:
        assert len(client.train_indices) >= 1
    none = build_federated_data(
        data, PartitionConfig(method="iid", num_clients=4, local_test_fraction=0.0), seed=0
    )
    assert all(len(c.test_indices) == 0 for c in none.clients)
    assert len(none.client_test(0)) == 0


def test_report_counts_and_formats() -> None:
    data, partition = _small_config(method="pathological", num_clients=5, classes_per_client=2)
    fed = build_federated_data(data, partition, seed=4)
    report = fed.report()
    assert report.counts.shape == (5, 8) and report.test_counts.shape == (5, 8)
    for client in fed.clients:
        assert report.counts[client.client_id].sum() == len(client.train_indices)
        assert report.test_counts[client.client_id].sum() == len(client.test_indices)
        assert (
            report.counts[client.client_id] + report.test_counts[client.client_id] > 0
        ).sum() == 2
    assert report.counts.sum() + report.test_counts.sum() == len(fed.splits.train)

    markdown = report.to_markdown()
    lines = markdown.splitlines()
    assert lines[0] == (
        "| client | act | animal | artifact | communication | food | location | person "
        "| plant | total |"
    )
    assert len(lines) == 2 + 5 + 1
    assert lines[2].split("|")[-2].strip() == str(len(fed.clients[0].train_indices))
    assert lines[-1].startswith("| all |")
    assert report.to_markdown("test").splitlines()[0] == lines[0]

    csv_lines = report.to_csv().splitlines()
    assert csv_lines[0].startswith("client,split,act,")
    assert len(csv_lines) == 1 + 2 * 5
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["train_sizes"] == [len(c.train_indices) for c in fed.clients]
    assert as_dict["counts"] == report.counts.tolist()


@pytest.mark.parametrize(
    ("partition", "field"),
    [
        (PartitionConfig(method="random"), "partition.method"),
        (PartitionConfig(alpha=0.0), "partition.alpha"),
        (PartitionConfig(num_clients=0), "partition.num-clients"),
        (PartitionConfig(local_test_fraction=1.0), "partition.local-test-fraction"),
        (PartitionConfig(num_clients=10_000), "partition.num-clients"),
        (
            PartitionConfig(method="pathological", classes_per_client=9),
            "partition.classes-per-client",
        ),
    ],
)
def test_build_federated_data_rejects_bad_partition(partition: PartitionConfig, field: str) -> None:
    data = DataConfig(max_train_examples=2000)
    with pytest.raises(ConfigError) as info:
        build_federated_data(data, partition, seed=0)
    assert str(info.value).startswith(field)


def test_partition_config_is_checked_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedalign.data.partition as partition_module

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was loaded before the config was checked")

    monkeypatch.setattr(partition_module, "load_data", boom)
    with pytest.raises(ConfigError, match=r"^partition\.method"):
        build_federated_data(DataConfig(), PartitionConfig(method="nope"), seed=0)
