"""FedAlign-MoE step D for one MoE layer: semantic-aware expert aggregation.

One loop over the experts. For each: its active clients (routed tokens > 0), the direction
consensus of their updates against the hidden-state similarities (:func:`semantic_alignment`),
the selection weights (hard aligned set or soft), the merge, the record and (optionally) the
clients' personalised experts. How the clients' updates are held is pluggable:

* :class:`ExactUpdates` stacks the updates ``(C, P_e)``: exact cosines ``D_ij(e)``, merge
  ``theta(e) + w @ updates``;
* :class:`SketchedUpdates` (``sketch_dim = k > 0``) keeps ``k``-value signed bucket sketches
  ``(C, k)`` for the cosines and merges in a second pass over the clients' tensors,
  ``sum_i w_i theta_i(e) + (1 - sum_i w_i) theta(e)``: memory ``O(C k + P_e)``.

LoRA experts always work on their exact weight updates ``s B_e A_e``
(:func:`aggregate_lora_expert`). Shapes: ``C`` clients, ``E`` experts, ``H`` hidden width,
``P_e`` values in one expert.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedalign.moe.layout import MoELayerLayout, MoELayout
from fedalign.protocol import ClientResult, LayerRoutingStatistics
from fedalign.strategies.averaging import (
    cast_like_reference,
    client_expert_matrix,
    example_counts,
    example_weights,
    write_expert_vector_in_place,
)
from fedalign.strategies.fedalign.decisions import fill_expert_record
from fedalign.strategies.fedalign.semantic import (
    cosine_gram,
    fold_sketch,
    hidden_similarities,
    personal_region_weights,
    selection_weights,
    semantic_alignment,
    sketch_buckets,
    sketch_signs,
)
from fedalign.strategies.lora import client_lora_deltas, with_remainder, write_lora_expert
from fedalign.strategies.records import rounded

Tensor = torch.Tensor
PersonalVectors = dict[int, list[tuple[MoELayerLayout, int, Tensor]]]
"""Per client id, its personalised ``(layer, expert, (P_e,) vector)`` entries."""


@dataclass(frozen=True)
class ExpertSettings:
    """The options step D reads (resolved method options of :class:`FedAlignMoE`)."""

    beta: float
    eps: float
    selection: str
    semantic_centre: str
    personalized_experts: bool
    lora_aggregation: str
    threshold_std: str
    consensus_tolerance: float
    personalize_include_self: bool
    merge_strength: float = 1.0


def blend_with_shares(weights: Tensor, shares: Tensor, strength: float) -> Tensor:
    """``strength * weights + (1 - strength) * shares`` (``weights`` unchanged at 1): a merge
    whose total variation from the data shares is at most ``strength``."""
    if strength >= 1.0:
        return weights
    return strength * weights + (1.0 - strength) * shares


class ExpertUpdates(Protocol):
    """The clients' updates of one expert, as step D needs them."""

    def similarity(self) -> Tensor:
        """Cosines ``D_ij(e)`` of the clients' updates, ``(C, C)``."""
        ...

    def merged(self, weights: Tensor) -> Tensor:
        """``theta(e) + sum_i w_i (theta_i(e) - theta(e))``, ``(P_e,)``."""
        ...

    def personal(self, region_weights: Tensor) -> Tensor:
        """``theta(e) + region_weights @ updates``, ``(C, P_e)``."""
        ...


class ExactUpdates:
    """Every client's update of the expert stacked, ``(C, P_e)`` (inactive rows included)."""

    def __init__(
        self,
        layer: MoELayerLayout,
        expert: int,
        results: Sequence[ClientResult],
        active: Tensor,
        previous: Tensor,
    ) -> None:
        self.previous = previous
        self.updates = client_expert_matrix(results, layer, expert).sub_(previous)  # (C, P_e)

    def similarity(self) -> Tensor:
        return cosine_gram(self.updates)

    def merged(self, weights: Tensor) -> Tensor:
        return self.previous + weights @ self.updates

    def personal(self, region_weights: Tensor) -> Tensor:
        return self.previous + region_weights @ self.updates


