"""Tests for fedalign.models.heads: masked mean pooling and the pooled classification head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedalign.config import ModelConfig
from fedalign.models import PooledClassifier, load_moe_model, mean_pool
from fedalign.models.heads import hidden_size_of

Tensor = torch.Tensor

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_mean_pool_averages_real_tokens_only() -> None:
    """Row b pools the mean of its first mask[b].sum() positions; an all-padding row gives 0."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    pooled = mean_pool(hidden, mask)
    assert pooled.shape == (3, 4)
    torch.testing.assert_close(pooled[0], hidden[0].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, :2].mean(0))
    assert torch.equal(pooled[2], torch.zeros(4))
    hidden[1, 2:] = 1e6  # padding positions do not count
    torch.testing.assert_close(mean_pool(hidden, mask)[1], pooled[1])


class _Base(nn.Module):
    """A stand-in base model: embeddings as the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> object:
        class Output:
            last_hidden_state = self.embed(input_ids)

        return Output()


def test_pooled_classifier_is_a_linear_map_of_the_pooled_state() -> None:
    """logits = classifier(mean_pool(last_hidden_state)); names model.* and classifier.*."""
    torch.manual_seed(0)
    head = PooledClassifier(_Base(), hidden_size=6, num_labels=3).eval()
    assert {n for n, _ in head.named_parameters()} == {
        "model.embed.weight",
        "classifier.weight",
        "classifier.bias",
    }
    assert torch.equal(head.classifier.bias, torch.zeros(3))
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    expected = head.classifier(mean_pool(head.model.embed(ids), mask))
    torch.testing.assert_close(head(ids, mask), expected)
    # the padding token's embedding does not reach the logits
    with torch.no_grad():
        head.model.embed.weight[0] += 100.0
    torch.testing.assert_close(head(ids, mask), expected)


@pytest.mark.parametrize("name", ["tiny-olmoe", "tiny-granitemoe"])
def test_families_without_a_classification_head_get_the_pooled_head(name: str) -> None:
    """OLMoE and GraniteMoE have no ForSequenceClassification: base model + pooled head."""
    moe = load_moe_model(ModelConfig(name=name), num_labels=4)
    assert isinstance(moe.model, PooledClassifier)
    assert moe.model.classifier.weight.shape == (4, 64)
    assert {"classifier.weight", "classifier.bias"} <= set(moe.trainable_names)


def test_hidden_size_of_reads_hidden_size_or_d_model() -> None:
    class HiddenSize:
        hidden_size = 12

    class DModel:
        d_model = 8

    assert hidden_size_of(HiddenSize()) == 12
    assert hidden_size_of(DModel()) == 8
    with pytest.raises(ValueError, match="neither 'hidden_size' nor 'd_model'"):
        hidden_size_of(object())
