"""Labelled text sources and the global train/test split.

Three kinds of source are supported, chosen by :attr:`fedalign.config.DataConfig.dataset`:

``wordnet-supersense``
    Embedded in the package (no network): WordNet 3.0 noun glosses labelled by eight noun
    supersenses (lexicographer files), 2.6k-11.6k a class. Built by
    ``scripts/build_wordnet_dataset.py``; see that script for the text cleaning. Licence:
    ``assets/WORDNET_LICENSE``.
``wordnet-verb-supersense``
    Embedded the same way: the glosses of every WordNet 3.0 verb synset labelled by its
    fifteen verb supersenses, a long tail from about 2.4k (change) to 81 (weather)
    examples; short glosses, a harder many-class task.
``ag_news``
    The Hugging Face hub dataset, through :func:`datasets.load_dataset` (needs network).
a path ending in ``.csv``, ``.jsonl`` or ``.json``
    A local file with a text column and a label column (``.json`` is read as JSON lines,
    or as one JSON array of objects when the file starts with ``[``).
``mmlu``, ``hellaswag``
    Multiple-choice data (:mod:`fedalign.data.choices`), from the hub or from the file
    ``data.path`` in the hub's schema; grouped by subject / activity label.

:func:`load_data` returns the pooled training data (partitioned across clients later), a
class-balanced global test set that clients never see and, when ``data.validation-examples``
> 0, a class-balanced validation set held out of the training pool for the server (model
and hyper-parameter selection without the test set).
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.resources
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedalign.config import MULTIPLE_CHOICE_DATASETS, ConfigError, DataConfig, check_encoding
from fedalign.data.choices import (
    SAMPLE,
    choice_dataset,
    convert_rows,
    load_choices_from_hub,
    sample_path,
)
from fedalign.data.examples import DataSplits, TextDataset
from fedalign.errors import DataFileError

DATASETS = ("wordnet-supersense", "wordnet-verb-supersense", "ag_news", *MULTIPLE_CHOICE_DATASETS)
"""Named sources accepted by ``data.dataset`` (besides file paths)."""

FILE_EXTENSIONS = (".csv", ".jsonl", ".json")
"""File extensions accepted by ``data.dataset``."""

CHOICE_FILE_EXTENSIONS = (".jsonl", ".json")
"""File extensions accepted by ``data.path`` (multiple-choice files)."""

WORDNET_LEXFILES: dict[int, str] = {
    4: "act",
    5: "animal",
    6: "artifact",
    10: "communication",
    13: "food",
    15: "location",
    18: "person",
    20: "plant",
}
"""WordNet lexicographer file number -> supersense label kept in the embedded dataset."""

WORDNET_SUPERSENSES: tuple[str, ...] = tuple(sorted(WORDNET_LEXFILES.values()))
"""Label names of the embedded dataset, in label-id order."""

WORDNET_VERB_LEXFILES: dict[int, str] = {
    29: "body",
    30: "change",
    31: "cognition",
    32: "communication",
    33: "competition",
    34: "consumption",
    35: "contact",
    36: "creation",
    37: "emotion",
    38: "motion",
    39: "perception",
    40: "possession",
    41: "social",
    42: "stative",
    43: "weather",
}
"""WordNet lexicographer file number -> verb supersense (all fifteen)."""

WORDNET_VERB_SUPERSENSES: tuple[str, ...] = tuple(sorted(WORDNET_VERB_LEXFILES.values()))
"""Label names of the embedded verb dataset, in label-id order."""

AG_NEWS_LABELS: tuple[str, ...] = ("World", "Sports", "Business", "Sci-Tech")
"""Label names of AG News in label-id order (the hub calls the last one ``Sci/Tech``)."""

_WORDNET_ASSET = "wordnet_supersense.jsonl.gz"
_WORDNET_VERB_ASSET = "wordnet_verb_supersense.jsonl.gz"
_INT_PATTERN = re.compile(r"^\s*[+-]?\d+\s*$")


# ------------------------------------------------------------------------------ sources
@functools.lru_cache(maxsize=2)
def _read_wordnet_asset(
    asset: str = _WORDNET_ASSET, names: tuple[str, ...] = WORDNET_SUPERSENSES
) -> tuple[tuple[str, ...], np.ndarray]:
    resource = importlib.resources.files("fedalign.data").joinpath("assets", asset)
    raw = gzip.decompress(resource.read_bytes()).decode("utf-8")
    ids = {name: i for i, name in enumerate(names)}
    texts: list[str] = []
    labels: list[int] = []
    for line in raw.splitlines():
        if line:
            record = json.loads(line)
            texts.append(record["text"])
            labels.append(ids[record["label"]])
    array = np.asarray(labels, dtype=np.int64)
    array.setflags(write=False)
    return tuple(texts), array


def load_wordnet_supersense() -> TextDataset:
    """Load the embedded WordNet supersense dataset (no network).

    Returns
    -------
    TextDataset
        About 56k noun glosses in file order, labelled with one of
        :data:`WORDNET_SUPERSENSES`. The parsed asset is cached; each call returns a
        fresh copy.
    """
    texts, labels = _read_wordnet_asset()
    return TextDataset(list(texts), labels.copy(), list(WORDNET_SUPERSENSES))


def load_wordnet_verb_supersense() -> TextDataset:
    """Load the embedded WordNet verb supersense dataset (no network).

    Returns
    -------
    TextDataset
        About 13.7k verb glosses in file order, labelled with one of the fifteen
        :data:`WORDNET_VERB_SUPERSENSES` (a long tail: 81 ``weather`` glosses against about
        2.4k ``change``). Cached like :func:`load_wordnet_supersense`.
    """
    texts, labels = _read_wordnet_asset(_WORDNET_VERB_ASSET, WORDNET_VERB_SUPERSENSES)
    return TextDataset(list(texts), labels.copy(), list(WORDNET_VERB_SUPERSENSES))


def load_ag_news() -> DataSplits:
    """Load AG News from the Hugging Face hub with ``datasets.load_dataset("ag_news")``.

    Needs network access (or a populated ``datasets`` cache).

    Returns
    -------
    DataSplits
        The hub's train (120k) and test (7.6k, balanced) splits, labels
        :data:`AG_NEWS_LABELS`.
    """
    import datasets  # lazy: importing it is slow and only this source needs it

    dataset_dict = datasets.load_dataset("ag_news")

    def convert(split: str) -> TextDataset:
        part = dataset_dict[split]
        return TextDataset(
            texts=[str(t) for t in part["text"]],
            labels=np.asarray(list(part["label"]), dtype=np.int64),
            label_names=list(AG_NEWS_LABELS),
        )

    return DataSplits(train=convert("train"), test=convert("test"))


MAX_DROPPED_SHARE = 0.5
"""Rows without a text or a label are dropped (and counted) while they are fewer than this
share of the file; at this share or above the file is refused."""

_CSV_FIELD_LIMIT = 2**31 - 1
"""Largest CSV field accepted (the ``csv`` module's default, 128 KiB, would refuse long
documents; the tokenizer truncates them later)."""

logger = logging.getLogger(__name__)


def _decode(path: Path, encoding: str) -> str:
    """The file's text in ``encoding`` (a UTF-8 byte-order mark is skipped).

    Raises
    ------
    DataFileError
        When the file cannot be read or decoded; a decode error names the line, the column
        and the byte offset of the first bad byte.
    ConfigError
        When ``encoding`` is no Python codec (``data.encoding``).
    """
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataFileError(f"data.dataset: cannot read {str(path)!r}: {error}") from error
    codec = check_encoding(encoding)
    try:
        return raw.decode("utf-8-sig" if codec == "utf-8" else encoding)
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        bad = raw[error.start : error.end].hex(" ")
        raise DataFileError(
            f"data.dataset: cannot read {str(path)!r} as {encoding} (data.encoding): "
            f"byte(s) {bad} at line {line}, column {column} (byte offset {error.start}): "
            f"{error.reason}; set data.encoding to the file's encoding, e.g. 'latin-1'"
        ) from error


def _csv_rows(path: Path, content: str) -> list[dict[str, Any]]:
    """RFC 4180 rows of a CSV text with a header row (quoted fields may hold commas,
    doubled quotes, newlines and U+2028)."""
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    rows: list[dict[str, Any]] = []
    try:
        header = next(reader, None)
        if not header or not any(name.strip() for name in header):
            raise DataFileError(f"data.dataset: CSV file {str(path)!r} has no header row")
        for fields_ in reader:
            if not fields_:
                continue  # blank line
            if len(fields_) > len(header):
                raise DataFileError(
                    f"data.dataset: line {reader.line_num} of CSV file {str(path)!r} has "
                    f"{len(fields_)} fields, the header has {len(header)} (quote fields "
                    "that contain commas)"
                )
            rows.append(dict(zip(header, fields_, strict=False)))
    except csv.Error as error:
        raise DataFileError(
            f"data.dataset: CSV file {str(path)!r} is unreadable at line {reader.line_num}: {error}"
        ) from error
    if not rows:
        raise DataFileError(f"data.dataset: CSV file {str(path)!r} has a header but no rows")
    return rows


def _json_rows(path: Path, content: str) -> list[dict[str, Any]]:
    """Objects of a JSON-lines text (or of one JSON array when it starts with ``[``).

    Lines are split at ``\\n`` only: U+2028 and other Unicode line breaks may appear inside
    JSON strings.
    """
    if path.suffix.lower() == ".json" and content.lstrip().startswith("["):
        try:
            items = list(json.loads(content))
        except json.JSONDecodeError as error:
            raise DataFileError(
                f"data.dataset: JSON file {str(path)!r} is unreadable: {error}"
            ) from error
    else:
        items = []
        for number, line in enumerate(content.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataFileError(
                    f"data.dataset: line {number} of {str(path)!r} is not valid JSON "
                    f"(expected one JSON object per line): {error}"
                ) from error
    rows: list[dict[str, Any]] = []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise DataFileError(
                f"data.dataset: record {number} of {str(path)!r} is not a JSON object"
            )
        rows.append(item)
    if not rows:
        raise DataFileError(f"data.dataset: file {str(path)!r} has no records")
    return rows


def _read_rows(path: Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Read a CSV / JSON-lines / JSON-array file into a list of row dicts.

    The standard library reads them (``csv`` is RFC 4180 compliant; JSON lines are split
    at ``\\n`` only). The ``datasets`` csv/json builders work offline too, but were not
    used: the csv builder (pandas) silently takes the first column as an index when a row
    has one field too many, infers types (``"007"`` becomes 7), and neither builder names
    the line of a bad record; the json builder turns a line ``[1, 2]`` into a column.
    """
    content = _decode(path, encoding)
    if not content.strip():
        raise DataFileError(f"data.dataset: file {str(path)!r} is empty")
    if path.suffix.lower() == ".csv":
        return _csv_rows(path, content)
    return _json_rows(path, content)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key is not None:
                seen.setdefault(str(key), None)
    return list(seen)


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, str) and bool(_INT_PATTERN.match(value))


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


