"""Task objectives: what a batch's task loss is, what the model routes, how it is scored.

The trainer, the evaluation and the routing-statistics pass know no task; they ask the
objective of the examples (:func:`objective_for`, by ``ModelInputs.task``):

``classification``
    Class logits ``(B, C)``; loss and evaluation by cross-entropy and argmax.
``multiple-choice`` (causal LMs)
    Each example holds one sequence per choice, ``context + choice``. Training is causal
    language modelling on the correct choice's tokens only (context and padding are
    ``-100``); the router sees (and the statistics pass summarises) the context and the
    correct choice. Evaluation scores every choice by its length-normalised
    log-likelihood, the mean over its tokens of ``log p(token | everything before)``
    (:func:`choice_scores`), and predicts the best; the reported loss is the mean
    per-token negative log-likelihood of the correct choice. Per-token normalisation keeps
    a long choice from losing just for having more tokens to pay for.

Everything a loss term needs (router logits, hidden states) is captured by the trainer's
:class:`~fedalign.models.RoutingCapture` around :meth:`TaskObjective.loss`, so FedProx,
FedAlign-MoE's routing regulariser and load balancing work unchanged for every task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

from fedalign.client.inputs import ModelInputs, forward_logits
from fedalign.errors import FedAlignError
from fedalign.models import MoEModel

Tensor = torch.Tensor

IGNORE_INDEX = -100
"""Label of tokens that do not count in a causal-LM loss (the context, padding)."""

SCORE_SEQUENCES = 16
"""Choice sequences per forward pass when scoring (bounds the ``(S, T, V)`` logits)."""


# ----------------------------------------------------------------------------- pure math
def continuation_log_likelihood(
    logits: Tensor, input_ids: Tensor, target_mask: Tensor, first: int = 0
) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each sequence's target tokens, and how many there are.

    Parameters
    ----------
    logits : Tensor, shape (S, T - first, V)
        Next-token logits at positions ``first .. T-1`` (position ``t`` predicts ``t + 1``).
    input_ids : Tensor, shape (S, T)
    target_mask : Tensor, shape (S, T)
        Nonzero on the tokens to score; a target at position 0 cannot be scored (nothing
        predicts it) and must not occur, nor any before ``first + 1``.
    first : int, default 0

    Returns
    -------
    (Tensor, Tensor)
        ``(S,)`` float32 sums of log-probabilities and ``(S,)`` int64 token counts.
    """
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (S, T-1-first, V)
    targets = input_ids[:, first + 1 :]  # (S, T-1-first)
    mask = target_mask[:, first + 1 :].bool()
    token = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (S, T-1-first)
    return (token * mask).sum(dim=-1), mask.sum(dim=-1)


def choice_scores(sums: Tensor, counts: Tensor) -> Tensor:
    """Length-normalised log-likelihoods ``sums / counts``; ``-inf`` for a missing choice.

    Parameters
    ----------
    sums, counts : Tensor, shape (N, K)
        Per example and choice, the summed log-probability and the number of tokens.

    Returns
    -------
    Tensor, shape (N, K)
    """
    scores = sums / counts.clamp(min=1)
    return scores.masked_fill(counts == 0, float("-inf"))


def first_target_position(target_mask: Tensor) -> int:
    """The earliest position (over all rows) whose logits predict a target token."""
    has_target = target_mask.bool().any(dim=0)  # (T,)
    if not bool(has_target.any()):
        return 0
    return max(int(has_target.nonzero()[0, 0]) - 1, 0)


