"""How a sketch dimension changes step D's decisions against the exact cosines, on
structured synthetic updates (``C`` clients, ``P_e`` values in one expert, ``H`` hidden
width, ``k`` sketch values)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedalign.strategies.fedalign.semantic import (
    cosine_gram,
    hidden_similarities,
    selection_weights,
    semantic_alignment,
    sketch_signs,
    sketch_vector,
)

Tensor = torch.Tensor


@dataclass
class SketchAccuracy:
    """How a sketch dimension changes step D's decisions against the exact cosines."""

    sketch_dim: int
    expert_values: int
    memberships: int  # (expert, active client) pairs compared
    agreement: float  # fraction of them with the same aligned / not-aligned decision
    max_abs_cosine_error: float  # over active client pairs i != j
    mean_abs_cosine_error: float
    max_weight_l1: float  # max over experts of sum_i |w_i(sketch) - w_i(exact)|
    sketch_s: float  # time to sketch every update


def structured_updates(
    num_clients: int,
    expert_values: int,
    hidden: int,
    groups: int,
    outliers: int,
    noise: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """One expert's updates ``(C, P_e)``, routed means ``(C, H)`` and activity ``(C,)``.

    Clients ``0 .. C - outliers - 1`` belong to ``groups`` groups (``i mod groups``): update
    ``g + noise * z`` around their group's direction ``g`` (within-group cosine about
    ``1 / (1 + noise^2)``), hidden mean likewise around a group mean. The last ``outliers``
    clients have random directions. One client in ten routed no token (inactive).
    """
    directions = torch.randn(groups, expert_values, generator=generator)
    centres = torch.randn(groups, hidden, generator=generator)
    updates = torch.randn(num_clients, expert_values, generator=generator).mul_(noise)
    means = torch.randn(num_clients, hidden, generator=generator).mul_(0.5)
    for i in range(num_clients - outliers):
        updates[i].add_(directions[i % groups])
        means[i].add_(centres[i % groups])
    active = torch.rand(num_clients, generator=generator) >= 0.1
    return updates, means, active


@dataclass
class ExactExpert:
    """One expert's synthetic round and its exact step-D decision (hard selection)."""

    updates: Tensor  # (C, P_e)
    hidden_similarity: Tensor  # (C, C)
    active: Tensor  # (C,)
    exact: Tensor  # (C, C) exact update cosines
    decision: Any
    num_examples: Tensor  # (C,)
    usage: Tensor  # (C,)
    weights: Tensor  # (C,)


def exact_expert(
    num_clients: int,
    expert_values: int,
    hidden: int,
    groups: int,
    outliers: int,
    noise: float,
    generator: torch.Generator,
) -> ExactExpert:
    """Fresh :func:`structured_updates` and step D's decision from their exact cosines."""
    updates, means, active = structured_updates(
        num_clients, expert_values, hidden, groups, outliers, noise, generator
    )
    counts = active.float() * 10.0
    hidden_similarity = hidden_similarities(means[:, None, :], counts[:, None])[0]  # (C, C)
    exact = cosine_gram(updates)
    decision = semantic_alignment(hidden_similarity, exact, active)
    num_examples = torch.randint(50, 500, (num_clients,), generator=generator).float()
    usage = torch.rand(num_clients, generator=generator) * active
    weights, _ = selection_weights(decision, active, num_examples, usage)
    return ExactExpert(
        updates, hidden_similarity, active, exact, decision, num_examples, usage, weights
    )


def sketch_accuracy(
    sketch_dims: Sequence[int],
    *,
    num_clients: int = 50,
    num_experts: int = 8,
    expert_values: int = 2 * 384 * 192,
    hidden: int = 384,
    groups: int = 3,
    outliers: int = 5,
    noise: float = 1.0,
    seed: int = 0,
) -> list[SketchAccuracy]:
    """Step D's decisions (hard selection) from exact vs sketched update cosines.

    Each expert gets fresh :func:`structured_updates`; ``S`` comes from the hidden means,
    ``D`` from :func:`cosine_gram` of the updates (exact) or of their sketches.
    """
    generator = torch.Generator().manual_seed(seed)
    signs = sketch_signs(expert_values)
    experts = [
        exact_expert(num_clients, expert_values, hidden, groups, outliers, noise, generator)
        for _ in range(num_experts)
    ]
    return [sketched_row(experts, signs, dim, expert_values) for dim in sketch_dims]


def sketched_row(
    experts: Sequence[ExactExpert], signs: Tensor, sketch_dim: int, expert_values: int
) -> SketchAccuracy:
    """Step D's decisions of every expert with ``sketch_dim``-value sketches vs exact."""
    agree = total = 0
    errors: list[Tensor] = []
    weight_l1 = 0.0
    elapsed = 0.0
    for expert in experts:
        active = expert.active
        start = time.perf_counter()
        sketches = torch.stack([sketch_vector(u, signs, sketch_dim) for u in expert.updates])
        elapsed += time.perf_counter() - start
        approximate = cosine_gram(sketches)
        sketched = semantic_alignment(expert.hidden_similarity, approximate, active)
        agree += int((sketched.aligned == expert.decision.aligned)[active].sum())
        total += int(active.sum())
        num_clients = int(active.numel())
        pairs = active[:, None] & active[None, :] & ~torch.eye(num_clients, dtype=torch.bool)
        errors.append((approximate - expert.exact)[pairs].abs())
        sketched_weights, _ = selection_weights(sketched, active, expert.num_examples, expert.usage)
        weight_l1 = max(weight_l1, float((sketched_weights - expert.weights).abs().sum()))
    error = torch.cat(errors)
    return SketchAccuracy(
        sketch_dim=sketch_dim,
        expert_values=expert_values,
        memberships=total,
        agreement=round(agree / max(total, 1), 4),
        max_abs_cosine_error=round(float(error.max()), 4),
        mean_abs_cosine_error=round(float(error.mean()), 4),
        max_weight_l1=round(weight_l1, 4),
        sketch_s=round(elapsed, 3),
    )


def sketch_accuracy_table(rows: Sequence[SketchAccuracy]) -> str:
    """Markdown table of :func:`sketch_accuracy`'s rows."""
    header = (
        "| sketch dim | expert values | memberships | agree with exact | max abs cos error "
        "| mean abs cos error | max weight L1 | sketch time s |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    return header + "".join(
        f"| {r.sketch_dim} | {r.expert_values} | {r.memberships} | {r.agreement:.4f} | "
        f"{r.max_abs_cosine_error:.4f} | {r.mean_abs_cosine_error:.4f} | {r.max_weight_l1:.4f} | "
        f"{r.sketch_s:.2f} |\n"
        for r in rows
    )
