"""Task objectives: the multiple-choice scorer, the causal-LM loss, the routed view."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from fedalign.client import (
    OBJECTIVES,
    ClassificationObjective,
    ModelInputs,
    MultipleChoiceObjective,
    calibrated_cross_entropy,
    choice_scores,
    continuation_log_likelihood,
    evaluate,
    lm_loss,
    objective_for,
)
from fedalign.errors import FedAlignError
from fedalign.models import MoEModel
from fedalign.moe.layout import MoELayout

VOCAB = 6


class BigramLM(nn.Module):
    """Next-token log-probabilities from a fixed table: ``logits[b, t] = table[ids[b, t]]``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: Any = 0
    ) -> Any:
        logits = self.table[input_ids]  # (B, T, V)
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]

        class Output:
            pass

        output = Output()
        output.logits = logits  # type: ignore[attr-defined]
        return output


def _row(targets: dict[int, float]) -> torch.Tensor:
    """Log-probabilities over the vocabulary with ``log p(token) = value`` for ``targets``."""
    probs = torch.full((VOCAB,), 0.0)
    for token, logp in targets.items():
        probs[token] = math.exp(logp)
    rest = [t for t in range(VOCAB) if t not in targets]
    probs[rest] = (1.0 - float(probs.sum())) / len(rest)
    return probs.log()


def _model(table: torch.Tensor, head: str = "causal-lm") -> MoEModel:
    return MoEModel(
        model=BigramLM(table),
        tokenizer=None,
        layout=MoELayout(layers=()),
        full_layout=MoELayout(layers=()),
        taps=[],
        architecture="bigram",
        num_labels=0,
        head=head,
    )


def _length_case() -> tuple[MoEModel, ModelInputs]:
    """Context ``[0, 1]``; choice A = ``[2]`` (log p = -1), choice B = ``[3, 4, 5]``
    (log p = -0.5 per token, -1.5 in all). By sum A wins, by mean B wins; B is correct."""
    table = torch.stack(
        [
            _row({1: -0.1}),
            _row({2: -1.0, 3: -0.5}),
            _row({}),
            _row({4: -0.5}),
            _row({5: -0.5}),
            _row({}),
        ]
    )
    ids = torch.tensor([[[0, 1, 2, 0, 0], [0, 1, 3, 4, 5]]])  # (1, 2, 5), pad 0
    mask = torch.tensor([[[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]])
    target = torch.tensor([[[0, 0, 1, 0, 0], [0, 0, 1, 1, 1]]])
    inputs = ModelInputs(
        attention_mask=mask,
        labels=torch.tensor([1]),
        input_ids=ids,
        target_mask=target,
        task="multiple-choice",
    )
    return _model(table), inputs


def test_continuation_log_likelihood_sums_only_target_tokens() -> None:
    model, inputs = _length_case()
    assert inputs.input_ids is not None and inputs.target_mask is not None
    ids = inputs.input_ids[0]
    logits = model.token_logits(ids, inputs.attention_mask[0])
    sums, counts = continuation_log_likelihood(logits, ids, inputs.target_mask[0])
    assert counts.tolist() == [1, 3]
    assert sums.tolist() == pytest.approx([-1.0, -1.5], abs=1e-5)
    # from a later first position: the same numbers
    late = model.token_logits(ids, inputs.attention_mask[0], first=1)
    again, _ = continuation_log_likelihood(late, ids, inputs.target_mask[0], first=1)
    assert again.tolist() == pytest.approx(sums.tolist(), abs=1e-6)


def test_length_normalisation_picks_the_shorter_per_token_loss() -> None:
    model, inputs = _length_case()
    objective = MultipleChoiceObjective()
    sums, counts = objective.choice_log_likelihoods(model, inputs)
    assert int(sums.argmax()) == 0  # unnormalised: the one-token choice A
    scores = choice_scores(sums, counts)
    assert scores[0].tolist() == pytest.approx([-1.0, -0.5], abs=1e-5)
    result = evaluate(model, inputs)
    assert result.accuracy == 1.0  # normalised: B, the correct one
    assert result.loss == pytest.approx(0.5, abs=1e-5)  # per-token NLL of the correct choice


def test_clearly_more_likely_choice_wins_and_missing_choices_never_do() -> None:
    model, inputs = _length_case()
    assert inputs.input_ids is not None and inputs.target_mask is not None
    # a third, absent choice (all padding) must score -inf
    pad = torch.zeros(1, 1, 5, dtype=torch.long)
    three = ModelInputs(
        attention_mask=torch.cat([inputs.attention_mask, pad], dim=1),
        labels=torch.tensor([0]),
        input_ids=torch.cat([inputs.input_ids, pad], dim=1),
        target_mask=torch.cat([inputs.target_mask, pad], dim=1),
        task="multiple-choice",
    )
    sums, counts = MultipleChoiceObjective().choice_log_likelihoods(model, three)
    scores = choice_scores(sums, counts)
    assert scores[0, 2] == float("-inf")
    assert evaluate(model, three).accuracy == 0.0  # the answer says A; B is more likely


def test_lm_loss_is_the_mean_nll_of_the_target_tokens_only() -> None:
    model, inputs = _length_case()
    assert inputs.input_ids is not None and inputs.target_mask is not None
    ids, target = inputs.input_ids[0], inputs.target_mask[0]
    logits = model.token_logits(ids, inputs.attention_mask[0])
    loss = lm_loss(logits, ids, target)
    assert float(loss) == pytest.approx((1.0 + 1.5) / 4, abs=1e-5)  # 4 target tokens
    # changing a context token's prediction does not move the loss
    table = model.model.table.detach().clone()
    table[0] = _row({1: -3.0})
    other = _model(table)
    assert float(
        lm_loss(other.token_logits(ids, inputs.attention_mask[0]), ids, target)
    ) == pytest.approx(float(loss), abs=1e-6)


def test_routed_view_is_the_correct_choice_trimmed() -> None:
    _, inputs = _length_case()
    flipped = ModelInputs(
        attention_mask=inputs.attention_mask,
        labels=torch.tensor([0]),
        input_ids=inputs.input_ids,
        target_mask=inputs.target_mask,
        task="multiple-choice",
    )
    view = MultipleChoiceObjective().routed(flipped)
    assert view.input_ids is not None and view.target_mask is not None
    assert view.input_ids.tolist() == [[0, 1, 2]]
    assert view.attention_mask.tolist() == [[1, 1, 1]]
    assert view.target_mask.tolist() == [[0, 0, 1]]


def test_objective_checks_the_head() -> None:
    model, inputs = _length_case()
    assert objective_for(inputs, model).name == "multiple-choice"
    classifier = _model(model.model.table.detach(), head="classification")
    with pytest.raises(FedAlignError, match="causal LM"):
        objective_for(inputs, classifier)
    with pytest.raises(FedAlignError, match="classification head"):
        objective_for(ModelInputs(attention_mask=torch.ones(1, 2), labels=torch.zeros(1)), model)
    unknown = ModelInputs(attention_mask=torch.ones(1, 2), labels=torch.zeros(1), task="regress")
    with pytest.raises(FedAlignError, match="unknown task 'regress'"):
        objective_for(unknown, model)


# ------------------------------------------------------------- label calibration (FedLC)
def test_calibrated_cross_entropy_is_the_shifted_softmax_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 2])
    counts = torch.tensor([16.0, 1.0, 81.0])
    tau = 0.7
    shifted = logits - tau * counts.pow(-0.25)
    by_hand = -(shifted.log_softmax(-1)[torch.arange(2), labels]).mean()
    got = calibrated_cross_entropy(logits, labels, counts, tau)
    assert torch.allclose(got, by_hand, atol=1e-6)
    assert not torch.allclose(got, torch.nn.functional.cross_entropy(logits, labels))


