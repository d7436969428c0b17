"""The server's validation set (``data.validation-examples``): held out of the training pool."""

from __future__ import annotations

import numpy as np
import pytest

from fedalign.config import ConfigError, DataConfig, PartitionConfig
from fedalign.data import TextDataset, build_federated_data, hold_out_validation, load_data


def test_validation_is_disjoint_balanced_and_outside_the_partition() -> None:
    config = DataConfig(max_train_examples=240, max_test_examples=80, validation_examples=43)
    splits = load_data(config, seed=3)
    assert splits.validation is not None
    validation = splits.validation
    assert len(validation) == 43
    counts = validation.class_counts()
    assert counts.max() - counts.min() <= 1  # 43 over 8 classes: 5 or 6 each
    assert np.all(counts >= 5)
    texts = set(validation.texts)
    assert not texts & set(splits.train.texts)
    assert not texts & set(splits.test.texts)
    assert len(splits.train) == 240  # the training budget is unchanged
    federated = build_federated_data(
        config, PartitionConfig(num_clients=3, alpha=0.5, min_client_size=10), seed=3
    )
    client_rows = np.concatenate(
        [np.concatenate([c.train_indices, c.test_indices]) for c in federated.clients]
    )
    client_texts = {federated.splits.train.texts[i] for i in client_rows.tolist()}
    assert client_texts and not client_texts & texts


def test_validation_is_seeded_and_the_test_set_does_not_move() -> None:
    base = DataConfig(max_train_examples=240, max_test_examples=80)
    with_validation = DataConfig(
        max_train_examples=240, max_test_examples=80, validation_examples=40
    )
    first, second = load_data(with_validation, seed=1), load_data(with_validation, seed=1)
    other = load_data(with_validation, seed=2)
    assert first.validation is not None and second.validation is not None
    assert first.validation.texts == second.validation.texts
    assert other.validation is not None and other.validation.texts != first.validation.texts
    plain = load_data(base, seed=1)
    assert plain.validation is None
    assert plain.test.texts == first.test.texts


def test_zero_holds_out_nothing() -> None:
    pool = TextDataset(["a", "b", "c", "d"], np.array([0, 0, 1, 1]), ["x", "y"])
    rest, validation = hold_out_validation(pool, 0, seed=0)
    assert validation is None and rest is pool


@pytest.mark.parametrize(
    ("count", "message"),
    [
        (1, r"data\.validation-examples \(1\) must be 0 or >= the number of classes \(2\)"),
        (6, r"data\.validation-examples \(6\) is too many .* use at most 4"),
        (-1, r"data\.validation-examples must be >= 0"),
    ],
)
def test_bad_counts_are_named(count: int, message: str) -> None:
    texts = [f"t{i}" for i in range(9)]
    pool = TextDataset(texts, np.array([0] * 5 + [1] * 4), ["x", "y"])
    with pytest.raises(ConfigError, match=message):
        if count < 0:
            load_data(DataConfig(validation_examples=count), seed=0)
        hold_out_validation(pool, count, seed=0)