class SketchedUpdates:
    """Signed bucket sketches ``(C, k)`` of the active clients' updates; the clients' tensors
    are read again (not stacked) to merge."""

    def __init__(
        self,
        layer: MoELayerLayout,
        expert: int,
        results: Sequence[ClientResult],
        active: Tensor,
        previous: Tensor,
        signs: Tensor,
        buckets: int,
    ) -> None:
        self.layer, self.expert, self.results, self.previous = layer, expert, results, previous
        size = previous.numel()
        # (theta_i - theta) * s in one fused pass per slice, then bucket sums
        negative_signed_previous = previous * signs
        negative_signed_previous.neg_()  # (P_e,)
        self.buffer = torch.empty(size)  # (P_e,)
        self.sketches = torch.zeros(len(results), buckets)  # (C, k); inactive rows 0
        for row, (result, is_active) in enumerate(zip(results, active.tolist(), strict=True)):
            if not is_active:
                continue
            for start, part in expert_parts(layer, result.parameters, expert):
                stop = start + part.numel()
                torch.addcmul(
                    negative_signed_previous[start:stop],
                    part,
                    signs[start:stop],
                    out=self.buffer[start:stop],
                )
            self.sketches[row] = fold_sketch(self.buffer, buckets)

    def similarity(self) -> Tensor:
        return cosine_gram(self.sketches)

    def merged(self, weights: Tensor) -> Tensor:
        merged = torch.zeros(self.previous.numel())  # (P_e,)
        for result, weight in zip(self.results, weights.tolist(), strict=True):
            if weight == 0.0:
                continue
            for start, part in expert_parts(self.layer, result.parameters, self.expert):
                merged[start : start + part.numel()].add_(part, alpha=weight)
        remainder = 1.0 - float(weights.double().sum())
        if remainder != 0.0:
            merged.add_(self.previous, alpha=remainder)
        return merged

    def personal(self, region_weights: Tensor) -> Tensor:
        size = self.previous.numel()
        personal = self.previous.expand(len(self.results), size).clone()  # (C, P_e)
        for row, result in enumerate(self.results):
            if region_weights[:, row].any():
                read_update_into(
                    self.layer, result.parameters, self.expert, self.previous, self.buffer
                )
                personal.addr_(region_weights[:, row], self.buffer)
        return personal


UpdatesFactory = Callable[
    [MoELayerLayout, int, Sequence[ClientResult], Tensor, Tensor], ExpertUpdates
]


def sketched_factory(sketch_dim: int) -> UpdatesFactory:
    """A factory of :class:`SketchedUpdates` sharing one sign vector per expert size."""
    signs_by_size: dict[int, Tensor] = {}
    buckets = sketch_buckets(sketch_dim)  # a prime <= sketch_dim

    def make(
        layer: MoELayerLayout,
        expert: int,
        results: Sequence[ClientResult],
        active: Tensor,
        previous: Tensor,
    ) -> ExpertUpdates:
        size = previous.numel()
        if size not in signs_by_size:
            signs_by_size[size] = sketch_signs(size)
        return SketchedUpdates(
            layer, expert, results, active, previous, signs_by_size[size], buckets
        )

    return make


def aggregate_layer_experts(
    layer: MoELayerLayout,
    global_parameters: Mapping[str, Tensor],
    results: Sequence[ClientResult],
    statistics: Sequence[LayerRoutingStatistics],
    parameters: dict[str, Tensor],
    records: list[dict[str, Any]],
    personal_vectors: PersonalVectors,
    settings: ExpertSettings,
    make_updates: UpdatesFactory,
) -> None:
    """Step D for ``layer``: write every expert into ``parameters``, fill ``records`` (one
    per expert) and, with personalised experts, append to ``personal_vectors``."""
    client_ids = [r.client_id for r in results]
    counts = example_counts(results)  # (C,)
    shares = example_weights(results)  # (C,)
    usage = torch.stack([s.usage.float() for s in statistics])  # (C, E)
    token_count = torch.stack([s.token_count.float() for s in statistics])  # (C, E)
    mean_hidden = torch.stack([s.mean_hidden.float() for s in statistics])  # (C, E, H)
    hidden_similarity = hidden_similarities(mean_hidden, token_count, settings.semantic_centre)
    for expert in range(layer.num_experts):
        record = records[expert]
        if layer.has_lora_expert(expert):
            signals = (hidden_similarity[expert], counts, usage[:, expert], token_count[:, expert])
            aggregate_lora_expert(
                layer, expert, global_parameters, results, signals, parameters, record, settings
            )
            continue
        opening = expert_start(
            layer, expert, global_parameters, parameters, client_ids, token_count, record
        )
        if opening is None:
            continue
        active, previous = opening  # (C,), (P_e,)
        updates = make_updates(layer, expert, results, active, previous)
        decision = semantic_alignment(
            hidden_similarity[expert],
            updates.similarity(),
            active,
            beta=settings.beta,
            threshold_std=settings.threshold_std,
            tolerance=settings.consensus_tolerance,
        )
        weights, membership = selection_weights(
            decision, active, counts, usage[:, expert], settings.selection, settings.eps
        )  # (C,), zero outside the aligned set (hard) or the active clients (soft)
        weights = blend_with_shares(weights, shares, settings.merge_strength)
        write_expert_vector_in_place(layer, parameters, expert, updates.merged(weights))
        fill_expert_record(
            record, client_ids, decision, active, weights, membership, settings.selection
        )
        if settings.personalized_experts:
            region = personal_region_weights(
                decision, active, settings.personalize_include_self, settings.consensus_tolerance
            )  # (C, C)
            personal = updates.personal(region)  # (C, P_e)
            has_region = region.sum(dim=1) > 0  # (C,)
            for index, cid in enumerate(client_ids):
                if has_region[index]:
                    personal_vectors[cid].append((layer, expert, personal[index]))


