"""Distinct experts from a dense FFN: MoEfication and Drop-Upcycling.

MoEfication (Zhang et al., "MoEfication: Transformer Feed-forward Layers are Mixtures of
Experts", Findings of ACL 2022) splits an FFN's ``I`` intermediate neurons into ``E`` equal
groups; expert ``e`` keeps its group's rows of the first matrix (and bias entries) and
columns of the second, so the sum of all experts' outputs plus the second bias (counted
once) is the dense FFN exactly, and each expert costs ``1/E`` of it.

Drop-Upcycling (Nakamura et al., ICLR 2025) copies the FFN into every expert, then
re-initialises a fraction of each copy's intermediate neurons (a different random subset per
expert) from the normal distribution of the dense weights' statistics.

Pure math (balanced clustering, the router fit) is in free functions; the layer builders
call them. The sample hidden states come from :func:`ffn_inputs` (the dense encoder run on
sample text).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedalign.models.block import UpcycledExpert, UpcycledMoE

Tensor = torch.Tensor

EXPERT_INITS = ("moefication", "copy", "drop-upcycling")
ROUTER_LOGIT_STD = 2.0
"""Spread (std) of the fitted router's logits on the sample text (:func:`fit_router`)."""


# ------------------------------------------------------------------------------ pure math
def balanced_assign(distances: Tensor) -> Tensor:
    """Assign ``n`` points to ``k`` clusters of exactly ``n / k`` points each.

    Greedy on the globally sorted (point, cluster) distances: the closest pair whose point is
    free and whose cluster has room is taken first.

    Parameters
    ----------
    distances : Tensor
        ``(n, k)``, ``n`` divisible by ``k``.

    Returns
    -------
    Tensor
        ``(n,)`` int64 cluster of each point; every cluster holds ``n / k`` points.
    """
    n, k = distances.shape
    if n % k != 0:
        raise ValueError(f"{n} points cannot be split into {k} equal clusters")
    capacity = n // k
    order = torch.argsort(distances.reshape(-1), stable=True).tolist()
    labels = [-1] * n
    room = [capacity] * k
    left = n
    for flat in order:
        point, cluster = divmod(flat, k)
        if labels[point] >= 0 or room[cluster] == 0:
            continue
        labels[point] = cluster
        room[cluster] -= 1
        left -= 1
        if left == 0:
            break
    return torch.tensor(labels, dtype=torch.int64)


def balanced_kmeans(
    points: Tensor, num_clusters: int, iterations: int = 30, seed: int = 0
) -> Tensor:
    """Balanced k-means: k-means whose assignment step keeps every cluster the same size.

    Parameters
    ----------
    points : Tensor
        ``(n, d)``; ``n`` divisible by ``num_clusters``.
    num_clusters : int
    iterations : int, default 30
        At most this many assign / update rounds (stops earlier when nothing moves).
    seed : int, default 0
        Picks the initial centroids (distinct points).

    Returns
    -------
    Tensor
        ``(n,)`` int64 labels, each cluster of size ``n / num_clusters``.
    """
    points = points.detach().float()
    generator = torch.Generator().manual_seed(seed)
    first = torch.randperm(points.shape[0], generator=generator)[:num_clusters]
    centroids = points[first].clone()  # (k, d)
    labels = torch.full((points.shape[0],), -1, dtype=torch.int64)
    for _ in range(iterations):
        # squared distance up to the per-point constant |x|^2 (ranks are what matter)
        distances = (centroids * centroids).sum(dim=1) - 2.0 * points @ centroids.T  # (n, k)
        new_labels = balanced_assign(distances)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        for cluster in range(num_clusters):
            centroids[cluster] = points[labels == cluster].mean(dim=0)
    return labels


def group_activation_mass(activations: Tensor, labels: Tensor, num_groups: int) -> Tensor:
    """Per token, the sum of each group's positive intermediate activations.

    Parameters
    ----------
    activations : Tensor
        ``(N, I)`` activations ``act(x W1^T + b1)`` of sample tokens.
    labels : Tensor
        ``(I,)`` group of each neuron.
    num_groups : int

    Returns
    -------
    Tensor
        ``(N, E)``.
    """
    mass = torch.zeros(activations.shape[0], num_groups, dtype=activations.dtype)
    return mass.index_add_(1, labels, activations.clamp(min=0))


