"""Helpers shared by the strategies: weighted averaging, deltas, stacking, records.

All arithmetic is float32 (whatever the tensors' storage dtype); results are cast back to
the dtype of the matching global tensor at the end (see :func:`cast_like_reference`).
Shapes: ``C`` clients, ``E`` experts, ``P_e`` values in one expert.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedalign.moe.layout import MoELayerLayout, MoELayout
from fedalign.protocol import ClientResult, LayerRoutingStatistics
from fedalign.routing import routing_divergence, semantic_dispersion

Tensor = torch.Tensor

RECORD_DIGITS = 6
"""Decimal places kept for floats in decision records."""


# ----------------------------------------------------------------------------- checks
DISTRIBUTION_TOLERANCE = 1e-3
"""How far a client's ``routing_distribution`` may sum from 1, and ``usage`` stray
outside ``[0, 1]`` (float32 means over thousands of tokens are accurate to ~1e-6)."""

TOKEN_COUNT_TOLERANCE = 1e-3
"""Relative tolerance of ``sum(token_count) == top_k * num_tokens`` (plus half a token)."""


def parameter_problem(
    global_parameters: Mapping[str, Tensor], result: ClientResult, *, check_dtype: bool = True
) -> str | None:
    """Why ``result``'s parameters cannot be aggregated, or None when they can.

    Checks, in order: missing keys, extra keys, shapes, dtypes (when ``check_dtype``),
    non-finite values, and a negative ``num_examples``.
    """
    missing = [name for name in global_parameters if name not in result.parameters]
    if missing:
        return f"missing parameter {missing[0]!r}" + (
            f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        )
    extra = [name for name in result.parameters if name not in global_parameters]
    if extra:
        return f"unexpected parameter {extra[0]!r}" + (
            f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        )
    for name, reference in global_parameters.items():
        tensor = result.parameters[name]
        if not isinstance(tensor, Tensor):
            return f"parameter {name!r} is a {type(tensor).__name__}, not a tensor"
        if tensor.shape != reference.shape:
            return (
                f"parameter {name!r} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(reference.shape)}"
            )
        if check_dtype and tensor.dtype != reference.dtype:
            return f"parameter {name!r} has dtype {tensor.dtype}, expected {reference.dtype}"
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"parameter {name!r} has non-finite values"
    if int(result.num_examples) < 0:
        return f"num_examples is negative ({result.num_examples})"
    return None


def statistics_problem(
    result: ClientResult,
    layout: MoELayout,
    *,
    required: bool = False,
    allow_empty_hidden: bool = False,
) -> str | None:
    """Why ``result``'s routing statistics are not valid, or None when they are.

    Every reported layer must be a layer of ``layout``; with ``required`` every layer of
    ``layout`` must be reported. Per layer: shapes ``(E,)`` and ``(E, H)`` with ``H`` the
    layer's ``hidden_size`` (or ``(E, 0)`` with ``allow_empty_hidden``: the server measures
    the semantics itself, ``strategy.semantic-privacy = public-probe``), finite values,
    ``routing_distribution`` non-negative and summing to 1 (within
    :data:`DISTRIBUTION_TOLERANCE`; all zero when no token was seen), ``usage`` in
    ``[0, 1]``, ``token_count`` non-negative and summing to ``top_k * num_tokens`` (within
    :data:`TOKEN_COUNT_TOLERANCE`).
    """
    layers = {layer.name: layer for layer in layout.layers}
    statistics = result.routing_statistics
    unknown = [name for name in statistics if name not in layers]
    if unknown:
        return f"routing statistics for unknown MoE layer {unknown[0]!r}"
    if required:
        absent = [name for name in layers if name not in statistics]
        if absent:
            return f"no routing statistics for MoE layer {absent[0]!r}"
    tol = DISTRIBUTION_TOLERANCE
    for name, stats in statistics.items():
        experts = layers[name].num_experts
        where = f"routing statistics of layer {name!r}"
        vectors = {
            "routing_distribution": stats.routing_distribution,
            "usage": stats.usage,
            "margin": stats.margin,
            "token_count": stats.token_count,
        }
        for field_name, vector in vectors.items():
            if not isinstance(vector, Tensor) or tuple(vector.shape) != (experts,):
                shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector)
                return f"{where}: {field_name} has shape {shape}, expected ({experts},)"
            if not bool(torch.isfinite(vector).all()):
                return f"{where}: {field_name} has non-finite values"
        hidden = stats.mean_hidden
        width = layers[name].hidden_size
        widths = (width, 0) if allow_empty_hidden else (width,)
        if (
            not isinstance(hidden, Tensor)
            or hidden.dim() != 2
            or hidden.shape[0] != experts
            or hidden.shape[1] not in widths
        ):
            shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden)
            shapes = " or ".join(f"({experts}, {w})" for w in widths)
            return f"{where}: mean_hidden has shape {shape}, expected {shapes}"
        if not bool(torch.isfinite(hidden).all()):
            return f"{where}: mean_hidden has non-finite values"
        num_tokens = int(stats.num_tokens)
        if num_tokens < 0:
            return f"{where}: num_tokens is negative ({num_tokens})"
        distribution = stats.routing_distribution.double()
        if bool((distribution < 0).any()):
            return f"{where}: routing_distribution has negative values"
        total = float(distribution.sum())
        if num_tokens > 0 and abs(total - 1.0) > tol:
            return f"{where}: routing_distribution sums to {total:.6g}, not 1"
        usage = stats.usage.double()
        if bool((usage < -tol).any() | (usage > 1 + tol).any()):
            return f"{where}: usage outside [0, 1] (min {float(usage.min()):.6g}, max " + (
                f"{float(usage.max()):.6g})"
            )
        counts = stats.token_count.double()
        if bool((counts < 0).any()):
            return f"{where}: token_count has negative values"
        expected = layers[name].top_k * num_tokens
        if abs(float(counts.sum()) - expected) > TOKEN_COUNT_TOLERANCE * expected + 0.5:
            return (
                f"{where}: token counts sum to {float(counts.sum()):.6g}, expected top_k * "
                f"num_tokens = {layers[name].top_k} * {num_tokens} = {expected}"
            )
    return None


def result_problem(
    global_parameters: Mapping[str, Tensor],
    result: ClientResult,
    layout: MoELayout,
    *,
    require_statistics: bool = False,
    allow_empty_hidden: bool = False,
) -> str | None:
    """:func:`parameter_problem`, then :func:`statistics_problem`; None for a valid result."""
    return parameter_problem(global_parameters, result) or statistics_problem(
        result, layout, required=require_statistics, allow_empty_hidden=allow_empty_hidden
    )


def check_results(global_parameters: Mapping[str, Tensor], results: Sequence[ClientResult]) -> None:
    """Raise ``ValueError`` unless every result carries every global tensor with its shape,
    no other tensor, and only finite values.

    Parameters
    ----------
    global_parameters : dict of str to Tensor
    results : sequence of ClientResult

    Notes
    -----
    The server screens results with :func:`result_problem` before a strategy sees them
    (rejecting a bad client instead of failing the round); this is the strategies' own
    guard against being called with results nobody checked.
    """
    if not results:
        raise ValueError("no client results to aggregate")
    seen: set[int] = set()
    for result in results:
        if result.client_id in seen:
            raise ValueError(f"client {result.client_id} appears twice in the results")
        seen.add(result.client_id)
        problem = parameter_problem(global_parameters, result, check_dtype=False)
        if problem is not None:
            raise ValueError(f"client {result.client_id}: {problem}")


def trainable_layout(layout: MoELayout, global_parameters: Mapping[str, Tensor]) -> MoELayout:
    """The layout restricted to the tensors that actually travel (the global keys)."""
    return layout.restrict(global_parameters.keys())


def layer_statistics(
    results: Sequence[ClientResult], layer_name: str
) -> list[LayerRoutingStatistics]:
    """Every client's statistics for one layer, in result order; ``ValueError`` if missing."""
    statistics = []
    for result in results:
        if layer_name not in result.routing_statistics:
            raise ValueError(
                f"client {result.client_id} sent no routing statistics for MoE layer "
                f"{layer_name!r}; this strategy needs them (collect_statistics=True)"
            )
        statistics.append(result.routing_statistics[layer_name])
    return statistics


