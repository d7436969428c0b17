"""Client loss terms: each instructed term reaches the client's loss, in order, exactly."""

from __future__ import annotations

import math

import pytest
import torch

from fedalign.client import (
    CallableTerm,
    LoadBalancingTerm,
    ProximalTerm,
    RoutingAlignmentTerm,
    StepContext,
    build_loss_terms,
    client_loss_terms,
    forward_logits,
    prepare,
    run_client_round,
    train_local,
)
from fedalign.client.losses import UnknownLossTermError
from fedalign.models import RoutingCapture
from fedalign.protocol import LossTermSpec, TrainInstructions
from fedalign.routing import load_balancing_loss, routing_regularizer
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def prepared():  # type: ignore[no-untyped-def]
    return prepare(tiny_config(strategy__name="fedavg"))


def _step(prepared, reference):  # type: ignore[no-untyped-def]
    """One captured forward pass over client 0's first 8 examples."""
    model = prepared.model
    batch = prepared.data.client_rows(0).select(torch.arange(8))
    with RoutingCapture(model.taps, detach=False) as capture:
        capture.set_token_mask(batch.attention_mask)
        forward_logits(model, batch)
        routing = capture.pop()
    top_k = {layer.name: layer.top_k for layer in model.full_layout.layers}
    return StepContext(model, routing, reference, top_k)


def test_term_values_are_the_routing_math(prepared) -> None:  # type: ignore[no-untyped-def]
    model = prepared.model
    reference = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    step = _step(prepared, reference)
    assert len(step.routing) == 2
    # the proximal term is 0 at the reference and the squared distance away from it
    assert float(ProximalTerm(1.0).value(step).detach()) == 0.0
    shifted = {k: v + 0.5 for k, v in reference.items()}
    count = sum(v.numel() for v in reference.values())
    moved = ProximalTerm(1.0).value(StepContext(model, step.routing, shifted, step.top_k))
    torch.testing.assert_close(moved, torch.tensor(0.25 * count), rtol=1e-5, atol=0.0)
    # routing alignment: the regulariser summed over the layers that have a target
    layers = sorted(step.routing)
    target = {layers[0]: torch.full((8,), 1 / 8)}
    alpha = {layers[0]: torch.linspace(0.5, 1.0, 8)}
    logits = step.routing[layers[0]][0]
    expected = routing_regularizer(logits, target[layers[0]], alpha[layers[0]], 2)
    term = RoutingAlignmentTerm(0.1, target, alpha)
    assert torch.equal(term.value(step), torch.zeros(()) + expected)
    batch_kl = RoutingAlignmentTerm(0.1, target, alpha, form="batch-kl").value(step)
    assert not torch.equal(batch_kl, term.value(step))
    balance = sum(load_balancing_loss(step.routing[n][0], 2) for n in step.routing)
    assert torch.equal(LoadBalancingTerm(0.01).value(step), torch.zeros(()) + balance)


def test_specs_build_terms_and_unknown_names_fail() -> None:
    specs = [
        LossTermSpec("proximal", 0.05),
        LossTermSpec("routing-alignment", 0.1, {"form": "topk-kl"}, {"target": {}, "alpha": {}}),
    ]
    terms = build_loss_terms(specs)
    assert [type(t) for t in terms] == [ProximalTerm, RoutingAlignmentTerm]
    assert [t.coefficient for t in terms] == [0.05, 0.1]
    assert terms[1].form == "topk-kl"  # type: ignore[attr-defined]
    with pytest.raises(UnknownLossTermError, match=r"'sparsity'.*known: \['load-balancing'"):
        build_loss_terms([LossTermSpec("sparsity", 1.0)])
    with pytest.raises(UnknownLossTermError, match="form 'kl'"):
        build_loss_terms([LossTermSpec("routing-alignment", 1.0, {"form": "kl"})])


def test_client_terms_order() -> None:
    config = tiny_config(model__load_balance_coef=0.01)
    extra = CallableTerm(lambda model, routing: torch.zeros(()))
    instructions = TrainInstructions(loss_terms=[LossTermSpec("proximal", 0.5)])
    terms = client_loss_terms(config, instructions, [extra])
    assert [type(t) for t in terms] == [LoadBalancingTerm, ProximalTerm, CallableTerm]
    assert terms[0].coefficient == 0.01
    assert client_loss_terms(tiny_config(), TrainInstructions()) == []