@dataclass
class FileReport:
    """What :func:`read_text_file` kept and dropped.

    Parameters
    ----------
    records : int
        Records in the file.
    dropped_no_text : list of int
        Record numbers (1-based) dropped for an empty or missing text.
    dropped_no_label : list of int
        Record numbers dropped for an empty or missing label (and a text).
    """

    records: int
    dropped_no_text: list[int]
    dropped_no_label: list[int]

    @property
    def dropped(self) -> int:
        return len(self.dropped_no_text) + len(self.dropped_no_label)

    def message(self, path: Path | str) -> str:
        """One line for the log (empty when nothing was dropped)."""
        if not self.dropped:
            return ""
        return (
            f"data.dataset: dropped {self.dropped} of {self.records} records of "
            f"{str(path)!r} ({len(self.dropped_no_text)} without text, "
            f"{len(self.dropped_no_label)} without label; first: record "
            f"{min(self.dropped_no_text + self.dropped_no_label)})"
        )


def read_text_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
) -> tuple[TextDataset, FileReport]:
    """Load a labelled text file and say which records were dropped.

    Parameters
    ----------
    path : str or pathlib.Path
        A ``.csv`` file with a header row (RFC 4180: quoted fields may hold commas, quotes,
        newlines), a ``.jsonl`` file (one JSON object per line) or a ``.json`` file (JSON
        lines, or one JSON array of objects).
    text_column : str, default "text"
        Column (key) holding the text; surrounding whitespace is stripped. Texts of any
        length are accepted (the tokenizer truncates them).
    label_column : str, default "label"
        Column (key) holding the label. If every label is an integer (``"3"`` counts in a
        CSV) the integers are kept as class ids and the class names are ``"0"`` ..
        ``str(max)``; otherwise labels are read as strings and the sorted unique names get
        ids ``0, 1, ...``.
    encoding : str, default "utf-8"
        The file's text encoding (``data.encoding``).

    Returns
    -------
    TextDataset
        The records with a text and a label.
    FileReport
        The records dropped for an empty or missing text or label.

    Raises
    ------
    ConfigError
        (:class:`~fedalign.errors.DataFileError`) If the file is missing, has an unsupported
        extension, is empty, undecodable (naming line and column) or unreadable (naming the
        line), lacks a column, has a negative integer label, or at least
        :data:`MAX_DROPPED_SHARE` of its records lack a text or a label.
    """
    path = Path(path)
    if path.suffix.lower() not in FILE_EXTENSIONS:
        raise DataFileError(
            f"data.dataset: unsupported file extension {path.suffix!r} for {str(path)!r}; "
            f"accepted extensions: {list(FILE_EXTENSIONS)}"
        )
    if not path.is_file():
        raise DataFileError(f"data.dataset: file {str(path)!r} not found")
    rows = _read_rows(path, encoding)
    columns = _columns(rows)
    for field_name, column in (
        ("data.text-column", text_column),
        ("data.label-column", label_column),
    ):
        if column not in columns:
            raise DataFileError(
                f"{field_name}: column {column!r} not found in {str(path)!r}; "
                f"the file has columns {columns}"
            )
    texts: list[str] = []
    raw_labels: list[Any] = []
    report = FileReport(records=len(rows), dropped_no_text=[], dropped_no_label=[])
    for number, row in enumerate(rows, start=1):
        text, label = row.get(text_column), row.get(label_column)
        if _blank(text):
            report.dropped_no_text.append(number)
        elif _blank(label):
            report.dropped_no_label.append(number)
        else:
            texts.append(str(text).strip())
            raw_labels.append(label)
    if report.dropped and report.dropped >= MAX_DROPPED_SHARE * report.records:
        first = min(report.dropped_no_text + report.dropped_no_label)
        field_name, column = (
            ("data.text-column", text_column)
            if first in report.dropped_no_text
            else ("data.label-column", label_column)
        )
        raise DataFileError(
            f"{field_name}: record {first} of {str(path)!r} has no {column!r} value, and "
            f"{report.dropped} of {report.records} records lack a text or label: at least "
            f"{MAX_DROPPED_SHARE:.0%} of the file, refused (check data.text-column, "
            "data.label-column and data.encoding)"
        )
    if all(_is_int(v) for v in raw_labels):
        ids = np.asarray([int(float(v)) if not isinstance(v, str) else int(v) for v in raw_labels])
        if ids.min() < 0:
            raise DataFileError(
                f"data.label-column: integer labels in {str(path)!r} must be >= 0 "
                f"(got {int(ids.min())})"
            )
        names = [str(i) for i in range(int(ids.max()) + 1)]
        return TextDataset(texts, ids.astype(np.int64), names), report
    strings = [str(v).strip() for v in raw_labels]
    names = sorted(set(strings))
    lookup = {name: i for i, name in enumerate(names)}
    labels = np.asarray([lookup[s] for s in strings], dtype=np.int64)
    return TextDataset(texts, labels, names), report