# -------------------------------------------------------------------------- weighting
def normalise_weights(weights: Tensor, *fallbacks: Tensor) -> Tensor:
    """Scale non-negative weights ``(C,)`` to sum to 1.

    When they sum to 0, the first of ``fallbacks`` with a positive sum is normalised
    instead; uniform weights when none has.
    """
    for candidate in (weights, *fallbacks):
        candidate = candidate.float().clamp(min=0.0)
        total = candidate.sum()
        if total > 0:
            return candidate / total
    return torch.full_like(weights.float(), 1.0 / max(weights.numel(), 1))


def example_counts(results: Sequence[ClientResult]) -> Tensor:
    """``n_i`` of every client, shape ``(C,)``, float32."""
    return torch.tensor([float(r.num_examples) for r in results], dtype=torch.float32)


def example_weights(results: Sequence[ClientResult]) -> Tensor:
    """FedAvg weights ``n_i / sum_j n_j``, shape ``(C,)``; uniform if every ``n_i`` is 0."""
    return normalise_weights(example_counts(results))


def stack_client_tensors(results: Sequence[ClientResult], name: str) -> Tensor:
    """One tensor from every client, stacked in float32: shape ``(C, *tensor.shape)``."""
    return torch.stack([r.parameters[name].float() for r in results])