def aggregate_lora_expert(
    layer: MoELayerLayout,
    expert: int,
    global_parameters: Mapping[str, Tensor],
    results: Sequence[ClientResult],
    signals: tuple[Tensor, Tensor, Tensor, Tensor],
    parameters: dict[str, Tensor],
    record: dict[str, Any],
    settings: ExpertSettings,
) -> None:
    """Step D for one LoRA expert, on its weight updates ``delta_e = s B_e A_e``.

    The direction consensus uses the cosines of ``delta_e(client i) - delta_e(global)``
    (flattened over the expert's LoRA blocks), never the raw factors; the merge target
    ``delta_e(global) + sum_i w_i (delta_e(i) - delta_e(global))`` is written per
    ``lora_aggregation`` (factor means with the same weights, or the re-factorised product
    mean); the record gains ``"lora_update_size"`` and ``"lora_product_error"``.

    ``signals``: ``(S (C, C), n (C,), u(e) (C,), count(e) (C,))``, the hidden-state
    similarities, example counts, usage and token counts of this expert.
    """
    hidden_similarity, counts, usage, token_count = signals
    client_ids = [r.client_id for r in results]
    active = token_count > 0  # (C,)
    record["active"] = [cid for cid, a in zip(client_ids, active.tolist(), strict=True) if a]
    if not active.any():
        record["fallback"] = "no-active-client"
        write_lora_expert(layer, parameters, expert, [global_parameters], torch.ones(1), "factors")
        return
    previous = layer.lora_delta_vector(global_parameters, expert)  # (P_e,)
    updates = client_lora_deltas(results, layer, expert).sub_(previous)  # (C, P_e)
    decision = semantic_alignment(
        hidden_similarity,
        cosine_gram(updates),
        active,
        beta=settings.beta,
        threshold_std=settings.threshold_std,
        tolerance=settings.consensus_tolerance,
    )
    weights, membership = selection_weights(
        decision, active, counts, usage, settings.selection, settings.eps
    )  # (C,)
    weights = blend_with_shares(weights, example_weights(results), settings.merge_strength)
    states, merge = with_remainder(results, weights, global_parameters)
    error = write_lora_expert(layer, parameters, expert, states, merge, settings.lora_aggregation)
    fill_expert_record(
        record, client_ids, decision, active, weights, membership, settings.selection
    )
    record["lora_update_size"] = int(updates.shape[1])
    record["lora_product_error"] = rounded(error)


def expert_start(
    layer: MoELayerLayout,
    expert: int,
    global_parameters: Mapping[str, Tensor],
    parameters: dict[str, Tensor],
    client_ids: Sequence[int],
    token_count: Tensor,
    record: dict[str, Any],
) -> tuple[Tensor, Tensor] | None:
    """Step D's start for one expert: its active clients ``(C,)`` and previous value
    ``(P_e,)``; ``None`` (with the record's fallback written) when there is nothing to merge:
    no trainable parameters, or no active client (the previous value is kept)."""
    active = token_count[:, expert] > 0  # (C,)
    record["active"] = [cid for cid, a in zip(client_ids, active.tolist(), strict=True) if a]
    if not layer.experts[expert]:
        record["fallback"] = "no-trainable-parameters"
        return None
    previous = layer.expert_vector(global_parameters, expert).float()  # (P_e,)
    if not active.any():
        record["fallback"] = "no-active-client"
        write_expert_vector_in_place(layer, parameters, expert, previous)
        return None
    return active, previous


def read_update_into(
    layer: MoELayerLayout,
    state: Mapping[str, Tensor],
    expert: int,
    previous: Tensor,
    out: Tensor,
) -> Tensor:
    """``expert_vector(state, expert) - previous`` written into ``out`` (float32, ``(P_e,)``),
    slice by slice (no concatenation, no new ``(P_e,)`` tensor per client)."""
    offset = 0
    for expert_slice in layer.experts[expert]:
        part = expert_slice.read(state).reshape(-1)
        out[offset : offset + part.numel()].copy_(part)
        offset += part.numel()
    return out.sub_(previous)


def expert_parts(
    layer: MoELayerLayout, state: Mapping[str, Tensor], expert: int
) -> list[tuple[int, Tensor]]:
    """``(offset, flat view)`` of each slice of ``expert`` in ``state``: no copy, any dtype.

    Offsets are positions in :meth:`MoELayerLayout.expert_vector`'s order.
    """
    parts = []
    offset = 0
    for expert_slice in layer.experts[expert]:
        part = expert_slice.read(state).reshape(-1)
        parts.append((offset, part))
        offset += part.numel()
    return parts


def personal_parameters(
    layout: MoELayout,
    parameters: Mapping[str, Tensor],
    global_parameters: Mapping[str, Tensor],
    personal_vectors: PersonalVectors,
) -> dict[int, dict[str, Tensor]]:
    """Per client with personal experts, its expert tensors: the new global ones with its
    personal ``(layer, expert, vector)`` entries written in, cast like the global ones."""
    expert_names = sorted(layout.expert_param_names())
    client_parameters: dict[int, dict[str, Tensor]] = {}
    for cid, vectors in personal_vectors.items():
        if not vectors:
            continue
        own = {name: parameters[name].clone() for name in expert_names}
        for layer, expert, vector in vectors:
            write_expert_vector_in_place(layer, own, expert, vector)
        client_parameters[cid] = cast_like_reference(own, global_parameters)
    return client_parameters
