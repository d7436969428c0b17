#!/usr/bin/env python
"""Build the embedded WordNet supersense datasets from WordNet 3.0 ``data.noun`` and
``data.verb`` files (Debian package ``wordnet-base``).

Each synset line holds its lexicographer file number (the supersense) in field 2 and its
gloss after ``" | "``. The noun dataset keeps the synsets of eight large noun supersenses
(:data:`fedalign.data.datasets.WORDNET_LEXFILES`), the verb dataset every verb synset with
its fifteen supersenses (:data:`fedalign.data.datasets.WORDNET_VERB_LEXFILES`). Each is
written as one JSON line ``{"label": "animal", "text": "..."}`` per example to a gzip file
whose bytes depend only on the input (fixed gzip header, input order), so a rebuild is
byte-identical.

Text cleaning (kept deliberately simple):

* the gloss is stripped of surrounding whitespace;
* quoted example sentences are dropped by cutting the gloss at its first ``; "`` (WordNet
  separates examples from the definition that way) and stripping a trailing ``;``; the few
  quotes written differently stay in the text;
* exact duplicate texts keep only their first occurrence; texts that occur under two
  different supersenses are dropped entirely (they cannot be labelled).

The WordNet licence block of the Debian ``copyright`` file is copied, verbatim apart from
Debian's one-space indentation, into ``WORDNET_LICENSE`` next to the asset.

Usage::

    python scripts/build_wordnet_dataset.py [--data-noun /usr/share/wordnet/data.noun]
        [--data-verb /usr/share/wordnet/data.verb]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import io
import json
from collections.abc import Iterable
from pathlib import Path

from fedalign.data.datasets import WORDNET_LEXFILES, WORDNET_VERB_LEXFILES

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSET_DIR = REPO_ROOT / "src" / "fedalign" / "data" / "assets"
DEFAULT_DATA_NOUN = Path("/usr/share/wordnet/data.noun")
DEFAULT_DATA_VERB = Path("/usr/share/wordnet/data.verb")
DEFAULT_COPYRIGHT = Path("/usr/share/doc/wordnet-base/copyright")

LICENSE_HEADER = """\
wordnet_supersense.jsonl.gz is derived from WordNet 3.0 (the noun database, data.noun):
the glosses of the noun synsets of eight lexicographer files (noun.act, noun.animal,
noun.artifact, noun.communication, noun.food, noun.location, noun.person, noun.plant),
labelled by that file, with quoted example sentences removed.
wordnet_verb_supersense.jsonl.gz is derived from WordNet 3.0 (the verb database,
data.verb) the same way: the glosses of every verb synset, labelled by its lexicographer
file (verb.body ... verb.weather). Both are redistributed under the WordNet 3.0 licence
below.