def fit_router(hidden: Tensor, mass: Tensor, ridge: float = 1e-3, logit_std: float = 1.0) -> Tensor:
    """Least-squares router ``W`` (``(E, H)``) with ``hidden @ W.T`` ~ standardised ``mass``.

    The targets are centred per token (softmax ignores a per-token shift) and scaled to
    std ``logit_std``, which sets how peaked the initial routing distributions are.

    Parameters
    ----------
    hidden : Tensor
        ``(N, H)`` sample hidden states entering the layer.
    mass : Tensor
        ``(N, E)`` per-group activation mass (:func:`group_activation_mass`).
    ridge : float, default 1e-3
        Ridge term, relative to the mean diagonal of ``hidden.T @ hidden``.
    logit_std : float, default 1.0
    """
    x = hidden.double()
    y = mass.double()
    y = y - y.mean(dim=1, keepdim=True)
    y = logit_std * y / y.std().clamp(min=1e-12)
    gram = x.T @ x  # (H, H)
    gram = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram, x.T @ y)  # (H, E)
    return weight.T.float()


def centroid_router(fc_in_weight: Tensor, labels: Tensor, num_groups: int) -> Tensor:
    """Router rows = mean of each group's input-weight rows (no sample text needed)."""
    rows = torch.zeros(num_groups, fc_in_weight.shape[1], dtype=torch.float64)
    rows.index_add_(0, labels, fc_in_weight.detach().double())
    return (rows / (labels.numel() // num_groups)).float()


# -------------------------------------------------------------------------- layer builders
def split_expert(
    fc_in: nn.Linear, activation: nn.Module, fc_out: nn.Linear, neurons: Tensor
) -> UpcycledExpert:
    """The sub-FFN on ``neurons``: rows of ``fc_in`` (and bias), columns of ``fc_out``."""
    width = int(neurons.numel())
    part_in = nn.Linear(fc_in.in_features, width, bias=fc_in.bias is not None)
    part_out = nn.Linear(width, fc_out.out_features, bias=False)
    with torch.no_grad():
        part_in.weight.copy_(fc_in.weight[neurons])
        if fc_in.bias is not None:
            part_in.bias.copy_(fc_in.bias[neurons])
        part_out.weight.copy_(fc_out.weight[:, neurons])
    return UpcycledExpert(part_in, copy.deepcopy(activation), part_out)


def moefy_ffn(
    fc_in: nn.Linear,
    activation: nn.Module,
    fc_out: nn.Linear,
    num_experts: int,
    top_k: int,
    gating: str,
    sample_hidden: Tensor | None,
    seed: int = 0,
) -> tuple[UpcycledMoE, Tensor]:
    """MoEfy one FFN; returns the layer and the ``(I,)`` group of every neuron.

    Choices, each measured on all-MiniLM-L6-v2's two top FFNs, E = 8, 128 WordNet glosses to
    fit and 128 others held out (``benchmarks/moefication_choices.py``, table in
    ``benchmarks/results/backbone/``):

    * Clustering: balanced k-means of the neurons' co-activation profiles (each neuron's
      positive activations over the sample tokens, centred and L2-normalised), so that
      neurons firing on the same tokens share an expert. The true top-2 groups held 51% of a
      token's positive activation mass (vs 40-43% when clustering the input-weight rows)
      and the top-2 output's relative error was 0.27 / 0.62 (layers 4 / 5) vs 0.35 / 0.66.
    * Router: least-squares fit of the groups' activation mass on the sample hidden states
      (:func:`fit_router`, logits scaled to std :data:`ROUTER_LOGIT_STD` = 2). Its top-2
      held 87% / 84% of the true top-2 groups (chance 25%) and gave a lower output error
      than the group centroids (0.271 vs 0.272, 0.627 vs 0.646). Std 2 vs 1 vs 4: central
      accuracy 0.847 / 0.845 / 0.837, between-client JS after one round 0.0144 / 0.0091 /
      0.0178 (``benchmarks/moefication_router_scale.py``).

    Without sample text, both fall back to the input-weight rows (clustering) and the
    group centroids (router).

    Parameters
    ----------
    fc_in, fc_out : nn.Linear
        The dense FFN; ``fc_in.out_features`` must be divisible by ``num_experts``.
    activation : nn.Module
    num_experts, top_k : int
    gating : str
    sample_hidden : Tensor or None
        ``(N, H)`` hidden states entering this FFN on sample text.
    seed : int, default 0
        Seeds the clustering's initial centroids.
    """
    intermediate = fc_in.out_features
    if intermediate % num_experts != 0:
        raise ValueError(
            f"MoEfication needs the FFN width ({intermediate}) to be divisible by "
            f"model.num-experts ({num_experts})"
        )
    with torch.no_grad():
        if sample_hidden is not None:
            activations = activation(fc_in(sample_hidden)).clamp(min=0)  # (N, I)
            profiles = activations.T - activations.T.mean(dim=1, keepdim=True)  # (I, N)
            profiles = profiles / profiles.norm(dim=1, keepdim=True).clamp(min=1e-12)
            labels = balanced_kmeans(profiles, num_experts, seed=seed)
            mass = group_activation_mass(activations, labels, num_experts)
            router = fit_router(sample_hidden, mass, logit_std=ROUTER_LOGIT_STD)
        else:
            rows = fc_in.weight / fc_in.weight.norm(dim=1, keepdim=True).clamp(min=1e-12)
            labels = balanced_kmeans(rows, num_experts, seed=seed)
            router = centroid_router(fc_in.weight, labels, num_experts)
    experts = [
        split_expert(fc_in, activation, fc_out, torch.nonzero(labels == e).reshape(-1))
        for e in range(num_experts)
    ]
    bias = fc_out.bias.detach() if fc_out.bias is not None else None
    moe = UpcycledMoE.from_experts(experts, top_k, gating, router_weight=router, output_bias=bias)
    return moe, labels


def drop_upcycle_expert(
    expert: UpcycledExpert, fraction: float, generator: torch.Generator | None = None
) -> None:
    """Re-initialise a random ``fraction`` of ``expert``'s intermediate neurons in place.

    Their ``fc_in`` rows and bias entries and their ``fc_out`` columns are drawn from
    normal distributions with the mean and std of the original tensors (Nakamura et al.).
    """
    width = expert.fc_in.out_features
    count = round(fraction * width)
    if count == 0:
        return
    neurons = torch.randperm(width, generator=generator)[:count]
    with torch.no_grad():
        for tensor, index in (
            (expert.fc_in.weight, (neurons,)),
            (expert.fc_out.weight, (slice(None), neurons)),
        ):
            mean, std = float(tensor.mean()), float(tensor.std())
            shape = tensor[index].shape
            tensor[index] = torch.randn(shape, generator=generator) * std + mean
        if expert.fc_in.bias is not None:
            bias = expert.fc_in.bias
            mean, std = float(bias.mean()), float(bias.std())
            bias[neurons] = torch.randn(count, generator=generator) * std + mean


# ----------------------------------------------------------------------------- sample text
def ffn_inputs(
    encoder: Any, layer_indices: Sequence[int], input_ids: Tensor, attention_mask: Tensor
) -> dict[int, Tensor]:
    """Hidden states entering each chosen layer's FFN, real tokens only: ``{i: (N, H)}``.

    One eval-mode pass of the (still dense) encoder with forward hooks on the FFNs.
    """
    captured: dict[int, Tensor] = {}
    keep = attention_mask.reshape(-1).bool()
    handles = []
    layers = encoder.encoder.layer
    for index in layer_indices:

        def hook(_module: nn.Module, inputs: tuple[Any, ...], _output: Any, i: int = index) -> None:
            hidden = inputs[0].reshape(-1, inputs[0].shape[-1])  # (B*T, H)
            captured[i] = hidden[keep].detach()

        handles.append(layers[index].intermediate.register_forward_hook(hook))
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            encoder(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        encoder.train(was_training)
        for handle in handles:
            handle.remove()
    return captured
