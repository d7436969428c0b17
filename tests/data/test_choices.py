"""Multiple-choice data: MMLU / HellaSwag schemas, the shipped samples, tokenization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedalign.config import ConfigError, DataConfig, ExperimentConfig, PartitionConfig
from fedalign.data import (
    MultipleChoiceDataset,
    build_federated_data,
    hellaswag_example,
    load_data,
    mmlu_example,
    sample_path,
    tokenize_choices,
)
from fedalign.data.choices import choice_dataset
from fedalign.errors import DataFileError


def _config(dataset: str, path: str = "sample", **values: Any) -> DataConfig:
    config = DataConfig(dataset=dataset, path=path, test_fraction=0.25)
    for key, value in values.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize(
    ("dataset", "groups"),
    [
        (
            "mmlu",
            [
                "elementary_mathematics",
                "high_school_biology",
                "high_school_chemistry",
                "high_school_geography",
            ],
        ),
        ("hellaswag", ["Baking cookies", "Planting a tree", "Playing guitar", "Washing a car"]),
    ],
)
def test_shipped_samples_load_grouped_and_balanced(dataset: str, groups: list[str]) -> None:
    splits = load_data(_config(dataset), seed=0)
    assert isinstance(splits.train, MultipleChoiceDataset)
    assert isinstance(splits.test, MultipleChoiceDataset)
    assert splits.train.label_names == groups
    assert len(splits.train) + len(splits.test) == 48
    # the held-out test set is balanced over the groups (3 of the 12 rows of each)
    assert splits.test.class_counts().tolist() == [3, 3, 3, 3]
    for data in (splits.train, splits.test):
        assert all(len(row) == 4 for row in data.choices)
        assert ((data.answers >= 0) & (data.answers < 4)).all()


def test_mmlu_row_becomes_a_cloze_question() -> None:
    row = {"question": "What is 2 + 2?", "subject": "elementary_mathematics",
           "choices": ["3", "4", "5", "22"], "answer": 1}  # fmt: skip
    context, choices, answer, group = mmlu_example(row)
    assert context == (
        "The following is a question about elementary mathematics.\n"
        "Question: What is 2 + 2?\nAnswer:"
    )
    assert (choices, answer, group) == (["3", "4", "5", "22"], 1, "elementary_mathematics")


def test_hellaswag_row_is_cleaned() -> None:
    row = {
        "activity_label": "Making a cake",
        "ctx_a": "[header] How to bake a cake [title] Preheat the oven.",
        "ctx_b": "then you",
        "ctx": "unused",
        "endings": ["mix the  flour [step] well.", "fly away."],
        "label": "0",
    }
    context, endings, label, group = hellaswag_example(row)
    assert context == "Making a cake: How to bake a cake Preheat the oven. Then you"
    assert endings == ["mix the flour well.", "fly away."]
    assert (label, group) == (0, "Making a cake")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q", "subject": "s", "choices": ["a", "b"]}, "record 1 .* no 'answer'"),
        ({"question": "q", "subject": "s", "choices": ["a", "b"], "answer": 2}, r"\[0, 2\)"),
        ({"question": "q", "subject": "s", "choices": "ab", "answer": 0}, "list of at least 2"),
    ],
)
def test_bad_mmlu_rows_name_record_and_key(row: dict[str, Any], message: str) -> None:
    with pytest.raises(DataFileError, match=message):
        mmlu_example(row, 1, "file.jsonl")


def test_unlabelled_hellaswag_row_is_refused() -> None:
    row = {"activity_label": "a", "ctx": "c", "endings": ["x", "y"], "label": ""}
    with pytest.raises(DataFileError, match="no 'label' value"):
        hellaswag_example(row, 7, "test.jsonl")


def test_local_file_in_the_hub_schema(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in sample_path("mmlu").read_text().splitlines()]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    splits = load_data(_config("mmlu", str(path)), seed=0)
    assert len(splits.train) + len(splits.test) == 24
    assert splits.train.label_names == ["high_school_chemistry", "high_school_geography"]


@pytest.mark.parametrize(
    ("dataset", "path", "message"),
    [
        ("wordnet-supersense", "sample", "data.path is read only for data.dataset in"),
        ("mmlu", "questions.csv", "data.path must be 'sample' or a file ending in"),
        ("mmlu", "missing.jsonl", "data.path: file 'missing.jsonl' not found"),
    ],
)
def test_bad_paths_are_named(dataset: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_data(_config(dataset, path), seed=0)


def test_head_and_dataset_must_agree() -> None:
    config = ExperimentConfig()
    config.data.dataset = "mmlu"
    assert config.model_head() == "causal-lm"
    config.model.head = "classification"
    with pytest.raises(ConfigError, match=r"model\.head 'classification' cannot score"):
        config.validate()
    config = ExperimentConfig()
    assert config.model_head() == "classification"
    config.model.head = "causal-lm"
    with pytest.raises(ConfigError, match=r"model\.head 'causal-lm' needs a multiple-choice"):
        config.validate()
    config.model.head = "pooled"
    with pytest.raises(ConfigError, match=r"model.head must be one of \['auto'"):
        config.validate()


def test_dirichlet_partition_skews_the_groups() -> None:
    def zero_cells(method: str) -> int:
        federated = build_federated_data(
            _config("hellaswag"),
            PartitionConfig(
                method=method, num_clients=3, alpha=0.1, min_client_size=4, local_test_fraction=0
            ),
            seed=0,
        )
        counts = np.asarray(federated.report().counts)
        assert counts.sum() == len(federated.splits.train)
        assert isinstance(federated.client_train(0), MultipleChoiceDataset)
        return int((counts == 0).sum())

    # (client, activity) cells without an example: many under Dirichlet(0.1), few under iid
    assert zero_cells("dirichlet") >= 4 > zero_cells("iid")


def test_tokenize_choices_marks_exactly_the_choice(minilm_tokenizer: Any) -> None:
    data = choice_dataset(
        [
            ("the cat sat on the", ["mat", "red wooden chair"], 0, "a"),
            ("a long story that goes on and on about many things", ["end", "stop"], 1, "b"),
        ]
    )
    tokens = tokenize_choices(data, minilm_tokenizer, max_length=32)
    assert tokens.task == "multiple-choice"
    assert tokens.input_ids.shape[:2] == (2, 2)
    assert tokens.labels.tolist() == [0, 1]
    assert tokens.target_mask is not None
    for i, row in enumerate(data.choices):
        for j, choice in enumerate(row):
            ids = tokens.input_ids[i, j][tokens.target_mask[i, j].bool()].tolist()
            assert minilm_tokenizer.decode(ids) == choice
            # the sequence starts with [CLS] and the target ends where the tokens end
            assert int(tokens.input_ids[i, j, 0]) == minilm_tokenizer.cls_token_id
            length = int(tokens.attention_mask[i, j].sum())
            assert int(tokens.target_mask[i, j, :length].sum()) == len(ids)
            assert tokens.target_mask[i, j, length - 1] == 1


def test_long_contexts_lose_their_beginning_not_the_choice(minilm_tokenizer: Any) -> None:
    data = choice_dataset(
        [("one two three four five six seven eight", ["nine ten", "eleven"], 0, "g")]
    )
    tokens = tokenize_choices(data, minilm_tokenizer, max_length=5)
    assert tokens.input_ids.shape[-1] == 5
    assert tokens.target_mask is not None
    first = tokens.input_ids[0, 0][tokens.attention_mask[0, 0].bool()].tolist()
    assert minilm_tokenizer.decode(first[1:]) == "seven eight nine ten"
    with pytest.raises(ConfigError, match=r"model\.max-length must be >= 3"):
        tokenize_choices(data, minilm_tokenizer, max_length=2)


def test_uneven_choice_counts_pad_missing_choices(minilm_tokenizer: Any) -> None:
    data = choice_dataset([("q one", ["a", "b", "c"], 2, "g"), ("q two", ["d", "e"], 0, "g")])
    tokens = tokenize_choices(data, minilm_tokenizer, max_length=16)
    assert tokens.input_ids.shape[:2] == (2, 3)
    assert int(tokens.attention_mask[1, 2].sum()) == 0
    subset = tokens.subset([1])
    assert subset.target_mask is not None and subset.input_ids.shape[:2] == (1, 3)