"""


def clean_gloss(gloss: str) -> str:
    """Return the definition part of a WordNet gloss.

    Parameters
    ----------
    gloss : str
        The text after ``" | "`` on a synset line.

    Returns
    -------
    str
        The gloss cut at its first ``; "`` (the start of the example sentences), stripped
        of whitespace and of a trailing ``;``. If that leaves nothing, the stripped full
        gloss.
    """
    full = gloss.strip()
    definition = full.split('; "', 1)[0].strip().rstrip(";").strip()
    return definition or full


def parse_data_noun(
    lines: Iterable[str], lexfiles: dict[int, str] = WORDNET_LEXFILES
) -> list[tuple[str, str]]:
    """Extract ``(text, label)`` pairs from the lines of a WordNet ``data.noun`` (or, with
    ``lexfiles`` = :data:`WORDNET_VERB_LEXFILES`, ``data.verb``) file.

    Parameters
    ----------
    lines : iterable of str
        The file's lines; licence header lines (starting with two spaces) are skipped.
    lexfiles : dict of int to str
        Lexicographer file numbers to keep, with their labels.

    Returns
    -------
    list of (str, str)
        One pair per kept synset in file order, with duplicates removed as described in
        the module docstring; labels are supersense names such as ``"animal"``.
    """
    pairs: list[tuple[str, str]] = []
    for line in lines:
        if line.startswith("  ") or " | " not in line:
            continue
        fields = line.split(" ", 2)
        if len(fields) < 3 or not fields[1].isdigit():
            continue
        label = lexfiles.get(int(fields[1]))
        if label is None:
            continue
        text = clean_gloss(line.split(" | ", 1)[1])
        if text:
            pairs.append((text, label))
    labels_of: dict[str, set[str]] = collections.defaultdict(set)
    for text, label in pairs:
        labels_of[text].add(label)
    seen: set[str] = set()
    kept: list[tuple[str, str]] = []
    for text, label in pairs:
        if len(labels_of[text]) > 1 or text in seen:
            continue
        seen.add(text)
        kept.append((text, label))
    return kept


def to_gzip_jsonl(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Serialise pairs as deterministic gzip JSON lines.

    Parameters
    ----------
    pairs : iterable of (str, str)
        ``(text, label)`` pairs.

    Returns
    -------
    bytes
        Gzip data (no file name, modification time 0, level 9) of one
        ``{"label": ..., "text": ...}`` object per line.
    """
    payload = "".join(
        json.dumps({"label": label, "text": text}, ensure_ascii=False, sort_keys=True) + "\n"
        for text, label in pairs
    ).encode("utf-8")
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    return buffer.getvalue()


def extract_wordnet_license(copyright_text: str) -> str:
    """Return the WordNet licence paragraph of a Debian ``copyright`` file.

    Parameters
    ----------
    copyright_text : str
        The text of ``/usr/share/doc/wordnet-base/copyright`` (machine-readable format).

    Returns
    -------
    str
        The licence body with the one-space indentation removed and ``" ."`` lines turned
        into blank lines.

    Raises
    ------
    ValueError
        If no ``License: WordNet`` paragraph is found.
    """
    lines = copyright_text.splitlines()
    out: list[str] = []
    inside = False
    for line in lines:
        if not inside:
            if line.startswith("License:") and "wordnet" in line.lower():
                inside = True
            continue
        if not line.startswith(" "):
            break
        body = line[1:]
        out.append("" if body.strip() == "." else body)
    if not out:
        raise ValueError("no 'License: WordNet...' paragraph found in the copyright file")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Build the asset and licence file; print per-class counts.

    Parameters
    ----------
    argv : list of str or None, default None
        Command-line arguments (``None`` reads ``sys.argv``).

    Returns
    -------
    int
        Exit status (0 on success).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-noun", type=Path, default=DEFAULT_DATA_NOUN)
    parser.add_argument("--data-verb", type=Path, default=DEFAULT_DATA_VERB)
    parser.add_argument("--copyright", type=Path, default=DEFAULT_COPYRIGHT)
    parser.add_argument("--out-dir", type=Path, default=ASSET_DIR)
    args = parser.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for source, lexfiles, name in (
        (args.data_noun, WORDNET_LEXFILES, "wordnet_supersense.jsonl.gz"),
        (args.data_verb, WORDNET_VERB_LEXFILES, "wordnet_verb_supersense.jsonl.gz"),
    ):
        with source.open(encoding="utf-8") as handle:
            pairs = parse_data_noun(handle, lexfiles)
        data = to_gzip_jsonl(pairs)
        asset = args.out_dir / name
        asset.write_bytes(data)
        counts = collections.Counter(label for _, label in pairs)
        print(f"wrote {asset} ({len(data)} bytes, {len(pairs)} examples)")
        for label in sorted(counts):
            print(f"  {label:<14} {counts[label]:>6}")
    licence = LICENSE_HEADER + extract_wordnet_license(args.copyright.read_text(encoding="utf-8"))
    (args.out_dir / "WORDNET_LICENSE").write_text(licence, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
