"""Local training of one client: the task loss plus the loss terms the round asks for.

The loss of a step is ``L_task + sum_t coefficient_t * value_t`` over the
:class:`~fedalign.client.losses.LossTerm` objects given, in order. The trainer knows no
algorithm: FedProx's proximal term, FedAlign-MoE's routing regulariser and the
load-balancing loss are all terms. Nor does it know the task: ``L_task`` comes from the
examples' :class:`~fedalign.client.objectives.TaskObjective` (cross-entropy of class
logits, or a causal-LM loss on the correct choice of multiple-choice examples).

Batches move to the model's device and the forward pass and task loss run under the
model's autocast (``run.precision``); the returned parameters and optimiser state are CPU
tensors. The loop itself never waits for the device: each step's losses are summed on the
device in float64 (the same sums as Python floats would give) and read once, at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedalign.client.inputs import ModelInputs
from fedalign.client.losses import METRICS, LossTerm, StepContext
from fedalign.client.objectives import objective_for
from fedalign.config import TrainConfig
from fedalign.models import MoEModel, RoutingCapture

Tensor = torch.Tensor


@dataclass
class LocalTrainingResult:
    """What local training returns.

    Parameters
    ----------
    parameters : dict of str to Tensor
        Trainable parameters after training.
    metrics : dict of str to float
        Mean losses (``loss``, ``task_loss`` and each term's metric, 0 for absent terms),
        ``steps`` and ``seconds``.
    optimizer_state : dict or None
        AdamW state, when the caller asked to keep it.
    """

    parameters: dict[str, Tensor]
    metrics: dict[str, float]
    optimizer_state: dict[str, Any] | None = None


@dataclass
class _LossParts:
    """Per-metric sums over steps, kept as float64 scalars on the values' device."""

    totals: dict[str, Tensor | float] = field(default_factory=dict)
    steps: int = 0

    def add(self, values: Mapping[str, Tensor | float]) -> None:
        for key, value in values.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.steps += 1

    def means(self) -> dict[str, float]:
        """The mean of every metric (the sums are read from the device here, once a round)."""
        return {k: float(v) / max(self.steps, 1) for k, v in self.totals.items()}


def _exact(value: Tensor) -> Tensor:
    """``value`` detached as float64: exactly the number ``float(value)`` would give."""
    return value.detach().to(torch.float64)


def total_local_steps(num_examples: int, config: TrainConfig) -> int:
    """Steps of one local round: ``local_steps``, or ``local_epochs`` epochs of batches."""
    if config.local_steps > 0:
        return config.local_steps
    return max(math.ceil(num_examples / config.batch_size), 1) * config.local_epochs


def _step_loss(
    task_loss: Tensor, terms: Sequence[LossTerm], step: StepContext
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """``task + sum coefficient * value`` and the per-metric values of this step (float64
    scalars on the device, 0.0 for metrics no term has)."""
    loss = task_loss
    values: dict[str, Tensor | float] = dict.fromkeys(METRICS, 0.0)
    for term in terms:
        value = term.value(step)
        loss = loss + term.coefficient * value
        values[term.metric] = values.get(term.metric, 0.0) + _exact(value)
    return loss, values


def state_to_cpu(state: Any) -> Any:
    """``state`` (nested dicts, lists, tuples) with every tensor moved to the CPU (tensors
    already there are kept as they are)."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {key: state_to_cpu(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(state_to_cpu(value) for value in state)
    return state


def train_local(
    model: MoEModel,
    data: ModelInputs,
    terms: Sequence[LossTerm],
    config: TrainConfig,
    *,
    global_parameters: Mapping[str, Tensor],
    seed: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    keep_optimizer_state: bool = False,
    on_step: Callable[[], None] | None = None,
) -> LocalTrainingResult:
    """Train the model's trainable parameters on ``data`` (the model is modified in place).

    Parameters
    ----------
    model : MoEModel
        Already holding the starting parameters.
    data : ModelInputs
        The client's training examples.
    terms : sequence of LossTerm
        Added to the task loss in this order (see :mod:`fedalign.client.losses`).
    config : TrainConfig
        Optimiser, batch size, epochs or steps, clipping.
    global_parameters : mapping of str to Tensor
        The round's global trainable parameters (the terms' reference).
    seed : int, default 0
        Seeds shuffling and dropout, so a client's round is reproducible by itself.
    optimizer_state : dict or None, default None
        AdamW state to resume from.
    keep_optimizer_state : bool, default False
        Return the AdamW state.
    on_step : callable or None, default None
        Called after every step (progress bars).
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = dict(model.model.named_parameters())
    trainable = [params[name] for name in model.trainable_names]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)  # moves the state to the parameters' device
    reference = {k: v.detach().to(model.device, copy=True) for k, v in global_parameters.items()}
    objective = objective_for(data, model).calibrated(data.labels, config.label_calibration)
    top_k = {layer.name: layer.top_k for layer in model.full_layout.layers}

    n = len(data)
    total_steps = total_local_steps(n, config)
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
            batch = objective.routed(data.select(indices))  # on the CPU: no device reads
            capture.set_token_mask(batch.attention_mask)
            batch = batch.to(model.device)
            with model.autocast():
                task_loss = objective.loss(model, batch)
            step = StepContext(model, capture.pop(), reference, top_k, batch.labels)
            loss, values = _step_loss(task_loss, terms, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            parts.add({"loss": _exact(loss), "task_loss": _exact(task_loss), **values})
            if on_step is not None:
                on_step()
    metrics = parts.means()
    metrics["steps"] = float(total_steps)
    metrics["seconds"] = time.perf_counter() - started
    return LocalTrainingResult(
        parameters=model.trainable_state(),
        metrics=metrics,
        optimizer_state=state_to_cpu(optimizer.state_dict()) if keep_optimizer_state else None,
    )
