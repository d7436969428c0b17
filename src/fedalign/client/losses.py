"""Client loss terms: what an algorithm adds to the task loss, one class each.

The server selects terms by name in its :class:`~fedalign.protocol.TrainInstructions`
(:class:`~fedalign.protocol.LossTermSpec`); the client builds them from the registry
:data:`LOSS_TERMS` and the trainer adds ``coefficient * term.value(step)`` for each, in
order. A new algorithm's client term is one class here plus one registry entry: the
trainer, the message codec and the instructions type do not change.

Built in:

* :class:`ProximalTerm` (``"proximal"``): FedProx's ``||w - w_global||^2`` over the
  trainable parameters (the server sends ``coefficient = mu / 2``);
* :class:`RoutingAlignmentTerm` (``"routing-alignment"``): FedAlign-MoE's ``L_reg`` per
  MoE layer toward the global routing distribution ``p_g``, weighted by ``alpha_i(e)``;
* :class:`LoadBalancingTerm` (``"load-balancing"``): the Switch-Transformer auxiliary
  loss; the client adds it from its own configuration (``model.load-balance-coef``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedalign.errors import FedAlignError
from fedalign.models import MoEModel
from fedalign.protocol import LossTermSpec
from fedalign.routing import ROUTING_FORMS, load_balancing_loss, routing_regularizer

Tensor = torch.Tensor


class UnknownLossTermError(FedAlignError):
    """The server asked for a loss term (or a form of one) this client does not know."""


@dataclass
class StepContext:
    """What a loss term may look at in one local step.

    Parameters
    ----------
    model : MoEModel
        The model being trained (its parameters carry gradients).
    routing : dict of str to (Tensor, Tensor)
        Per MoE layer, the captured router logits ``(N, E)`` (with their graph) and the
        hidden states ``(N, H)`` entering the layer, padding removed.
    reference : mapping of str to Tensor
        The round's global trainable parameters (detached copies).
    top_k : mapping of str to int
        Experts selected per token, per MoE layer.
    labels : Tensor or None, default None
        The batch's labels ``(B,)`` (the correct choices for multiple-choice tasks).
    """

    model: MoEModel
    routing: dict[str, tuple[Tensor, Tensor]]
    reference: Mapping[str, Tensor]
    top_k: Mapping[str, int]
    labels: Tensor | None = None


class LossTerm(ABC):
    """One additive term of the client loss: ``coefficient * value(step)``.

    Parameters
    ----------
    coefficient : float
        Multiplies :meth:`value` in the loss.

    Attributes
    ----------
    name : str
        Registry name (what :class:`~fedalign.protocol.LossTermSpec` carries).
    metric : str
        Key of the mean (uncoefficiented) value in the training metrics.
    """

    name: ClassVar[str] = "term"
    metric: ClassVar[str] = "extra_loss"

    def __init__(self, coefficient: float = 1.0) -> None:
        self.coefficient = float(coefficient)

    @abstractmethod
    def value(self, step: StepContext) -> Tensor:
        """The term's value (a scalar with a graph) in this step."""


class ProximalTerm(LossTerm):
    """FedProx's ``sum ||w - w_global||^2`` over the trainable parameters."""

    name = "proximal"
    metric = "proximal_loss"

    @classmethod
    def from_spec(cls, spec: LossTermSpec) -> ProximalTerm:
        return cls(spec.coefficient)

    def value(self, step: StepContext) -> Tensor:
        params = dict(step.model.model.named_parameters())
        total = torch.zeros(())
        for name in step.model.trainable_names:
            total = total + (params[name] - step.reference[name]).pow(2).sum()
        return total


