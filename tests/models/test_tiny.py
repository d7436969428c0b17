"""The family table (fedalign.models.tiny): every tiny name and type list derives from it."""

from __future__ import annotations

import pytest

from fedalign.models import CAUSAL_TINY_MODELS, FAMILIES, SUPPORTED_TYPES, TINY_MODELS
from fedalign.models.tiny import (
    HEADS,
    POOLED_HEAD_TYPES,
    SEQUENCE_CLASSIFICATION_TYPES,
    ModelFamily,
    tiny_family,
    tiny_hf_config,
)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_each_family_builds_its_declared_model_type(family: ModelFamily) -> None:
    assert family.name.startswith("tiny-")
    assert family.head in HEADS
    assert tiny_hf_config(family.name).model_type == family.model_type
    assert tiny_family(family.name) is family


def test_names_and_types_derive_from_the_table() -> None:
    assert tuple(f.name for f in FAMILIES) == TINY_MODELS
    assert len(set(TINY_MODELS)) == len(TINY_MODELS)
    assert set(CAUSAL_TINY_MODELS) == {f.name for f in FAMILIES if f.causal_lm}
    assert set(SUPPORTED_TYPES) == {f.model_type for f in FAMILIES}
    assert "olmoe" in POOLED_HEAD_TYPES and "qwen3_moe" in SEQUENCE_CLASSIFICATION_TYPES
    # encoders have no language-modelling head
    assert not {"tiny-switch", "tiny-upcycled"} & set(CAUSAL_TINY_MODELS)


def test_a_fresh_config_each_call() -> None:
    first = tiny_hf_config("tiny-qwen3moe")
    first.num_labels = 7
    assert tiny_hf_config("tiny-qwen3moe").num_labels != 7
    with pytest.raises(KeyError):
        tiny_hf_config("tiny-unknown")
