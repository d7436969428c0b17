"""Turn a :class:`~fedalign.data.datasets.TextDataset` into padded token tensors.

Texts are tokenized in chunks (no padding by the tokenizer), truncated to ``max_length``
tokens including special tokens, and right-padded here to the longest example. When the
tokenizer defines no pad token, the eos token (else the unk token) pads instead; the
attention mask marks padding either way, so the choice does not change a model's output.
Use :func:`pad_token_id` to get the same id on the model side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedalign.config import ConfigError
from fedalign.data.datasets import TextDataset

DEFAULT_CHUNK_SIZE = 2048
"""Texts tokenized per call to the tokenizer."""


@dataclass
class TokenizedData:
    """Right-padded token ids, attention masks and labels.

    Parameters
    ----------
    input_ids : torch.Tensor
        ``(N, T)`` int64, padded with the pad id to ``T`` = longest example.
    attention_mask : torch.Tensor
        ``(N, T)`` int64, 1 for tokens and 0 for padding.
    labels : torch.Tensor
        ``(N,)`` int64 class ids.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """``(N,)`` int64 number of real (non-padding) tokens per example."""
        return self.attention_mask.sum(dim=1)

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
        width = int(mask.sum(dim=1).max()) if len(idx) else 0
        return TokenizedData(
            input_ids=self.input_ids[idx, :width].clone(),
            attention_mask=mask[:, :width].clone(),
            labels=self.labels[idx].clone(),
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
