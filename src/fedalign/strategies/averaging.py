"""Averaging math shared by the strategies: example weights, weighted sums, expert vectors.

All arithmetic is float32 (whatever the tensors' storage dtype); results are cast back to
the dtype of the matching global tensor at the end (see :func:`cast_like_reference`).
Shapes: ``C`` clients, ``E`` experts, ``P_e`` values in one expert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedalign.moe.layout import MoELayerLayout, MoELayout
from fedalign.protocol import ClientResult, LayerRoutingStatistics

Tensor = torch.Tensor


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


def average_outside_experts(
    layout: MoELayout,
    global_parameters: Mapping[str, Tensor],
    results: Sequence[ClientResult],
    weights: Tensor,
) -> dict[str, Tensor]:
    """FedAvg of the non-expert tensors; expert tensors start as copies of the global ones
    (for step D paths that write every expert themselves)."""
    expert_names = layout.expert_param_names()
    rest = {n: t for n, t in global_parameters.items() if n not in expert_names}
    parameters = weighted_average(rest, results, weights)
    for name in global_parameters:
        if name in expert_names:
            parameters[name] = global_parameters[name].clone()
    return {name: parameters[name] for name in global_parameters}
