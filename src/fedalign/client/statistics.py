"""The routing statistics a client computes after local training (FedAlign-MoE step 2).

The pass runs the sequences the task trains on (for multiple choice: context plus the
correct choice), on the model's device; the statistics come back as CPU tensors.
"""

from __future__ import annotations

import torch

from fedalign.client.inputs import ModelInputs
from fedalign.client.objectives import objective_for
from fedalign.models import MoEModel, RoutingCapture
from fedalign.protocol import RoutingStatistics
from fedalign.routing import RoutingStatisticsAccumulator, privatize_mean_hidden


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
    objective = objective_for(data, model)
    model.model.eval()
    with RoutingCapture(model.taps, detach=True) as capture:
        for start in range(0, len(chosen), batch_size):
            batch = objective.routed(data.select(chosen[start : start + batch_size]))
            batch = batch.to(model.device)
            capture.set_token_mask(batch.attention_mask)
            with model.autocast():
                objective.forward(model, batch)
            for layer_name, (logits, hidden) in capture.pop().items():
                accumulators[layer_name].update(logits.float(), hidden.float())
    statistics = {name: acc.result() for name, acc in accumulators.items()}
    if hidden_noise_std > 0:
        for stats in statistics.values():
            stats.mean_hidden = privatize_mean_hidden(
                stats.mean_hidden, hidden_noise_std, generator
            )
    return statistics
