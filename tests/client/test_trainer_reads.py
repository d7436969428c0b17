"""The training loop reads no tensor value per step (on a GPU each read waits for the GPU).

The reads counted are ``item``, ``float``, ``int``, ``bool`` and ``tolist`` of floating-point
tensors called by the trainer, the loss terms and the routing capture (reads of the
CPU-held examples' masks, which ``ModelInputs.select`` trims batches with, are integer).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fedalign.client.prepare import prepare
from fedalign.client.round import client_loss_terms
from fedalign.client.trainer import train_local
from fedalign.protocol import LossTermSpec, TrainInstructions
from tests.helpers import tiny_config

READS = {
    torch.Tensor.item,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__bool__,
    torch.Tensor.tolist,
}
WATCHED = ("fedalign/client/trainer.py", "fedalign/client/losses.py", "fedalign/models/capture.py")


class CountReads(TorchFunctionMode):
    """Counts value reads by the watched modules, per calling line."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in READS:
            frame = sys._getframe(1)  # the caller: reads inside torch (AdamW's CPU step
            name = frame.f_code.co_filename  # counter) are not the watched code's
            if name.endswith(WATCHED) and args and args[0].is_floating_point():
                self.reads[f"{name.rsplit('/', 1)[-1]}:{frame.f_lineno}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("steps", [3, 6])
def test_value_reads_do_not_grow_with_steps(steps: int) -> None:
    config = tiny_config(model__load_balance_coef=0.01)
    config.train.local_steps = steps
    prepared = prepare(config)
    model = prepared.model
    routing = {
        layer.name: torch.full((layer.num_experts,), 1 / layer.num_experts)
        for layer in model.full_layout.layers
    }
    alpha = {name: torch.ones_like(target) for name, target in routing.items()}
    spec = LossTermSpec("routing-alignment", 0.1, tensors={"target": routing, "alpha": alpha})
    instructions = TrainInstructions(loss_terms=[spec, LossTermSpec("proximal", 0.005)])
    terms = client_loss_terms(config, instructions, ())
    assert {t.metric for t in terms} == {"routing_loss", "balance_loss", "proximal_loss"}
    counter = CountReads()
    with counter:
        result = train_local(
            model,
            prepared.data.client_rows(0),
            terms,
            config.train,
            global_parameters=model.trainable_state(),
        )
    assert result.metrics["steps"] == steps
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert all(result.metrics[k] > 0 for k in ("routing_loss", "balance_loss", "proximal_loss"))
    # the means are read once, at the end: one read per metric whatever the step count
    assert sum(counter.reads.values()) <= len(result.metrics), counter.reads
