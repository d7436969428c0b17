"""Pooled classification heads for base models that ship without one.

Hugging Face gives Qwen-MoE, Mixtral, DeepSeek-V2/V3, PhiMoE and JetMoE a
``ForSequenceClassification`` class (a linear ``score`` on the last real token); OLMoE,
GraniteMoE, Switch Transformers and any family we only know through the generic MoE
adapter have none. :class:`PooledClassifier` adds the head used throughout this project
(as in Sentence-BERT, Reimers and Gurevych 2019): the last hidden state averaged over the
real tokens (:func:`mean_pool`), then dropout and one ``Linear(H, C)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden`` ``(B, T, H)`` over the positions where ``attention_mask`` ``(B, T)`` is 1.

    A row without any real token pools to zeros (its count is clamped to 1). Returns
    ``(B, H)``.
    """
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, H)


def hidden_size_of(config: Any) -> int:
    """Width of a transformers config's hidden states (``hidden_size``, else ``d_model``)."""
    for key in ("hidden_size", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        f"{type(config).__name__} has neither 'hidden_size' nor 'd_model': "
        "cannot size a pooled classification head"
    )


class PooledClassifier(nn.Module):
    """A base model (no head) plus a mean-pooled linear classification head.

    ``forward(input_ids, attention_mask)`` returns logits ``(B, C)``. Parameter names are
    ``model.*`` for the base model (as in Hugging Face's causal-LM and classification
    classes) and ``classifier.weight`` / ``classifier.bias`` for the head.

    Parameters
    ----------
    model : nn.Module
        A transformers base model (``AutoModel``) whose output has ``last_hidden_state``
        ``(B, T, H)``.
    hidden_size : int
        ``H``.
    num_labels : int
        ``C``.
    dropout : float, default 0.0
        Dropout on the pooled vector (decoder LMs train without hidden dropout; the
        Hugging Face classification heads of the same families use none).
    """

    def __init__(
        self, model: nn.Module, hidden_size: int, num_labels: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.model: Any = model
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        pooled = mean_pool(output.last_hidden_state, attention_mask)  # (B, H)
        logits: Tensor = self.classifier(self.dropout(pooled))  # (B, C)
        return logits