def lm_loss(logits: Tensor, input_ids: Tensor, target_mask: Tensor, first: int = 0) -> Tensor:
    """Mean cross-entropy of the target tokens (context and padding labelled ``-100``).

    Shapes as in :func:`continuation_log_likelihood`; returns a float32 scalar.
    """
    targets = input_ids[:, first + 1 :]
    labels = targets.masked_fill(~target_mask[:, first + 1 :].bool(), IGNORE_INDEX)
    predicted = logits[:, :-1].float()  # (S, T-1-first, V)
    return F.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def calibrated_cross_entropy(
    logits: Tensor, labels: Tensor, class_counts: Tensor, calibration: float
) -> Tensor:
    """FedLC's calibrated cross-entropy: the mean over ``labels`` of
    ``-log softmax(logits - calibration * n ** -0.25)[label]``.

    ``class_counts`` (``n``, the client's examples per class) may be shorter than the
    logits' ``C``: missing classes count 0. A class with ``n_c = 0`` gets an offset of
    ``-inf`` and leaves the softmax (no probability, no gradient).
    """
    num_classes = logits.shape[-1]
    counts = torch.zeros(num_classes, dtype=torch.float64)
    kept = class_counts[:num_classes].to(torch.float64)
    counts[: len(kept)] = kept
    offsets = -calibration * counts.pow(-0.25)  # 0 ** -0.25 = inf -> offset -inf
    shifted = logits.float() + offsets.to(device=logits.device, dtype=torch.float32)
    return F.cross_entropy(shifted, labels)


# ----------------------------------------------------------------------------- objectives
class TaskObjective(ABC):
    """How one kind of task trains and is scored."""

    name: ClassVar[str] = "task"

    @abstractmethod
    def check(self, model: MoEModel) -> None:
        """Raise :class:`FedAlignError` when ``model``'s head cannot serve this task."""

    def routed(self, batch: ModelInputs) -> ModelInputs:
        """The sequences of ``batch`` the model runs when training and summarising routing
        (its attention mask is the capture's token mask)."""
        return batch

    @abstractmethod
    def forward(self, model: MoEModel, batch: ModelInputs) -> Tensor:
        """Run the model on ``routed(batch)`` (the statistics pass needs only the hooks)."""

    @abstractmethod
    def loss(self, model: MoEModel, batch: ModelInputs) -> Tensor:
        """The task loss of ``routed(batch)`` (a scalar with a graph)."""

    @abstractmethod
    def score(self, model: MoEModel, batch: ModelInputs) -> tuple[Tensor, float]:
        """Which examples of ``batch`` are predicted right (``(B,)`` bool) and the summed
        loss over them."""

    def calibrated(self, labels: Tensor, calibration: float) -> TaskObjective:
        """This objective training with label calibration ``calibration`` (``tau``) from
        the client's ``labels``; only classification has one."""
        if calibration > 0:
            raise FedAlignError(
                f"train.label-calibration applies to classification; this task is "
                f"{self.name!r} (set train.label-calibration = 0)"
            )
        return self


class ClassificationObjective(TaskObjective):
    """Cross-entropy of class logits ``(B, C)``.

    Parameters
    ----------
    class_counts : Tensor or None, default None
        The client's training examples per class. With ``calibration`` > 0 the training
        loss is FedLC's calibrated cross-entropy (Zhang et al., ICML 2022): the logits are
        shifted by ``-calibration * n_c ** -0.25`` before the softmax, so that classes the
        client holds few of are pushed harder and classes it holds none of (``n_c = 0``)
        leave the softmax. Scoring is never calibrated.
    calibration : float, default 0.0
        FedLC's ``tau`` (0 = plain cross-entropy).
    """

    name = "classification"

    def __init__(self, class_counts: Tensor | None = None, calibration: float = 0.0) -> None:
        self.calibration = float(calibration)
        self.class_counts = class_counts

    def calibrated(self, labels: Tensor, calibration: float) -> ClassificationObjective:
        """This objective training with FedLC's calibration from ``labels``' counts."""
        if calibration <= 0:
            return self
        return ClassificationObjective(torch.bincount(labels.cpu()).double(), calibration)

    def check(self, model: MoEModel) -> None:
        if model.head != "classification":
            raise FedAlignError(
                f"classification data need a model with a classification head "
                f"(model.head is {model.head!r})"
            )

    def forward(self, model: MoEModel, batch: ModelInputs) -> Tensor:
        return forward_logits(model, batch)

    def loss(self, model: MoEModel, batch: ModelInputs) -> Tensor:
        logits = forward_logits(model, batch)  # (B, C)
        if self.class_counts is None or self.calibration <= 0:
            return F.cross_entropy(logits, batch.labels)
        return calibrated_cross_entropy(logits, batch.labels, self.class_counts, self.calibration)

    def score(self, model: MoEModel, batch: ModelInputs) -> tuple[Tensor, float]:
        logits = forward_logits(model, batch)
        loss_sum = float(F.cross_entropy(logits.float(), batch.labels, reduction="sum"))
        return logits.argmax(dim=-1) == batch.labels, loss_sum


