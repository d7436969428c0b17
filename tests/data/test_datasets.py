"""Tests for fedalign.data.datasets: embedded WordNet data, files, ag_news, global split."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fedalign.config import ConfigError, DataConfig
from fedalign.data import (
    AG_NEWS_LABELS,
    DATASETS,
    WORDNET_SUPERSENSES,
    WORDNET_VERB_SUPERSENSES,
    TextDataset,
    load_ag_news,
    load_data,
    load_text_file,
    load_wordnet_supersense,
    load_wordnet_verb_supersense,
)

REPO = Path(__file__).resolve().parents[2]
ASSET_DIR = REPO / "src" / "fedalign" / "data" / "assets"
DATA_NOUN = Path("/usr/share/wordnet/data.noun")


def _build_script() -> ModuleType:
    path = REPO / "scripts" / "build_wordnet_dataset.py"
    spec = importlib.util.spec_from_file_location("build_wordnet_dataset", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------- embedded data
def test_wordnet_loads_offline_with_eight_large_classes() -> None:
    data = load_wordnet_supersense()
    assert data.label_names == list(WORDNET_SUPERSENSES)
    assert data.num_classes == 8
    assert data.label_names == [
        "act",
        "animal",
        "artifact",
        "communication",
        "food",
        "location",
        "person",
        "plant",
    ]
    assert len(data) >= 40_000
    assert data.labels.dtype == np.int64 and data.labels.shape == (len(data),)
    assert data.class_counts().min() >= 2_000
    assert all(isinstance(t, str) and t and t == t.strip() for t in data.texts[:1000])
    # example sentences were cut off and no text appears twice
    assert sum('; "' in t for t in data.texts) == 0
    assert len(set(data.texts)) == len(data.texts)


def test_wordnet_verbs_load_offline_with_fifteen_long_tailed_classes() -> None:
    data = load_wordnet_verb_supersense()
    assert data.label_names == list(WORDNET_VERB_SUPERSENSES) and data.num_classes == 15
    assert "wordnet-verb-supersense" in DATASETS
    counts = data.class_counts()
    assert len(data) >= 13_000 and counts.min() >= 50
    assert counts.max() / counts.min() > 20  # a long tail: change ~2.3k, weather 81
    assert data.label_names[int(np.argmin(counts))] == "weather"
    assert len(set(data.texts)) == len(data.texts)
    assert sum('; "' in t for t in data.texts) == 0


def test_load_data_reads_the_verb_dataset_by_name() -> None:
    config = DataConfig(dataset="wordnet-verb-supersense", max_train_examples=2000)
    splits = load_data(config, seed=0)
    assert splits.train.num_classes == 15 and len(splits.train) == 2000
    test_counts = splits.test.class_counts()
    assert test_counts.min() == test_counts.max() > 0  # class-balanced test set
    assert not set(splits.train.texts) & set(splits.test.texts)


def test_wordnet_returns_independent_copies() -> None:
    first = load_wordnet_supersense()
    first.labels[0] = 7 - first.labels[0]
    first.texts[0] = "changed"
    second = load_wordnet_supersense()
    assert second.texts[0] != "changed"
    assert second.labels[0] != first.labels[0]


def test_wordnet_licence_is_shipped() -> None:
    text = (ASSET_DIR / "WORDNET_LICENSE").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in text
    assert "Permission to use, copy, modify and distribute" in text


def test_build_script_parses_synthetic_lines() -> None:
    script = _build_script()
    lines = [
        "  1 This software and database is being provided\n",
        "00001740 03 n 01 entity 0 000 | that which is perceived\n",
        '01 05 n 01 dog 0 000 | a domestic canine; "the dog barked"; "another"  \n',
        "02 13 n 01 bread 0 000 | baked food made of flour  \n",
        "03 06 n 01 thing 0 000 | shared gloss  \n",
        "04 18 n 01 person 0 000 | shared gloss  \n",
        "05 05 n 01 cat 0 000 | a genus of cats  \n",
        "06 05 n 01 cat2 0 000 | a genus of cats  \n",
    ]
    assert script.parse_data_noun(lines) == [
        ("a domestic canine", "animal"),
        ("baked food made of flour", "food"),
        ("a genus of cats", "animal"),
    ]
    verbs = ["07 43 v 01 rain 0 000 | precipitate as rain  \n", *lines]
    assert script.parse_data_noun(verbs, {43: "weather"}) == [("precipitate as rain", "weather")]
    assert script.clean_gloss('"only an example"') == '"only an example"'
    data = script.to_gzip_jsonl([("a b", "act")])
    assert data == script.to_gzip_jsonl([("a b", "act")])
    assert json.loads(gzip.decompress(data)) == {"label": "act", "text": "a b"}


@pytest.mark.skipif(not DATA_NOUN.is_file(), reason="WordNet data.noun not installed")
def test_build_script_rebuild_is_byte_identical(tmp_path: Path) -> None:
    script = _build_script()
    assert script.main(["--out-dir", str(tmp_path)]) == 0
    for name in (
        "wordnet_supersense.jsonl.gz",
        "wordnet_verb_supersense.jsonl.gz",
        "WORDNET_LICENSE",
    ):
        assert (tmp_path / name).read_bytes() == (ASSET_DIR / name).read_bytes()
    assert (ASSET_DIR / "wordnet_supersense.jsonl.gz").stat().st_size < 3_000_000


# ------------------------------------------------------------------------- global split
def test_load_data_holds_out_balanced_disjoint_test_set() -> None:
    config = DataConfig(test_fraction=0.1)
    splits = load_data(config, seed=0)
    pool = load_wordnet_supersense()
    counts = splits.test.class_counts()
    per_class = min(int(0.1 * len(pool) / 8), int(pool.class_counts().min()) // 2)
    assert np.all(counts == per_class)
    assert len(splits.train) + len(splits.test) == len(pool)
    assert not set(splits.train.texts) & set(splits.test.texts)
    assert np.array_equal(splits.train.class_counts() + counts, pool.class_counts())


def test_load_data_is_seeded() -> None:
    a = load_data(DataConfig(), seed=1)
    b = load_data(DataConfig(), seed=1)
    c = load_data(DataConfig(), seed=2)
    assert a.test.texts == b.test.texts
    assert a.test.texts != c.test.texts


def test_load_data_caps_keep_classes_and_balance() -> None:
    config = DataConfig(max_train_examples=500, max_test_examples=83)
    splits = load_data(config, seed=3)
    assert len(splits.train) == 500
    assert np.all(splits.train.class_counts() >= 1)
    assert np.all(splits.test.class_counts() == 83 // 8)
    # tiny cap still keeps one example of each class
    tiny = load_data(DataConfig(max_train_examples=8), seed=0)
    assert np.all(tiny.train.class_counts() == 1)


def test_balanced_holdout_respects_smallest_class(tmp_path: Path) -> None:
    path = tmp_path / "skewed.jsonl"
    rows = [{"text": f"a{i}", "label": "big"} for i in range(100)]
    rows += [{"text": f"b{i}", "label": "small"} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits = load_data(DataConfig(dataset=str(path), test_fraction=0.5), seed=0)
    assert splits.test.class_counts().tolist() == [3, 3]  # min_class_count // 2
    assert len(splits.train) == 100


# --------------------------------------------------------------------------- text files
def _rows() -> list[dict[str, str]]:
    names = ["spam", "ham", "eggs"]
    return [{"body": f"text number {i}", "tag": names[i % 3], "extra": "x"} for i in range(30)]


def test_csv_with_string_labels_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["body", "tag", "extra"])
        writer.writeheader()
        writer.writerows(_rows())
    data = load_text_file(path, "body", "tag")
    assert data.label_names == ["eggs", "ham", "spam"]
    assert len(data) == 30
    assert data.texts[4] == "text number 4"
    assert [data.label_names[i] for i in data.labels] == [r["tag"] for r in _rows()]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_lines_round_trip_and_load_data(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n\n")
    data = load_text_file(path, "body", "tag")
    assert [data.label_names[i] for i in data.labels] == [r["tag"] for r in _rows()]
    config = DataConfig(dataset=str(path), text_column="body", label_column="tag")
    splits = load_data(config, seed=0)
    assert splits.test.class_counts().tolist() == [1, 1, 1]
    assert len(splits.train) == 27


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(_rows()))
    assert len(load_text_file(path, "body", "tag")) == 30


def test_integer_labels_are_kept(tmp_path: Path) -> None:
    jsonl = tmp_path / "ints.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 4 * 2}) for i in range(8)))
    data = load_text_file(jsonl, "text", "label")
    assert data.labels.tolist() == [0, 2, 4, 6, 0, 2, 4, 6]
    assert data.label_names == ["0", "1", "2", "3", "4", "5", "6"]
    csv_path = tmp_path / "ints.csv"
    csv_path.write_text("text,label\na,3\nb,1\nc,10\n")
    data = load_text_file(csv_path, "text", "label")
    assert data.labels.tolist() == [3, 1, 10]
    assert data.num_classes == 11


# ------------------------------------------------------------------------------ ag_news
def test_ag_news_through_fake_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls: list[str] = []

    def fake_load_dataset(name: str, *args: object, **kwargs: object) -> object:
        calls.append(name)
        return datasets.DatasetDict(
            train=datasets.Dataset.from_dict(
                {"text": [f"news {i}" for i in range(40)], "label": [i % 4 for i in range(40)]}
            ),
            test=datasets.Dataset.from_dict(
                {"text": [f"test {i}" for i in range(8)], "label": [i % 4 for i in range(8)]}
            ),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_ag_news()
    assert calls == ["ag_news"]
    assert splits.train.label_names == list(AG_NEWS_LABELS)
    assert splits.train.label_names == ["World", "Sports", "Business", "Sci-Tech"]
    assert len(splits.train) == 40 and len(splits.test) == 8
    assert splits.train.texts[5] == "news 5" and splits.train.labels[5] == 1
    assert "ag_news" in DATASETS
    capped = load_data(DataConfig(dataset="ag_news", max_test_examples=4), seed=0)
    assert capped.test.class_counts().tolist() == [1, 1, 1, 1]
    assert len(capped.train) == 40


# --------------------------------------------------------------------------- containers
def test_text_dataset_subset_and_validation() -> None:
    data = TextDataset(["a", "b", "c"], np.array([0, 1, 1]), ["x", "y"])
    sub = data.subset(np.array([2, 0]))
    assert sub.texts == ["c", "a"] and sub.labels.tolist() == [1, 0]
    assert sub.label_names == ["x", "y"] and sub.num_classes == 2
    with pytest.raises(ValueError):
        TextDataset(["a"], np.array([0, 1]), ["x", "y"])
    with pytest.raises(ValueError):
        TextDataset(["a"], np.array([2]), ["x", "y"])


# ----------------------------------------------------------------------------- bad input
def _write(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    ("make_config", "field", "mentions"),
    [
        (lambda p: DataConfig(dataset="imdb"), "data.dataset", ["wordnet-supersense", ".csv"]),
        (lambda p: DataConfig(dataset=str(p / "missing.csv")), "data.dataset", ["not found"]),
        (lambda p: DataConfig(dataset=_write(p, "e.csv", "")), "data.dataset", ["empty"]),
        (
            lambda p: DataConfig(dataset=_write(p, "h.csv", "text,label\n")),
            "data.dataset",
            ["no rows"],
        ),
        (
            lambda p: DataConfig(dataset=_write(p, "bad.jsonl", '{"text": "a"}\n{oops\n')),
            "data.dataset",
            ["line 2"],
        ),
        (
            lambda p: DataConfig(dataset=_write(p, "c.csv", "body,label\nx,1\n")),
            "data.text-column",
            ["'text'", "body", "label"],
        ),
        (
            lambda p: DataConfig(dataset=_write(p, "d.jsonl", '{"text": "x", "y": 1}\n')),
            "data.label-column",
            ["'label'", "text", "y"],
        ),
        (lambda p: DataConfig(test_fraction=0.0), "data.test-fraction", []),
        (lambda p: DataConfig(max_train_examples=-1), "data.max-train-examples", []),
        (lambda p: DataConfig(max_train_examples=3), "data.max-train-examples", []),
        (lambda p: DataConfig(max_test_examples=5), "data.max-test-examples", []),
    ],
)
def test_bad_data_config_raises_naming_the_field(
    tmp_path: Path, make_config: object, field: str, mentions: list[str]
) -> None:
    config = make_config(tmp_path)  # type: ignore[operator]
    with pytest.raises(ConfigError) as info:
        load_data(config, seed=0)
    message = str(info.value)
    assert message.startswith(field)
    for word in mentions:
        assert word in message


def test_unreadable_file_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"text,label\n\xff\xfe\xfa,1\n")
    with pytest.raises(ConfigError, match=r"^data\.dataset: cannot read"):
        load_text_file(path, "text", "label")
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match=r"^data\.dataset: record 1"):
        load_text_file(path, "text", "label")
    path = tmp_path / "data.tsv"
    path.write_text("text\tlabel\n")
    with pytest.raises(ConfigError, match=r"^data\.dataset: unsupported file extension"):
        load_text_file(path, "text", "label")


def test_missing_label_value_and_tiny_classes(tmp_path: Path) -> None:
    path = tmp_path / "gap.csv"
    path.write_text("text,label\na,x\nb,\n")
    with pytest.raises(ConfigError, match=r"^data\.label-column: record 2"):
        load_text_file(path, "text", "label")
    path = tmp_path / "tiny.csv"
    path.write_text("text,label\na,x\nb,y\nc,y\n")
    with pytest.raises(ConfigError, match=r"^data\.test-fraction"):
        load_data(DataConfig(dataset=str(path)), seed=0)