def weighted_sum(stacked: Tensor, weights: Tensor) -> Tensor:
    """Sum over clients of ``weights * stacked``.

    Parameters
    ----------
    stacked : Tensor, shape (C, *S)
    weights : Tensor, shape (C,) or (C, S_0, ..., S_j)
        A prefix of ``stacked``'s shape; broadcast over the remaining dimensions (e.g.
        ``(C, E)`` weights for ``(C, E, H)`` router weights: one weight per client and row).

    Returns
    -------
    Tensor, shape S, float32
    """
    weights = weights.float()
    expanded = weights.reshape(*weights.shape, *([1] * (stacked.dim() - weights.dim())))
    return (stacked.float() * expanded).sum(dim=0)


def cast_like(values: Tensor, reference: Tensor) -> Tensor:
    """``values`` (float32) in ``reference``'s dtype; integer tensors are rounded first."""
    if values.dtype == reference.dtype:
        return values
    if reference.dtype.is_floating_point or reference.dtype.is_complex:
        return values.to(reference.dtype)
    return values.round().to(reference.dtype)


def cast_like_reference(
    parameters: dict[str, Tensor], reference: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Every tensor of ``parameters`` in the dtype of the same-named ``reference`` tensor."""
    return {name: cast_like(tensor, reference[name]) for name, tensor in parameters.items()}


def weighted_tensor_average(
    results: Sequence[ClientResult], name: str, weights: Tensor, shape: torch.Size
) -> Tensor:
    """``sum_i weights[i] * client_i[name]`` in float32, accumulated client by client.

    Only one float32 copy of the tensor is alive at a time (no ``(C, ...)`` stack).

    Parameters
    ----------
    results : sequence of ClientResult
    name : str
    weights : Tensor, shape (C,)
    shape : torch.Size
        Shape of the tensor.

    Returns
    -------
    Tensor, shape ``shape``, float32
    """
    total = torch.zeros(shape, dtype=torch.float32)
    for weight, result in zip(weights.tolist(), results, strict=True):
        total.add_(result.parameters[name].float(), alpha=weight)
    return total


def weighted_average(
    global_parameters: Mapping[str, Tensor],
    results: Sequence[ClientResult],
    weights: Tensor,
) -> dict[str, Tensor]:
    """Every global tensor replaced by the ``weights``-weighted sum of the clients' tensors.

    Parameters
    ----------
    global_parameters : dict of str to Tensor
        Defines the keys and the output dtypes.
    results : sequence of ClientResult
    weights : Tensor, shape (C,)
        Already normalised client weights.

    Returns
    -------
    dict of str to Tensor
        New tensors (owned by the caller), in the global tensors' dtypes.
    """
    return {
        name: cast_like(weighted_tensor_average(results, name, weights, reference.shape), reference)
        for name, reference in global_parameters.items()
    }


def fedavg(
    global_parameters: Mapping[str, Tensor], results: Sequence[ClientResult]
) -> dict[str, Tensor]:
    """FedAvg (McMahan et al. 2017): every tensor averaged with weights ``n_i``."""
    return weighted_average(global_parameters, results, example_weights(results))


def parameter_deltas(
    parameters: Mapping[str, Tensor], reference: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``parameters - reference`` for every key of ``reference``, in float32."""
    return {name: parameters[name].float() - tensor.float() for name, tensor in reference.items()}


def client_expert_matrix(
    results: Sequence[ClientResult], layer: MoELayerLayout, expert: int
) -> Tensor:
    """Expert ``expert`` of every client flattened and stacked: shape ``(C, P_e)``, float32.

    Row ``i`` equals ``layer.expert_vector(results[i].parameters, expert)``; the slices are
    copied straight into one preallocated matrix.
    """
    slices = layer.experts[expert]
    if not results:
        return torch.zeros(0, 0)
    sizes = [s.numel(results[0].parameters) for s in slices]
    matrix = torch.empty(len(results), sum(sizes), dtype=torch.float32)
    for row, result in enumerate(results):
        offset = 0
        for expert_slice, size in zip(slices, sizes, strict=True):
            matrix[row, offset : offset + size] = expert_slice.read(result.parameters).reshape(-1)
            offset += size
    return matrix


def write_expert_vector_in_place(
    layer: MoELayerLayout, state: dict[str, Tensor], expert: int, vector: Tensor
) -> None:
    """Copy a ``(P_e,)`` vector into expert ``expert``'s slices of ``state``, in place.

    The in-place twin of :meth:`MoELayerLayout.write_expert_vector` (same slice order and
    meaning) for dictionaries whose tensors the caller owns, e.g. freshly aggregated
    parameters: it avoids cloning a fused ``(E, ...)`` tensor once per expert. Values are
    cast to each tensor's dtype.
    """
    slices = layer.experts[expert]
    sizes = [s.numel(state) for s in slices]
    if sum(sizes) != vector.numel():
        raise ValueError(
            f"expert vector has {vector.numel()} values, layer {layer.name!r} expert "
            f"{expert} has {sum(sizes)}"
        )
    offset = 0
    for expert_slice, size in zip(slices, sizes, strict=True):
        target = expert_slice.read(state)  # a view of the owned tensor
        target.copy_(vector[offset : offset + size].reshape(target.shape))
        offset += size


def router_rows_average(
    results: Sequence[ClientResult], name: str, row_weights: Tensor, num_experts: int
) -> Tensor:
    """Router tensor whose row ``e`` is ``sum_i row_weights[i, e] * client_i[name][e]``.

    Parameters
    ----------
    results : sequence of ClientResult
    name : str
        Router tensor, one row per expert along dimension 0 (weight ``(E, H)`` or bias ``(E,)``).
    row_weights : Tensor, shape (C, E)
    num_experts : int

    Returns
    -------
    Tensor, same shape as the router tensor, float32
    """
    stacked = stack_client_tensors(results, name)  # (C, E, ...)
    if stacked.dim() < 2 or stacked.shape[1] != num_experts:
        raise ValueError(
            f"router tensor {name!r} has shape {tuple(stacked.shape[1:])}; expected "
            f"{num_experts} rows along dimension 0"
        )
    return weighted_sum(stacked, row_weights)


# ---------------------------------------------------------------------------- records
def rounded(value: float, digits: int = RECORD_DIGITS) -> float:
    """``value`` as a plain float rounded for records."""
    return round(float(value), digits)


def rounded_list(values: Tensor, digits: int = RECORD_DIGITS) -> list[float]:
    """A 1-D tensor as a list of rounded floats."""
    return [round(float(v), digits) for v in values.reshape(-1).tolist()]


def per_client(client_ids: Sequence[int], values: Tensor) -> dict[str, float]:
    """``{str(client_id): rounded value}`` for a ``(C,)`` tensor (JSON keys are strings)."""
    return {str(cid): rounded(v) for cid, v in zip(client_ids, values.tolist(), strict=True)}


def routing_metrics(
    results: Sequence[ClientResult], global_routing: Mapping[str, Tensor] | None
) -> dict[str, Any]:
    """``routing_divergence`` and ``semantic_dispersion`` of the clients that sent statistics.

    Both are empty dictionaries when no client sent routing statistics.
    """
    statistics = [r.routing_statistics for r in results if r.routing_statistics]
    if not statistics:
        return {"routing_divergence": {}, "semantic_dispersion": {}}
    return {
        "routing_divergence": routing_divergence(statistics, global_routing),
        "semantic_dispersion": semantic_dispersion(statistics),
    }


def base_record(
    strategy_name: str, server_round: int, results: Sequence[ClientResult], weights: Tensor
) -> dict[str, Any]:
    """Fields every strategy's decision record starts with.

    ``{"strategy", "round", "clients": [ids], "num_examples": {id: n},
    "example_weights": {id: n_i / sum n}}``.
    """
    client_ids = [r.client_id for r in results]
    return {
        "strategy": strategy_name,
        "round": int(server_round),
        "clients": client_ids,
        "num_examples": {str(r.client_id): int(r.num_examples) for r in results},
        "example_weights": per_client(client_ids, weights),
    }


# --------------------------------------------------------------------------- clipping
def update_norm(global_parameters: Mapping[str, Tensor], parameters: Mapping[str, Tensor]) -> float:
    """L2 norm of ``parameters - global_parameters`` over every global tensor (float64)."""
    total = 0.0
    for name, reference in global_parameters.items():
        delta = parameters[name].double() - reference.double()
        total += float((delta * delta).sum())
    return total**0.5


def clip_update(
    global_parameters: Mapping[str, Tensor], result: ClientResult, max_norm: float
) -> tuple[ClientResult, float]:
    """``result`` with its update scaled down to L2 norm ``max_norm``, and the norm before.

    A result whose update norm is at most ``max_norm`` is returned as is (the same object);
    otherwise every tensor becomes ``global + (client - global) * max_norm / norm``,
    computed in float32 and cast to the global tensor's dtype.

    Parameters
    ----------
    global_parameters : dict of str to Tensor
    result : ClientResult
    max_norm : float
        > 0.
    """
    norm = update_norm(global_parameters, result.parameters)
    if norm <= max_norm:
        return result, norm
    scale = max_norm / norm
    parameters = dict(result.parameters)
    for name, reference in global_parameters.items():
        delta = result.parameters[name].float() - reference.float()
        parameters[name] = cast_like(reference.float() + delta * scale, reference)
    return dataclasses.replace(result, parameters=parameters), norm