class MultipleChoiceObjective(TaskObjective):
    """Causal-LM loss on the correct choice; length-normalised log-likelihood scoring."""

    name = "multiple-choice"

    def check(self, model: MoEModel) -> None:
        if model.head != "causal-lm":
            raise FedAlignError(
                f"multiple-choice data need a causal LM (model.head 'causal-lm'; the model's "
                f"head is {model.head!r})"
            )

    def routed(self, batch: ModelInputs) -> ModelInputs:
        """The correct choice of every example, ``(B, T)``, trimmed to the longest."""
        assert batch.input_ids is not None and batch.target_mask is not None
        if batch.input_ids.dim() == 2:
            return batch
        rows = torch.arange(len(batch), device=batch.labels.device)
        chosen = ModelInputs(
            attention_mask=batch.attention_mask[rows, batch.labels],
            labels=batch.labels,
            input_ids=batch.input_ids[rows, batch.labels],
            target_mask=batch.target_mask[rows, batch.labels],
            task=batch.task,
        )
        return chosen.select(torch.arange(len(batch), device=batch.labels.device))

    def forward(self, model: MoEModel, batch: ModelInputs) -> Tensor:
        assert batch.input_ids is not None
        # the routers see every token; only the last position is projected on the vocabulary
        last = max(batch.input_ids.shape[-1] - 1, 0)
        return model.token_logits(batch.input_ids, batch.attention_mask, first=last)

    def loss(self, model: MoEModel, batch: ModelInputs) -> Tensor:
        assert batch.input_ids is not None and batch.target_mask is not None
        first = first_target_position(batch.target_mask)
        logits = model.token_logits(batch.input_ids, batch.attention_mask, first=first)
        return lm_loss(logits, batch.input_ids, batch.target_mask, first)

    def choice_log_likelihoods(self, model: MoEModel, batch: ModelInputs) -> tuple[Tensor, Tensor]:
        """Summed log-probabilities and token counts of every choice, ``(B, K)`` each."""
        assert batch.input_ids is not None and batch.target_mask is not None
        num_examples, num_choices, width = batch.input_ids.shape
        ids = batch.input_ids.reshape(-1, width)  # (B*K, T)
        mask = batch.attention_mask.reshape(-1, width)
        target = batch.target_mask.reshape(-1, width)
        sums, counts = [], []
        for start in range(0, ids.shape[0], SCORE_SEQUENCES):
            part = slice(start, start + SCORE_SEQUENCES)
            length = max(int(mask[part].sum(dim=-1).max()), 1)
            first = first_target_position(target[part, :length])
            logits = model.token_logits(ids[part, :length], mask[part, :length], first=first)
            total, count = continuation_log_likelihood(
                logits, ids[part, :length], target[part, :length], first
            )
            sums.append(total)
            counts.append(count)
        shape = (num_examples, num_choices)
        return torch.cat(sums).reshape(shape), torch.cat(counts).reshape(shape)

    def score(self, model: MoEModel, batch: ModelInputs) -> tuple[Tensor, float]:
        sums, counts = self.choice_log_likelihoods(model, batch)
        scores = choice_scores(sums, counts)  # (B, K)
        correct = scores.argmax(dim=-1) == batch.labels
        rows = torch.arange(len(batch), device=scores.device)
        return correct, float(-scores[rows, batch.labels].sum())


OBJECTIVES: dict[str, TaskObjective] = {
    ClassificationObjective.name: ClassificationObjective(),
    MultipleChoiceObjective.name: MultipleChoiceObjective(),
}
"""Objectives by task name (``ModelInputs.task``)."""


def objective_for(data: ModelInputs, model: MoEModel) -> TaskObjective:
    """The objective of ``data``'s task, checked against ``model``'s head.

    Raises
    ------
    FedAlignError
        For an unknown task, or a head that cannot serve it.
    """
    objective = OBJECTIVES.get(data.task)
    if objective is None:
        raise FedAlignError(f"unknown task {data.task!r}; known: {sorted(OBJECTIVES)}")
    objective.check(model)
    return objective