def test_calibration_zero_is_plain_cross_entropy() -> None:
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 0])
    plain = torch.nn.functional.cross_entropy(logits, labels)
    got = calibrated_cross_entropy(logits, labels, torch.tensor([3.0, 1, 1, 1]), 0.0)
    assert torch.allclose(got, plain)


def test_a_class_the_client_lacks_leaves_the_softmax_and_gets_no_gradient() -> None:
    logits = torch.tensor([[1.0, 0.0, 5.0]], requires_grad=True)
    labels = torch.tensor([0])
    counts = torch.tensor([4.0, 1.0])  # class 2 absent (shorter than C counts 0 too)
    loss = calibrated_cross_entropy(logits, labels, counts, 1.0)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad[0, 2] == 0.0  # the absent class does not compete
    two_class = torch.tensor([[1.0 - 4**-0.25, 0.0 - 1.0]])
    expected = torch.nn.functional.cross_entropy(two_class, labels)
    assert torch.allclose(loss.detach(), expected, atol=1e-6)


def test_rare_classes_are_pushed_harder_than_common_ones() -> None:
    """With equal logits, the loss of a rare class's example exceeds a common class's."""
    logits = torch.zeros(2, 2)
    counts = torch.tensor([100.0, 2.0])
    common = calibrated_cross_entropy(logits[:1], torch.tensor([0]), counts, 1.0)
    rare = calibrated_cross_entropy(logits[1:], torch.tensor([1]), counts, 1.0)
    assert rare > common


def test_only_classification_can_be_calibrated() -> None:
    labels = torch.tensor([0, 0, 1])
    classification = OBJECTIVES["classification"]
    assert classification.calibrated(labels, 0.0) is classification
    calibrated = classification.calibrated(labels, 0.5)
    assert isinstance(calibrated, ClassificationObjective)
    assert calibrated.class_counts is not None and calibrated.class_counts.tolist() == [2, 1]
    with pytest.raises(FedAlignError, match=r"train\.label-calibration applies to classification"):
        MultipleChoiceObjective().calibrated(labels, 0.5)