def test_proximal_term_reaches_the_loss_and_holds_the_client_back(prepared) -> None:  # type: ignore[no-untyped-def]
    model, data, config = prepared.model, prepared.data, tiny_config(strategy__name="fedavg")
    start = {k: v.detach().clone() for k, v in model.trainable_state().items()}

    def distance(mu: float) -> tuple[float, dict[str, float]]:
        model.load_trainable_state(start)
        terms = [ProximalTerm(mu / 2)] if mu > 0 else []
        done = train_local(
            model, data.client_rows(0), terms, config.train, global_parameters=start, seed=3
        )
        moved = sum(float((done.parameters[k] - start[k]).pow(2).sum()) for k in start)
        return moved, done.metrics

    free, free_metrics = distance(0.0)
    held, held_metrics = distance(100.0)
    assert free_metrics["proximal_loss"] == 0.0
    assert held_metrics["proximal_loss"] > 0.0
    assert held_metrics["loss"] > held_metrics["task_loss"]
    assert held < free


def test_routing_term_from_instructions_reaches_the_client(prepared) -> None:  # type: ignore[no-untyped-def]
    """The same client round with and without the server's routing term: the loss metric
    and the trained router differ; without it the routing loss is exactly 0."""
    model, data = prepared.model, prepared.data
    config = tiny_config(strategy__name="fedalign")
    start = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    layers = [layer.name for layer in model.layout.layers]
    target = {name: torch.tensor([0.9] + [0.1 / 7] * 7) for name in layers}
    alpha = {name: torch.ones(8) for name in layers}
    spec = LossTermSpec(
        "routing-alignment", 1.0, {"form": "batch-kl"}, {"target": target, "alpha": alpha}
    )
    plain = run_client_round(model, data, config, 1, 0, start, TrainInstructions())
    aligned = run_client_round(
        model, data, config, 1, 0, start, TrainInstructions(loss_terms=[spec])
    )
    assert plain.result.metrics["routing_loss"] == 0.0
    assert aligned.result.metrics["routing_loss"] > 0.0
    router = next(k for k in start if k.endswith("router.weight"))
    assert not torch.equal(plain.result.parameters[router], aligned.result.parameters[router])
    # the instructions' tensors count as sent bytes
    assert aligned.bytes_sent == plain.bytes_sent + 2 * len(layers) * 8 * 4


def test_label_calibration_leaves_classes_the_client_lacks_untouched(prepared) -> None:  # type: ignore[no-untyped-def]
    """With FedLC's calibration a class the client has no example of leaves its softmax,
    so the head's row for that class gets no gradient and stays where it started; plain
    cross-entropy pushes that row down."""
    model, data = prepared.model, prepared.data
    start = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    everything = data.client_rows(0)
    rows = everything.select(torch.nonzero(everything.labels != 0).squeeze(1))  # no class 0
    head = next(k for k in start if start[k].dim() == 2 and "classifier" in k)
    absent = sorted(set(range(start[head].shape[0])) - set(rows.labels.tolist()))
    assert 0 in absent

    def head_rows(tau: float) -> torch.Tensor:
        model.load_trainable_state(start)
        config = tiny_config(train__label_calibration=tau)
        done = train_local(model, rows, [], config.train, global_parameters=start, seed=3)
        assert math.isfinite(done.metrics["task_loss"])
        return done.parameters[head][absent]

    assert torch.equal(head_rows(1.0), start[head][absent])
    assert not torch.equal(head_rows(0.0), start[head][absent])


def test_terms_see_each_batch_labels(prepared) -> None:  # type: ignore[no-untyped-def]
    """Every local step hands its batch's labels to the loss terms: over one epoch they are
    the client's labels, each example once."""
    model, data = prepared.model, prepared.data
    start = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    rows = data.client_rows(0)
    seen: list[int] = []

    class Recorder(CallableTerm):
        def value(self, step: StepContext) -> torch.Tensor:
            assert step.labels is not None
            seen.extend(step.labels.tolist())
            return torch.zeros(())

    model.load_trainable_state(start)
    config = tiny_config(train__local_epochs=1, train__local_steps=0)
    recorder = Recorder(lambda model, routing: torch.zeros(()))
    train_local(model, rows, [recorder], config.train, global_parameters=start, seed=3)
    assert sorted(seen) == sorted(rows.labels.tolist())
