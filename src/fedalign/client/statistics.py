"""The routing statistics a client computes after local training (FedAlign-MoE step 2).

The pass runs the sequences the task trains on (for multiple choice: context plus the
correct choice), on the model's device; the statistics come back as CPU tensors.

What leaves the client for the semantic step depends on ``strategy.semantic-privacy``
(docs/privacy.md): the mean routed hidden states ``mu_i(e)`` (``none``), the same clipped
and noised (``clip-noise``, :func:`fedalign.routing.clip_and_noise_rows`), or nothing: an
empty ``(E, 0)`` tensor (``public-probe``; the server measures semantics on its probe set).
"""

from __future__ import annotations

import torch

from fedalign.client.inputs import ModelInputs
from fedalign.client.objectives import objective_for
from fedalign.models import MoEModel, RoutingCapture
from fedalign.protocol import RoutingStatistics
from fedalign.routing import (
    RoutingStatisticsAccumulator,
    clip_and_noise_rows,
    gaussian_dp_mu,
    gaussian_epsilon,
    privatize_mean_hidden,
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
    semantic_privacy: str = "none",
    semantic_clip: float = 1.0,
    semantic_noise_multiplier: float = 0.0,
) -> RoutingStatistics:
    """One no-grad pass over (a capped sample of) ``data``: per-layer routing statistics.

    Parameters
    ----------
    max_examples : int, default 512
        Examples sampled (without replacement, seeded) for the pass.
    hidden_noise_std : float, default 0.0
        Relative Gaussian noise added to the mean routed hidden states before upload.
    semantic_privacy : {"none", "clip-noise", "public-probe"}, default "none"
        ``clip-noise``: every ``mu(e)`` row clipped to L2 norm ``semantic_clip`` plus
        Gaussian noise ``semantic_noise_multiplier * semantic_clip`` (after any
        ``hidden_noise_std`` noise); ``public-probe``: ``mean_hidden`` becomes ``(E, 0)``.
    semantic_clip : float, default 1.0
    semantic_noise_multiplier : float, default 0.0
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
    if semantic_privacy == "clip-noise":
        for stats in statistics.values():
            stats.mean_hidden, _ = clip_and_noise_rows(
                stats.mean_hidden, semantic_clip, semantic_noise_multiplier, generator
            )
    elif semantic_privacy == "public-probe":
        for stats in statistics.values():
            stats.mean_hidden = stats.mean_hidden.new_zeros(stats.mean_hidden.shape[0], 0)
    elif semantic_privacy != "none":
        raise ValueError(
            f"unknown semantic_privacy {semantic_privacy!r}; accepted: "
            "['none', 'clip-noise', 'public-probe']"
        )
    return statistics


def semantic_privacy_metrics(
    statistics: RoutingStatistics,
    semantic_privacy: str,
    clip: float,
    noise_multiplier: float,
    delta: float,
) -> dict[str, float]:
    """What a client reports about the protection of its upload (result metrics).

    ``clip-noise``: ``semantic_clip`` (``C``), ``semantic_noise_std`` (``sigma C``, the scale
    actually used) and, with noise, ``semantic_mu`` (Gaussian-DP ``mu`` of this round's
    release of every layer's rows, :func:`~fedalign.routing.gaussian_dp_mu`),
    ``semantic_epsilon`` at ``semantic_delta``. ``public-probe``:
    ``semantic_hidden_width`` 0. ``none``: nothing (records of the default are unchanged).
    """
    if semantic_privacy == "clip-noise":
        metrics = {
            "semantic_clip": float(clip),
            "semantic_noise_std": float(noise_multiplier * clip),
        }
        if noise_multiplier > 0:  # without noise there is no finite epsilon to report
            rows = sum(int(s.mean_hidden.shape[0]) for s in statistics.values())
            mu = gaussian_dp_mu(rows, noise_multiplier)
            metrics["semantic_mu"] = mu
            metrics["semantic_epsilon"] = gaussian_epsilon(mu, delta)
            metrics["semantic_delta"] = float(delta)
        return metrics
    if semantic_privacy == "public-probe":
        return {"semantic_hidden_width": 0.0}
    return {}
