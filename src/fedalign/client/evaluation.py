"""Accuracy and loss of a model as it is, on a set of examples."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedalign.client.inputs import ModelInputs, forward_logits
from fedalign.models import MoEModel


@dataclass
class Evaluation:
    """Accuracy and mean cross-entropy on a set of examples."""

    accuracy: float
    loss: float
    num_examples: int


@torch.no_grad()
def evaluate(model: MoEModel, data: ModelInputs, batch_size: int = 128) -> Evaluation:
    """Accuracy and loss of the model as it is on ``data``."""
    n = len(data)
    if n == 0:
        return Evaluation(accuracy=float("nan"), loss=float("nan"), num_examples=0)
    model.model.eval()
    correct = 0
    loss_sum = 0.0
    for start in range(0, n, batch_size):
        batch = data.select(torch.arange(start, min(start + batch_size, n)))
        logits = forward_logits(model, batch)
        loss_sum += float(F.cross_entropy(logits.float(), batch.labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == batch.labels).sum())
    return Evaluation(accuracy=correct / n, loss=loss_sum / n, num_examples=n)