class RoutingAlignmentTerm(LossTerm):
    """FedAlign-MoE's routing regulariser summed over the MoE layers with a target.

    Parameters
    ----------
    coefficient : float
        ``lambda``.
    target : dict of str to Tensor
        Per layer, the global routing distribution ``p_g``, shape ``(E,)``.
    alpha : dict of str to Tensor
        Per layer, ``alpha_i(e)``, shape ``(E,)``; ones where a layer has none.
    form : str, default "literal"
        One of :data:`fedalign.routing.ROUTING_FORMS` (option ``form`` of the spec).
    """

    name = "routing-alignment"
    metric = "routing_loss"

    def __init__(
        self,
        coefficient: float,
        target: Mapping[str, Tensor],
        alpha: Mapping[str, Tensor],
        form: str = "literal",
    ) -> None:
        super().__init__(coefficient)
        if form not in ROUTING_FORMS:
            raise UnknownLossTermError(
                f"routing-alignment form {form!r} is unknown; known: {list(ROUTING_FORMS)}"
            )
        self.target = dict(target)
        self.alpha = dict(alpha)
        self.form = form
        self._on_device: dict[tuple[str, str, torch.device], Tensor] = {}

    def _placed(self, kind: str, layer: str, tensor: Tensor, device: torch.device) -> Tensor:
        """``tensor`` on ``device``, moved once per round rather than at every step (the
        server's tensors arrive on the CPU)."""
        key = (kind, layer, device)
        if key not in self._on_device:
            self._on_device[key] = tensor.to(device)
        return self._on_device[key]

    @classmethod
    def from_spec(cls, spec: LossTermSpec) -> RoutingAlignmentTerm:
        return cls(
            spec.coefficient,
            spec.tensors.get("target", {}),
            spec.tensors.get("alpha", {}),
            str(spec.options.get("form", "literal")),
        )

    def value(self, step: StepContext) -> Tensor:
        total = torch.zeros(())
        for layer_name, (router_logits, _hidden) in step.routing.items():
            if layer_name not in self.target:
                continue
            num_experts = router_logits.shape[-1]
            device = router_logits.device
            alpha = self.alpha.get(layer_name, torch.ones(num_experts))
            total = total + routing_regularizer(
                router_logits,
                self._placed("target", layer_name, self.target[layer_name], device),
                self._placed("alpha", layer_name, alpha, device),
                step.top_k[layer_name],
                form=self.form,
            )
        return total


class LoadBalancingTerm(LossTerm):
    """Switch-Transformer load-balancing loss summed over the MoE layers."""

    name = "load-balancing"
    metric = "balance_loss"

    @classmethod
    def from_spec(cls, spec: LossTermSpec) -> LoadBalancingTerm:
        return cls(spec.coefficient)

    def value(self, step: StepContext) -> Tensor:
        total = torch.zeros(())
        for layer_name, (router_logits, _hidden) in step.routing.items():
            total = total + load_balancing_loss(router_logits, step.top_k[layer_name])
        return total


class CallableTerm(LossTerm):
    """A plain function as a term: ``fn(model, routing) -> scalar`` (coefficient 1).

    Handy for experiments: ``Simulation.extra_terms.append(CallableTerm(fn))``.
    """

    name = "callable"
    metric = "extra_loss"

    def __init__(
        self,
        function: Callable[[MoEModel, dict[str, tuple[Tensor, Tensor]]], Tensor],
        coefficient: float = 1.0,
    ) -> None:
        super().__init__(coefficient)
        self.function = function

    def value(self, step: StepContext) -> Tensor:
        return self.function(step.model, step.routing)


LOSS_TERMS: dict[str, Callable[[LossTermSpec], LossTerm]] = {
    ProximalTerm.name: ProximalTerm.from_spec,
    RoutingAlignmentTerm.name: RoutingAlignmentTerm.from_spec,
    LoadBalancingTerm.name: LoadBalancingTerm.from_spec,
}
"""Loss terms a server may ask for, by name."""

METRICS = ("balance_loss", "routing_loss", "proximal_loss", "extra_loss")
"""Metric keys every local training reports (0 for terms that were not used)."""


def build_loss_terms(specs: Sequence[LossTermSpec]) -> list[LossTerm]:
    """The terms the instructions ask for, in their order.

    Raises
    ------
    UnknownLossTermError
        Naming the unknown term and the known ones (e.g. a client older than the server).
    """
    terms = []
    for spec in specs:
        factory = LOSS_TERMS.get(spec.name)
        if factory is None:
            raise UnknownLossTermError(
                f"loss term {spec.name!r} is unknown to this client; known: {sorted(LOSS_TERMS)}"
            )
        terms.append(factory(spec))
    return terms
