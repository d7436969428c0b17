"""Local training, routing statistics and evaluation on one client's examples.

Everything here works on one :class:`~fedalign.models.MoEModel` in memory and a
:class:`ModelInputs` batch source: either token ids, or, for upcycled encoders whose lower
layers are frozen, the cached hidden states after the frozen prefix (computed once per
example by :func:`compute_prefix_inputs`, so each round only runs the trainable top).

The loss is ``L_task + load_balance_coef * L_balance + extra terms``; the extra terms are
FedProx's proximal term and FedAlign-MoE's routing regulariser, both driven by the
server's :class:`~fedalign.strategies.base.TrainInstructions`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fedalign.config import TrainConfig
from fedalign.models import MoEModel, RoutingCapture
from fedalign.routing import (
    RoutingStatisticsAccumulator,
    load_balancing_loss,
    privatize_mean_hidden,
    routing_regularizer,
)
from fedalign.strategies.base import RoutingStatistics, TrainInstructions

Tensor = torch.Tensor
ExtraLoss = Callable[[MoEModel, dict[str, tuple[Tensor, Tensor]]], Tensor]
"""An extra loss term: ``(model, {layer: (router_logits (N, E), hidden (N, H))}) -> scalar``.

Added to the client loss every step (after the proximal and routing terms); the captured
routing keeps its graph, so a term may depend on the router's logits."""


@dataclass
class ModelInputs:
    """Examples ready for the model.

    Exactly one of ``input_ids`` (``(N, T)``) and ``prefix_hidden`` (``(N, T, H)``, the
    cached output of the frozen prefix) is set.
    """

    attention_mask: Tensor  # (N, T)
    labels: Tensor  # (N,)
    input_ids: Tensor | None = None
    prefix_hidden: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, indices: Tensor) -> ModelInputs:
        """Rows ``indices``, trimmed to the longest selected example."""
        mask = self.attention_mask[indices]
        length = max(int(mask.sum(dim=1).max().item()), 1) if len(indices) else 1
        return ModelInputs(
            attention_mask=mask[:, :length],
            labels=self.labels[indices],
            input_ids=None if self.input_ids is None else self.input_ids[indices, :length],
            prefix_hidden=(
                None if self.prefix_hidden is None else self.prefix_hidden[indices, :length]
            ),
        )

    def nbytes(self) -> int:
        tensors = [self.attention_mask, self.labels, self.input_ids, self.prefix_hidden]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def forward_logits(model: MoEModel, batch: ModelInputs) -> Tensor:
    """Class logits ``(B, C)`` for a batch, through the cached prefix when there is one."""
    if batch.prefix_hidden is not None:
        return model.classify_from_prefix(batch.prefix_hidden, batch.attention_mask)
    assert batch.input_ids is not None
    return model.classify(batch.input_ids, batch.attention_mask)


@torch.no_grad()
def compute_prefix_inputs(
    model: MoEModel, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, batch_size: int
) -> ModelInputs:
    """Run the frozen prefix once over every example and keep its output."""
    chunks = []
    for start in range(0, input_ids.shape[0], batch_size):
        stop = start + batch_size
        chunks.append(model.prefix(input_ids[start:stop], attention_mask[start:stop]))
    hidden = torch.cat(chunks) if chunks else torch.zeros(0, input_ids.shape[1], 0)
    return ModelInputs(attention_mask=attention_mask, labels=labels, prefix_hidden=hidden)


@dataclass
class LocalTrainingResult:
    """What local training returns.

    Parameters
    ----------
    parameters : dict of str to Tensor
        Trainable parameters after training.
    metrics : dict of str to float
        Mean losses (``loss``, ``task_loss``, ``balance_loss``, ``proximal_loss``,
        ``routing_loss``), ``steps`` and ``seconds``.
    optimizer_state : dict or None
        AdamW state, when the caller asked to keep it.
    """

    parameters: dict[str, Tensor]
    metrics: dict[str, float]
    optimizer_state: dict[str, Any] | None = None


def proximal_term(model: MoEModel, reference: Mapping[str, Tensor]) -> Tensor:
    """``sum ||w - w_global||^2`` over trainable parameters (FedProx)."""
    params = dict(model.model.named_parameters())
    total = torch.zeros(())
    for name in model.trainable_names:
        total = total + (params[name] - reference[name]).pow(2).sum()
    return total


@dataclass
class _LossParts:
    totals: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.totals.items()}