def load_text_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
) -> TextDataset:
    """:func:`read_text_file`, logging a warning when records were dropped.

    Parameters
    ----------
    path : str or pathlib.Path
    text_column : str, default "text"
    label_column : str, default "label"
    encoding : str, default "utf-8"

    Returns
    -------
    TextDataset
    """
    dataset, report = read_text_file(path, text_column, label_column, encoding)
    if report.dropped:
        logger.warning(report.message(path))
    return dataset


# ------------------------------------------------------------------------ global split
def _check_data_config(config: DataConfig) -> None:
    """Validate ``config`` before anything is loaded: the source exists, the section's own
    rules (:meth:`DataConfig.validate`), a file's columns."""
    name = config.dataset
    is_file = Path(name).suffix.lower() in FILE_EXTENSIONS
    if name not in DATASETS and not is_file:
        raise ConfigError(
            f"data.dataset must be one of {list(DATASETS)} or a path ending in "
            f"{', '.join(FILE_EXTENSIONS)} (got {name!r})"
        )
    if is_file and name not in DATASETS and not Path(name).is_file():
        raise ConfigError(f"data.dataset: file {name!r} not found")
    if config.path and name not in MULTIPLE_CHOICE_DATASETS:
        raise ConfigError(
            f"data.path is read only for data.dataset in {list(MULTIPLE_CHOICE_DATASETS)} "
            f"(got data.dataset {name!r}); give a classification file as data.dataset"
        )
    if config.path and config.path != SAMPLE:
        if Path(config.path).suffix.lower() not in CHOICE_FILE_EXTENSIONS:
            raise ConfigError(
                f"data.path must be {SAMPLE!r} or a file ending in "
                f"{', '.join(CHOICE_FILE_EXTENSIONS)} (got {config.path!r})"
            )
        if not Path(config.path).is_file():
            raise ConfigError(f"data.path: file {config.path!r} not found")
    config.validate()
    if is_file:
        for field_name, column in (
            ("data.text-column", config.text_column),
            ("data.label-column", config.label_column),
        ):
            if not column:
                raise ConfigError(f"{field_name} must be a non-empty column name")


