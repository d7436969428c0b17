"""Accuracy and loss of a model as it is, on a set of examples.

The examples' :class:`~fedalign.client.objectives.TaskObjective` scores each batch: argmax
of class logits, or the best length-normalised choice log-likelihood (multiple choice).

On request (classification only) the same pass counts, per MoE layer, how the tokens of
each class are routed: ``counts[c, e]`` adds ``1/k`` for every token of an example of class
``c`` whose top-``k`` experts include ``e``. :func:`expert_specialisation` reads off how much
the expert choice says about the class.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from fedalign.client.inputs import ModelInputs
from fedalign.client.objectives import objective_for
from fedalign.models import MoEModel, RoutingCapture

Tensor = torch.Tensor


@dataclass
class Evaluation:
    """Accuracy and mean loss on a set of examples (cross-entropy of the classes, or the
    mean per-token negative log-likelihood of the correct choice), and the accuracy of each
    label (class, or the correct choice's position; NaN for a label with no example).
    ``expert_label_counts``: per MoE layer, the ``(C, E)`` routing counts by class (only
    when asked for)."""

    accuracy: float
    loss: float
    num_examples: int
    label_accuracy: list[float] = field(default_factory=list)
    expert_label_counts: dict[str, Tensor] = field(default_factory=dict)


def expert_specialisation(counts: Tensor) -> float | None:
    """Normalised mutual information ``I(expert; class) / H(class)`` of a ``(C, E)`` table
    of routing counts: 0 when every class is routed alike (experts blurred), 1 when the
    expert a token goes to determines its class. None for an empty table or one class."""
    total = float(counts.sum())
    if total <= 0:
        return None
    joint = counts.double() / total
    p_class, p_expert = joint.sum(1), joint.sum(0)
    entropy = -float(sum(p * math.log(p) for p in p_class.tolist() if p > 0))
    if entropy <= 0:
        return None
    outer = p_class[:, None] * p_expert[None, :]
    kept = joint > 0
    information = float((joint[kept] * (joint[kept] / outer[kept]).log()).sum())
    return max(0.0, information) / entropy


def _count_routes(
    counts: dict[str, Tensor],
    routing: dict[str, tuple[Tensor, Tensor]],
    batch: ModelInputs,
    top_k: dict[str, int],
    num_labels: int,
) -> None:
    """Add one batch's top-k routes per class to ``counts`` (layers whose token count does
    not match the batch's mask are skipped)."""
    mask = batch.attention_mask.bool().cpu()
    per_example = mask.sum(1)
    labels = batch.labels.cpu()
    for layer, (logits, _hidden) in routing.items():
        rows = logits.shape[0]
        if rows == int(per_example.sum()):
            token_labels = labels.repeat_interleave(per_example)
        elif rows == mask.numel():
            token_labels = labels.repeat_interleave(mask.shape[1])
        else:
            continue
        k = top_k[layer]
        chosen = logits.float().topk(k, dim=-1).indices.cpu()  # (N, k)
        table = counts.setdefault(layer, torch.zeros(num_labels, logits.shape[-1]))
        index = token_labels[:, None].expand_as(chosen).reshape(-1) * logits.shape[-1]
        flat = table.view(-1)
        flat.index_add_(0, index + chosen.reshape(-1), torch.full((chosen.numel(),), 1.0 / k))


@torch.no_grad()
def evaluate(
    model: MoEModel, data: ModelInputs, batch_size: int = 128, expert_classes: bool = False
) -> Evaluation:
    """Accuracy and loss of the model as it is on ``data``; with ``expert_classes`` (and
    classification data) also the routing counts by class of every MoE layer."""
    n = len(data)
    if n == 0:
        return Evaluation(accuracy=float("nan"), loss=float("nan"), num_examples=0)
    objective = objective_for(data, model)
    model.model.eval()
    routing = expert_classes and data.task == "classification"
    top_k = {layer.name: layer.top_k for layer in model.full_layout.layers}
    counts: dict[str, Tensor] = {}
    right_parts: list[torch.Tensor] = []
    loss_sum = 0.0
    with RoutingCapture(model.taps, detach=True) if routing else nullcontext() as capture:
        for start in range(0, n, batch_size):
            batch = data.select(torch.arange(start, min(start + batch_size, n))).to(model.device)
            if capture is not None:
                capture.set_token_mask(batch.attention_mask)
            with model.autocast():
                right, loss = objective.score(model, batch)
            right_parts.append(right.cpu())
            loss_sum += loss
            if capture is not None:
                _count_routes(counts, capture.pop(), batch, top_k, model.num_labels)
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
        expert_label_counts=counts,
    )
