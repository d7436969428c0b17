"""Accuracy and loss of a model as it is, on a set of examples.

The examples' :class:`~fedalign.client.objectives.TaskObjective` scores each batch: argmax
of class logits, or the best length-normalised choice log-likelihood (multiple choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedalign.client.inputs import ModelInputs
from fedalign.client.objectives import objective_for
from fedalign.models import MoEModel


@dataclass
class Evaluation:
    """Accuracy and mean loss on a set of examples (cross-entropy of the classes, or the
    mean per-token negative log-likelihood of the correct choice), and the accuracy of each
    label (class, or the correct choice's position; NaN for a label with no example)."""

    accuracy: float
    loss: float
    num_examples: int
    label_accuracy: list[float] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: MoEModel, data: ModelInputs, batch_size: int = 128) -> Evaluation:
    """Accuracy and loss of the model as it is on ``data``."""
    n = len(data)
    if n == 0:
        return Evaluation(accuracy=float("nan"), loss=float("nan"), num_examples=0)
    objective = objective_for(data, model)
    model.model.eval()
    right_parts: list[torch.Tensor] = []
    loss_sum = 0.0
    for start in range(0, n, batch_size):
        batch = data.select(torch.arange(start, min(start + batch_size, n))).to(model.device)
        with model.autocast():
            right, loss = objective.score(model, batch)
        right_parts.append(right.cpu())
        loss_sum += loss
    right_all = torch.cat(right_parts)  # (N,)
    labels = data.labels.cpu()
    size = max(int(labels.max()) + 1, model.num_labels if data.task == "classification" else 0)
    totals = torch.bincount(labels, minlength=size)
    hits = torch.bincount(labels, weights=right_all.double(), minlength=size)
    per_label = [float(h / t) if t > 0 else float("nan") for h, t in zip(hits, totals)]
    return Evaluation(
        accuracy=int(right_all.sum()) / n,
        loss=loss_sum / n,
        num_examples=n,
        label_accuracy=per_label,
    )