def train_local(
    model: MoEModel,
    data: ModelInputs,
    instructions: TrainInstructions,
    config: TrainConfig,
    *,
    global_parameters: Mapping[str, Tensor],
    load_balance_coef: float = 0.0,
    seed: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    keep_optimizer_state: bool = False,
    on_step: Callable[[], None] | None = None,
    extra_losses: Sequence[ExtraLoss] = (),
) -> LocalTrainingResult:
    """Train the model's trainable parameters on ``data`` (the model is modified in place).

    Parameters
    ----------
    model : MoEModel
        Already holding the starting parameters.
    data : ModelInputs
        The client's training examples.
    instructions : TrainInstructions
        Proximal coefficient, routing regulariser target and strengths.
    config : TrainConfig
        Optimiser, batch size, epochs or steps, clipping.
    global_parameters : mapping of str to Tensor
        The round's global trainable parameters (the proximal term's reference).
    load_balance_coef : float, default 0.0
    seed : int, default 0
        Seeds shuffling and dropout, so a client's round is reproducible by itself.
    optimizer_state : dict or None, default None
        AdamW state to resume from.
    keep_optimizer_state : bool, default False
        Return the AdamW state.
    on_step : callable or None, default None
        Called after every step (progress bars).
    extra_losses : sequence of ExtraLoss, default ()
        Further loss terms (e.g. a new regulariser), each added to the loss as it is.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = dict(model.model.named_parameters())
    trainable = [params[name] for name in model.trainable_names]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    reference = {k: v.detach().clone() for k, v in global_parameters.items()}
    use_routing = instructions.routing_lambda > 0 and bool(instructions.global_routing)
    need_capture = use_routing or load_balance_coef > 0 or bool(extra_losses)
    top_k = {layer.name: layer.top_k for layer in model.full_layout.layers}

    n = len(data)
    steps_per_epoch = max(math.ceil(n / config.batch_size), 1)
    total_steps = (
        config.local_steps if config.local_steps > 0 else steps_per_epoch * config.local_epochs
    )
    order = torch.randperm(n, generator=generator)
    position = 0
    parts = _LossParts()
    model.model.train()
    with RoutingCapture(model.taps, detach=False) as capture:
        for _ in range(total_steps):
            if position >= n:
                order, position = torch.randperm(n, generator=generator), 0
            indices = order[position : position + config.batch_size]
            position += config.batch_size
            batch = data.select(indices)
            capture.set_token_mask(batch.attention_mask)
            logits = forward_logits(model, batch)  # (B, C)
            captured = capture.pop()
            task_loss = F.cross_entropy(logits, batch.labels)
            loss = task_loss
            balance = torch.zeros(())
            routing = torch.zeros(())
            proximal = torch.zeros(())
            if need_capture:
                for layer_name, (router_logits, _hidden) in captured.items():
                    if load_balance_coef > 0:
                        balance = balance + load_balancing_loss(router_logits, top_k[layer_name])
                    if use_routing and layer_name in instructions.global_routing:
                        num_experts = router_logits.shape[-1]
                        alpha = instructions.expert_alpha.get(layer_name, torch.ones(num_experts))
                        routing = routing + routing_regularizer(
                            router_logits,
                            instructions.global_routing[layer_name],
                            alpha,
                            top_k[layer_name],
                            form=instructions.routing_form,
                        )
                loss = loss + load_balance_coef * balance + instructions.routing_lambda * routing
            if instructions.proximal_mu > 0:
                proximal = proximal_term(model, reference)
                loss = loss + 0.5 * instructions.proximal_mu * proximal
            extra = torch.zeros(())
            for extra_loss in extra_losses:
                extra = extra + extra_loss(model, captured)
            loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            parts.add(
                loss=float(loss.detach()),
                task_loss=float(task_loss.detach()),
                balance_loss=float(balance.detach()),
                routing_loss=float(routing.detach()),
                proximal_loss=float(proximal.detach()),
                extra_loss=float(extra.detach()),
            )
            if on_step is not None:
                on_step()
    metrics = parts.means()
    metrics["steps"] = float(total_steps)
    metrics["seconds"] = time.perf_counter() - started
    return LocalTrainingResult(
        parameters=model.trainable_state(),
        metrics=metrics,
        optimizer_state=optimizer.state_dict() if keep_optimizer_state else None,
    )


@torch.no_grad()
def compute_routing_statistics(
    model: MoEModel,
    data: ModelInputs,
    *,
    max_examples: int = 512,
    batch_size: int = 64,
    seed: int = 0,
    hidden_noise_std: float = 0.0,
) -> RoutingStatistics:
    """One no-grad pass over (a capped sample of) ``data``: per-layer routing statistics.

    Parameters
    ----------
    max_examples : int, default 512
        Examples sampled (without replacement, seeded) for the pass.
    hidden_noise_std : float, default 0.0
        Relative Gaussian noise added to the mean routed hidden states before upload.
    """
    generator = torch.Generator().manual_seed(seed)
    n = len(data)
    chosen = torch.randperm(n, generator=generator)[: min(max_examples, n)]
    chosen, _ = chosen.sort()
    accumulators = {
        layer.name: RoutingStatisticsAccumulator(layer.num_experts, layer.hidden_size, layer.top_k)
        for layer in model.full_layout.layers
    }
    model.model.eval()
    with RoutingCapture(model.taps, detach=True) as capture:
        for start in range(0, len(chosen), batch_size):
            batch = data.select(chosen[start : start + batch_size])
            capture.set_token_mask(batch.attention_mask)
            forward_logits(model, batch)
            for layer_name, (logits, hidden) in capture.pop().items():
                accumulators[layer_name].update(logits.float(), hidden.float())
    statistics = {name: acc.result() for name, acc in accumulators.items()}
    if hidden_noise_std > 0:
        for stats in statistics.values():
            stats.mean_hidden = privatize_mean_hidden(
                stats.mean_hidden, hidden_noise_std, generator
            )
    return statistics


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
