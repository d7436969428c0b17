"""Turn a :class:`~fedalign.data.datasets.TextDataset` into padded token tensors.

Texts are tokenized in chunks (no padding by the tokenizer), truncated to ``max_length``
tokens including special tokens, and right-padded here to the longest example. When the
tokenizer defines no pad token, the eos token (else the unk token) pads instead; the
attention mask marks padding either way, so the choice does not change a model's output.
Use :func:`pad_token_id` to get the same id on the model side.

Multiple-choice examples (:func:`tokenize_choices`) become one sequence per choice,
``start + context + " " + choice``, with a target mask marking the choice's tokens (the
tokens a causal LM is scored and trained on); contexts too long for ``max_length`` lose
their beginning, never the choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedalign.config import ConfigError
from fedalign.data.examples import MultipleChoiceDataset, TextDataset

DEFAULT_CHUNK_SIZE = 2048
"""Texts tokenized per call to the tokenizer."""


@dataclass
class TokenizedData:
    """Right-padded token ids, attention masks and labels.

    Parameters
    ----------
    input_ids : torch.Tensor
        ``(N, T)`` int64, padded with the pad id to ``T`` = longest example; multiple
        choice: ``(N, K, T)``, one sequence per choice.
    attention_mask : torch.Tensor
        Same shape, int64, 1 for tokens and 0 for padding (a missing choice is all 0).
    labels : torch.Tensor
        ``(N,)`` int64 class ids; multiple choice: the index of the correct choice.
    target_mask : torch.Tensor or None, default None
        Multiple choice only: same shape as ``input_ids``, 1 on the choice's tokens.
    task : str, default "classification"
        ``classification`` or ``multiple-choice``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    target_mask: torch.Tensor | None = None
    task: str = "classification"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real (non-padding) tokens per sequence: ``(N,)`` (``(N, K)`` for
        multiple choice), int64."""
        return self.attention_mask.sum(dim=-1)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> TokenizedData:
        """Return the examples at ``indices``, trimming ``T`` to their longest example.

        Parameters
        ----------
        indices : sequence of int, numpy.ndarray or torch.Tensor
            Positions into this data, in the order wanted.

        Returns
        -------
        TokenizedData
            A copy; ``T`` is 0 for an empty selection.
        """
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        mask = self.attention_mask[idx]
        width = int(mask.sum(dim=-1).max()) if len(idx) else 0
        target = self.target_mask
        return TokenizedData(
            input_ids=self.input_ids[idx, ..., :width].clone(),
            attention_mask=mask[..., :width].clone(),
            labels=self.labels[idx].clone(),
            target_mask=None if target is None else target[idx, ..., :width].clone(),
            task=self.task,
        )


def pad_token_id(tokenizer: Any) -> int:
    """Return the id used for padding: the pad token, else eos, else unk.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        Any tokenizer with ``pad_token_id`` / ``eos_token_id`` / ``unk_token_id``.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        If the tokenizer has none of the three.
    """
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, list):  # some tokenizers list several eos ids
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has no pad, eos or unk token to pad with")


def tokenize_dataset(
    dataset: TextDataset,
    tokenizer: Any,
    max_length: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TokenizedData:
    """Tokenize every text of ``dataset``.

    Parameters
    ----------
    dataset : TextDataset
        Texts and labels.
    tokenizer : transformers.PreTrainedTokenizerBase
        Called as ``tokenizer(texts, truncation=True, max_length=max_length)`` with its
        special tokens; it is not modified.
    max_length : int
        Most tokens per example, special tokens included.
    chunk_size : int, default 2048
        Texts per tokenizer call (bounds peak memory).

    Returns
    -------
    TokenizedData
        Right-padded with :func:`pad_token_id` to the longest example (``<= max_length``).

    Raises
    ------
    ConfigError
        If ``max_length < 1`` (``model.max-length``).
    ValueError
        If ``chunk_size < 1`` or the tokenizer has nothing to pad with.
    """
    if max_length < 1:
        raise ConfigError(f"model.max-length must be >= 1 (got {max_length})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    pad_id = pad_token_id(tokenizer)
    n = len(dataset)
    chunks: list[np.ndarray] = []
    lengths = np.zeros(n, dtype=np.int64)
    for start in range(0, n, chunk_size):
        texts = dataset.texts[start : start + chunk_size]
        encoded = tokenizer(
            texts,
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        width = max((len(ids) for ids in encoded), default=0)
        block = np.full((len(texts), width), pad_id, dtype=np.int64)
        for row, ids in enumerate(encoded):
            ids = ids[:max_length]
            block[row, : len(ids)] = ids
            lengths[start + row] = len(ids)
        chunks.append(block)
    width = int(lengths.max()) if n else 0
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    row = 0
    for block in chunks:
        input_ids[row : row + len(block), : block.shape[1]] = block[:, :width]
        row += len(block)
    attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return TokenizedData(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        labels=torch.from_numpy(dataset.labels.astype(np.int64, copy=True)),
    )


CONTINUATION_SEPARATOR = " "
"""Joins a multiple-choice context and a choice (a leading space keeps BPE tokenizers'
word-initial tokens)."""


def start_token_id(tokenizer: Any) -> int | None:
    """The token a sequence starts with: bos, else cls, else None."""
    for name in ("bos_token_id", "cls_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def _encode(tokenizer: Any, texts: list[str], chunk_size: int) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), chunk_size):
        encoded = tokenizer(
            texts[start : start + chunk_size],
            add_special_tokens=False,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        ids.extend(list(row) for row in encoded)
    return ids


def choice_sequence(
    start: list[int], context: list[int], choice: list[int], max_length: int
) -> tuple[list[int], int]:
    """``start + context + choice`` cut to ``max_length`` tokens, and the choice's length.

    The choice keeps its first ``max_length - len(start) - 1`` tokens (at least one context
    token stays to predict its first token); the context loses its beginning.

    Returns
    -------
    (list of int, int)
        The token ids and how many of them (at the end) are the choice.
    """
    room = max_length - len(start)
    if room < 2:
        raise ConfigError(
            f"model.max-length ({max_length}) leaves no room for a context token and a choice "
            "token; use at least 3"
        )
    choice = choice[: room - 1]
    context = context[len(context) - (room - len(choice)) :] if context else []
    return start + context + choice, len(choice)


def tokenize_choices(
    dataset: MultipleChoiceDataset,
    tokenizer: Any,
    max_length: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TokenizedData:
    """One right-padded sequence per choice, with the choice's tokens marked.

    Parameters
    ----------
    dataset : MultipleChoiceDataset
    tokenizer : transformers.PreTrainedTokenizerBase
        Called without special tokens; sequences start with :func:`start_token_id` (when
        the tokenizer has one) and are padded with :func:`pad_token_id`.
    max_length : int
        Most tokens per sequence (see :func:`choice_sequence`).
    chunk_size : int, default 2048
        Texts per tokenizer call.

    Returns
    -------
    TokenizedData
        ``input_ids``, ``attention_mask`` and ``target_mask`` ``(N, K, T)`` with ``K`` the
        most choices of any example (missing choices are all padding), ``labels`` the
        correct choices ``(N,)``, ``task`` ``multiple-choice``.

    Raises
    ------
    ConfigError
        If ``max_length < 3`` (``model.max-length``).
    """
    if max_length < 3:
        raise ConfigError(f"model.max-length must be >= 3 for multiple choice (got {max_length})")
    pad_id = pad_token_id(tokenizer)
    first = start_token_id(tokenizer)
    start = [] if first is None else [first]
    n, k = len(dataset), dataset.max_choices
    contexts = _encode(tokenizer, list(dataset.texts), chunk_size)
    flat = [CONTINUATION_SEPARATOR + c for row in dataset.choices for c in row]
    encoded_choices = _encode(tokenizer, flat, chunk_size)
    sequences: list[list[tuple[list[int], int]]] = []
    position = 0
    for context, options in zip(contexts, dataset.choices, strict=True):
        row = []
        for _ in options:
            choice = encoded_choices[position] or [pad_id]  # an empty choice: one pad token
            position += 1
            row.append(choice_sequence(start, context or [pad_id], choice, max_length))
        sequences.append(row)
    width = max((len(ids) for row in sequences for ids, _ in row), default=0)
    input_ids = np.full((n, k, width), pad_id, dtype=np.int64)
    attention = np.zeros((n, k, width), dtype=np.int64)
    target = np.zeros((n, k, width), dtype=np.int64)
    for i, row in enumerate(sequences):
        for j, (ids, choice_length) in enumerate(row):
            input_ids[i, j, : len(ids)] = ids
            attention[i, j, : len(ids)] = 1
            target[i, j, len(ids) - choice_length : len(ids)] = 1
    return TokenizedData(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention),
        labels=torch.from_numpy(dataset.answers.astype(np.int64, copy=True)),
        target_mask=torch.from_numpy(target),
        task="multiple-choice",
    )


def tokenize_examples(dataset: TextDataset, tokenizer: Any, max_length: int) -> TokenizedData:
    """:func:`tokenize_choices` for a :class:`MultipleChoiceDataset`, else
    :func:`tokenize_dataset`."""
    if isinstance(dataset, MultipleChoiceDataset):
        return tokenize_choices(dataset, tokenizer, max_length)
    return tokenize_dataset(dataset, tokenizer, max_length)