def _present_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.flatnonzero(np.bincount(labels, minlength=num_classes) > 0)


def holdout_balanced_test(dataset: TextDataset, test_fraction: float, seed: int) -> DataSplits:
    """Split off a class-balanced test set.

    Every class present gets ``per_class = min(floor(test_fraction * N / C),
    min_class_count // 2)`` test examples, drawn at random; ``C`` counts the classes present.

    Parameters
    ----------
    dataset : TextDataset
        The whole labelled pool.
    test_fraction : float
        Target fraction of the pool held out (the balance constraint may give less).
    seed : int
        Seeds the draw.

    Returns
    -------
    DataSplits
        Train and test, each with indices in the pool's original order.

    Raises
    ------
    ConfigError
        If the test set would be empty (a class has fewer than 2 examples or the fraction is
        too small).
    """
    counts = dataset.class_counts()
    present = _present_classes(dataset.labels, dataset.num_classes)
    n = len(dataset)
    per_class = min(math.floor(test_fraction * n / len(present)), int(counts[present].min()) // 2)
    if per_class < 1:
        raise ConfigError(
            f"data.test-fraction ({test_fraction}) leaves an empty balanced test set for "
            f"{n} examples over {len(present)} classes (smallest class: "
            f"{int(counts[present].min())} examples); every class needs >= 2 examples"
        )
    rng = np.random.default_rng([seed, 0x7E57])
    test_mask = np.zeros(n, dtype=bool)
    for c in present:
        members = np.flatnonzero(dataset.labels == c)
        test_mask[rng.choice(members, size=per_class, replace=False)] = True
    return DataSplits(
        train=dataset.subset(np.flatnonzero(~test_mask)),
        test=dataset.subset(np.flatnonzero(test_mask)),
    )


VALIDATION_SEED = 0x7A11D
"""Mixed with the seed to draw the validation examples (a stream of their own)."""


def hold_out_validation(
    dataset: TextDataset, count: int, seed: int
) -> tuple[TextDataset, TextDataset | None]:
    """Split ``count`` class-balanced examples off the training pool (server validation).

    Every class present gets ``count // C`` examples and ``count % C`` classes (drawn at
    random) one more, so exactly ``count`` are held out; ``C`` counts the classes present.
    No class may give up more than half of its examples (clients must still see it).

    Parameters
    ----------
    dataset : TextDataset
        The training pool (before ``data.max-train-examples`` and the partition).
    count : int
        ``data.validation-examples``; 0 holds out nothing.
    seed : int
        Seeds the draw (its own stream, :data:`VALIDATION_SEED`).

    Returns
    -------
    (TextDataset, TextDataset or None)
        The remaining pool and the validation set, both in the pool's original order
        (None when ``count`` is 0).

    Raises
    ------
    ConfigError
        When ``count`` is below the number of classes or a class would give up more than
        half of its examples.
    """
    if count <= 0:
        return dataset, None
    counts = dataset.class_counts()
    present = _present_classes(dataset.labels, dataset.num_classes)
    if count < len(present):
        raise ConfigError(
            f"data.validation-examples ({count}) must be 0 or >= the number of classes "
            f"({len(present)}) so that every class is in the validation set"
        )
    rng = np.random.default_rng([seed, VALIDATION_SEED])
    wanted = np.full(len(present), count // len(present), dtype=np.int64)
    wanted[rng.choice(len(present), size=count % len(present), replace=False)] += 1
    limit = int(counts[present].min()) // 2
    if int(wanted.max()) > limit:
        raise ConfigError(
            f"data.validation-examples ({count}) is too many for a training pool of "
            f"{len(dataset)} examples over {len(present)} classes (smallest class: "
            f"{int(counts[present].min())} examples; a class gives up at most half): use "
            f"at most {limit * len(present)}"
        )
    mask = np.zeros(len(dataset), dtype=bool)
    for c, size in zip(present, wanted, strict=True):
        members = np.flatnonzero(dataset.labels == c)
        mask[rng.choice(members, size=int(size), replace=False)] = True
    return dataset.subset(np.flatnonzero(~mask)), dataset.subset(np.flatnonzero(mask))


def _cap_train(dataset: TextDataset, cap: int, seed: int) -> TextDataset:
    """Random subsample of ``cap`` examples that keeps one of every present class."""
    n = len(dataset)
    if cap <= 0 or cap >= n:
        return dataset
    present = _present_classes(dataset.labels, dataset.num_classes)
    if cap < len(present):
        raise ConfigError(
            f"data.max-train-examples ({cap}) must be >= the number of classes ({len(present)})"
        )
    rng = np.random.default_rng([seed, 0x7CA9])
    order = rng.permutation(n)
    ordered_labels = dataset.labels[order]
    # first occurrence of every class in the shuffled order, then fill with the rest
    _, first = np.unique(ordered_labels, return_index=True)
    chosen = np.zeros(n, dtype=bool)
    chosen[first] = True
    rest = np.flatnonzero(~chosen)[: cap - len(first)]
    chosen[rest] = True
    return dataset.subset(np.sort(order[chosen]))


def _cap_test(dataset: TextDataset, cap: int, seed: int) -> TextDataset:
    """Keep ``cap // C`` random examples of every present class (at most ``cap`` in all)."""
    kept = _cap_test_indices(dataset, cap, seed)
    return dataset if kept is None else dataset.subset(kept)


def _spare_test(dataset: TextDataset, cap: int, seed: int) -> TextDataset | None:
    """The examples :func:`_cap_test` leaves out, in their order; None when none are."""
    kept = _cap_test_indices(dataset, cap, seed)
    if kept is None or len(kept) == len(dataset):
        return None
    spare = np.ones(len(dataset), dtype=bool)
    spare[kept] = False
    return dataset.subset(np.flatnonzero(spare))


def _cap_test_indices(dataset: TextDataset, cap: int, seed: int) -> np.ndarray | None:
    """Sorted indices :func:`_cap_test` keeps; None when it keeps everything."""
    if cap <= 0 or cap >= len(dataset):
        return None
    present = _present_classes(dataset.labels, dataset.num_classes)
    per_class = cap // len(present)
    if per_class < 1:
        raise ConfigError(
            f"data.max-test-examples ({cap}) must be >= the number of classes ({len(present)})"
        )
    rng = np.random.default_rng([seed, 0x7CAB])
    keep: list[np.ndarray] = []
    for c in present:
        members = np.flatnonzero(dataset.labels == c)
        keep.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def load_data(config: DataConfig, seed: int) -> DataSplits:
    """Load the configured source and return the pooled train data and global test set.

    Sources without a test split get a class-balanced held-out test set (see
    :func:`holdout_balanced_test`). Records of a file without a text or label are dropped
    (:func:`read_text_file`); dropped records and labels found only in the test split are
    reported in ``DataSplits.notes`` and logged. Then ``validation_examples`` are held out
    of the training pool (:func:`hold_out_validation`), and ``max_train_examples`` (a
    random subsample of the rest keeping every class) and ``max_test_examples`` (``cap //
    C`` per class, keeping the balance) apply when > 0.

    Parameters
    ----------
    config : DataConfig
        ``dataset``, ``text_column``, ``label_column``, ``encoding``,
        ``max_train_examples``, ``max_test_examples``, ``validation_examples`` and
        ``test_fraction`` are used.
    seed : int
        Seeds the hold-out and the subsampling (each with its own stream).

    Returns
    -------
    DataSplits

    Raises
    ------
    ConfigError
        For an unknown dataset, a missing or unreadable file, a missing column or an
        out-of-range fraction or cap, before anything heavy is done.
    """
    _check_data_config(config)
    notes: list[str] = []
    if config.dataset == "ag_news":
        splits = load_ag_news()
    elif config.dataset in MULTIPLE_CHOICE_DATASETS:
        splits = _load_choices(config, seed)
    else:
        if config.dataset == "wordnet-supersense":
            pool = load_wordnet_supersense()
        elif config.dataset == "wordnet-verb-supersense":
            pool = load_wordnet_verb_supersense()
        else:
            pool, report = read_text_file(
                config.dataset, config.text_column, config.label_column, config.encoding
            )
            if report.dropped:
                notes.append(report.message(config.dataset))
        splits = holdout_balanced_test(pool, config.test_fraction, seed)
    pool, validation = hold_out_validation(splits.train, config.validation_examples, seed)
    result = DataSplits(
        train=_cap_train(pool, config.max_train_examples, seed),
        test=_cap_test(splits.test, config.max_test_examples, seed),
        spare_test=_spare_test(splits.test, config.max_test_examples, seed),
        validation=validation,
    )
    test_only = labels_only_in_test(result)
    if test_only:
        notes.append(
            f"data.dataset: labels {test_only} appear only in the test split (no client can "
            "learn them)"
        )
    result.notes = notes
    for note in notes:
        logger.warning(note)
    return result


def _load_choices(config: DataConfig, seed: int) -> DataSplits:
    """MMLU / HellaSwag from ``data.path`` (or the shipped sample) or the hub; a pool
    without a test split gets a group-balanced held-out test set."""
    name = config.dataset
    if config.path:
        path = sample_path(name) if config.path == SAMPLE else Path(config.path)
        rows = _read_rows(path, config.encoding)
        pool = choice_dataset(convert_rows(name, rows, str(path)))
        return holdout_balanced_test(pool, config.test_fraction, seed)
    splits = load_choices_from_hub(name)
    if len(splits.test) == 0:
        return holdout_balanced_test(splits.train, config.test_fraction, seed)
    return splits


def labels_only_in_test(splits: DataSplits) -> list[str]:
    """Names of the labels present in ``splits.test`` but absent from ``splits.train``."""
    train = set(np.unique(splits.train.labels).tolist())
    test = set(np.unique(splits.test.labels).tolist())
    return [splits.test.label_names[i] for i in sorted(test - train)]
