"""Data files: RFC 4180 CSV, Unicode line breaks, long fields, encodings, dropped rows."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from fedalign.config import ConfigError, DataConfig
from fedalign.data import DataSplits, TextDataset, labels_only_in_test, load_data, read_text_file


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["text", "label"], *rows])
    return path


def test_rfc4180_quoting_newlines_and_u2028(tmp_path: Path) -> None:
    tricky = ['a, "quoted" comma', "two\nlines", "line\u2028separator", "crlf\r\ninside"]
    path = write_csv(tmp_path / "q.csv", [[t, "x"] for t in tricky] + [["plain", "y"]])
    data, report = read_text_file(path)
    assert data.texts == [*tricky, "plain"]
    assert data.label_names == ["x", "y"] and report.dropped == 0


def test_jsonl_with_u2028_inside_strings(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    lines = [
        json.dumps({"text": f"a\u2028b{i}", "label": i % 2}, ensure_ascii=False) for i in range(4)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data, _ = read_text_file(path)
    assert len(data) == 4 and data.texts[0] == "a\u2028b0"


def test_five_megabyte_field_is_accepted(tmp_path: Path) -> None:
    big = "word " * 1_000_000
    path = write_csv(tmp_path / "big.csv", [[big, "x"], ["small", "y"]])
    data, _ = read_text_file(path)
    assert len(data.texts[0]) == len(big.strip())


def test_encoding_key_and_decode_error_position(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\u00e9,x\nna\u00efve,y\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"line 2, column 4 \(byte offset 14\).*data\.encoding"):
        read_text_file(path)
    data, _ = read_text_file(path, encoding="latin-1")
    assert data.texts == ["caf\u00e9", "na\u00efve"]
    with pytest.raises(ConfigError, match=r"^data\.encoding must be a Python codec name"):
        load_data(DataConfig(dataset=str(path), encoding="no-such-codec"), seed=0)


def test_too_many_fields_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "extra.csv"
    path.write_text('text,label\n"a\nb",x\nc,d,e\n')
    with pytest.raises(ConfigError, match=r"line 4 of CSV file .* has 3 fields, the header has 2"):
        read_text_file(path)


def test_empty_rows_are_dropped_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [[f"t{i}", "ab"[i % 2]] for i in range(40)] + [["", "a"], ["  ", "b"], ["t", ""]]
    path = write_csv(tmp_path / "gaps.csv", rows)
    data, report = read_text_file(path)
    assert len(data) == 40
    assert report.dropped_no_text == [41, 42] and report.dropped_no_label == [43]
    with caplog.at_level(logging.WARNING, logger="fedalign.data.datasets"):
        splits = load_data(DataConfig(dataset=str(path)), seed=0)
    assert any("dropped 3 of 43 records" in note for note in splits.notes)
    assert "dropped 3 of 43" in caplog.text


def test_too_many_dropped_rows_are_an_error(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "bad.csv", [["a", "x"], ["", "x"], ["b", ""], ["c", "y"]])
    with pytest.raises(ConfigError, match=r"^data\.text-column: record 2 .*2 of 4 records"):
        read_text_file(path)


def test_labels_only_in_test_are_reported() -> None:
    train = TextDataset(["a", "b"], np.array([0, 0]), ["x", "y", "z"])
    test = TextDataset(["c", "d"], np.array([1, 2]), ["x", "y", "z"])
    assert labels_only_in_test(DataSplits(train, test)) == ["y", "z"]
