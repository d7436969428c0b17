"""Accuracy and loss of a model as it is, on a set of examples.

The examples' :class:`~fedalign.client.objectives.TaskObjective` scores each batch: argmax
of class logits, or the best length-normalised choice log-likelihood (multiple choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedalign.client.inputs import ModelInputs
from fedalign.client.objectives import objective_for
from fedalign.models import MoEModel


@dataclass
class Evaluation:
    """Accuracy and mean loss on a set of examples (cross-entropy of the classes, or the
    mean per-token negative log-likelihood of the correct choice)."""

    accuracy: float
    loss: float
    num_examples: int


@torch.no_grad()
def evaluate(model: MoEModel, data: ModelInputs, batch_size: int = 128) -> Evaluation:
    """Accuracy and loss of the model as it is on ``data``."""
    n = len(data)
    if n == 0:
        return Evaluation(accuracy=float("nan"), loss=float("nan"), num_examples=0)
    objective = objective_for(data, model)
    model.model.eval()
    correct = 0
    loss_sum = 0.0
    for start in range(0, n, batch_size):
        batch = data.select(torch.arange(start, min(start + batch_size, n))).to(model.device)
        with model.autocast():
            right, loss = objective.score(model, batch)
        correct += right
        loss_sum += loss
    return Evaluation(accuracy=correct / n, loss=loss_sum / n, num_examples=n)
