"""Aggregation of LoRA pairs and LoRA experts: factor means (FedIT) or exact products + SVD.

Two ways to turn the clients' factors ``(B_i, A_i)`` of one LoRA block into global ones,
with client weights ``w_i`` (``model.lora-aggregation``):

* ``"factors"`` (FedIT, Zhang et al. 2024): ``B = sum_i w_i B_i``, ``A = sum_i w_i A_i``,
  what a plain weighted average of every tensor does. Its product ``B A`` is not the mean
  update ``sum_i w_i B_i A_i`` (:func:`fedalign.moe.lora.factor_mean`);
* ``"product-svd"``: the exact weighted mean of the products
  (:func:`fedalign.moe.lora.product_mean`), re-factorised to rank ``r`` by truncated SVD
  (:func:`fedalign.moe.lora.refactorise`): exact when the mean has rank ``<= r``, the best
  rank-``r`` approximation (Eckart-Young) otherwise.

Either way the relative Frobenius error of the written product against the exact product
mean is measured and recorded (``"lora"`` in the decision record; per expert
``"lora_product_error"``).

For LoRA experts, FedAlign-MoE and FedMoE compare and merge expert ``e``'s weight update
``delta_e = s B_e A_e`` (:func:`client_lora_deltas`), never the raw factors, which are
not comparable across clients (``B A = (B R)(R^{-1} A)`` for any invertible ``R``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedalign.config import LORA_AGGREGATIONS
from fedalign.errors import check_choice
from fedalign.moe.layout import MoELayerLayout, MoELayout
from fedalign.moe.lora import (
    LoRAFactors,
    factor_mean,
    product_mean,
    refactorise,
    relative_error,
)
from fedalign.protocol import ClientResult
from fedalign.strategies.records import RECORD_DIGITS

Tensor = torch.Tensor

__all__ = [
    "LORA_AGGREGATIONS",
    "aggregate_lora_modules",
    "check_lora_aggregation",
    "client_lora_deltas",
    "merge_lora_block",
    "with_remainder",
    "write_lora_expert",
]


def check_lora_aggregation(value: str) -> str:
    """``value`` if it is one of :data:`LORA_AGGREGATIONS`, else ``OptionError``."""
    check_choice("lora_aggregation", value, LORA_AGGREGATIONS)
    return value


def merge_lora_block(
    factors: LoRAFactors,
    index: int,
    states: Sequence[Mapping[str, Tensor]],
    weights: Tensor,
    mode: str,
) -> tuple[Tensor, Tensor, float]:
    """The global factors of one LoRA block and the relative error of their product.

    Parameters
    ----------
    factors : LoRAFactors
    index : int
        The block (expert) of ``factors``.
    states : sequence of mapping
        One parameter dictionary per contributor.
    weights : Tensor, shape (len(states),)
        Contributor weights (summing to 1 for a mean).
    mode : {"factors", "product-svd"}

    Returns
    -------
    b : Tensor, shape (out, r)
    a : Tensor, shape (r, in)
    error : float
        ``||sum_i w_i B_i A_i - B A||_F / ||sum_i w_i B_i A_i||_F``.
    """
    bs = [factors.b(s, index) for s in states]
    as_ = [factors.a(s, index) for s in states]
    exact = product_mean(bs, as_, weights)  # (out, in)
    if mode == "product-svd":
        b, a = refactorise(exact, factors.rank)
    else:
        b, a = factor_mean(bs, as_, weights)
    return b, a, relative_error(exact, b @ a)


def with_remainder(
    results: Sequence[ClientResult], weights: Tensor, global_parameters: Mapping[str, Tensor]
) -> tuple[list[Mapping[str, Tensor]], Tensor]:
    """The states and weights of ``previous + sum_i w_i (client_i - previous)``.

    When ``sum_i w_i != 1`` the global parameters join as one more contributor with weight
    ``1 - sum_i w_i``; clients with weight 0 are left out.
    """
    states: list[Mapping[str, Tensor]] = []
    kept: list[float] = []
    for result, weight in zip(results, weights.tolist(), strict=True):
        if weight != 0.0:
            states.append(result.parameters)
            kept.append(weight)
    remainder = 1.0 - float(weights.double().sum())
    if remainder != 0.0 or not states:
        states.append(global_parameters)
        kept.append(remainder if states[:-1] else 1.0)
    return states, torch.tensor(kept, dtype=torch.float32)


def _expert_blocks(layout: MoELayout) -> set[tuple[str, int]]:
    return {
        (s.factors.lora_a, s.index)
        for layer in layout.layers
        for slices in layer.lora_experts
        for s in slices
    }


def aggregate_lora_modules(
    parameters: dict[str, Tensor],
    results: Sequence[ClientResult],
    weights: Tensor,
    layout: MoELayout,
    mode: str,
    *,
    skip_experts: bool = False,
) -> dict[str, Any] | None:
    """Every LoRA block of ``layout.lora_modules`` aggregated per ``mode`` with ``weights``.

    ``parameters`` must hold the ``weights``-weighted average of every tensor (what
    :func:`~fedalign.strategies.averaging.weighted_average` gives), owned by the caller: with
    ``"factors"`` it already is the FedIT aggregate and is left as is; with
    ``"product-svd"`` each block's factors are overwritten in place.

    Parameters
    ----------
    parameters : dict of str to Tensor
    results : sequence of ClientResult
    weights : Tensor, shape (C,)
    layout : MoELayout
    mode : {"factors", "product-svd"}
    skip_experts : bool, default False
        Leave the routed experts' blocks alone (a strategy that merges them itself).

    Returns
    -------
    dict or None
        ``{"aggregation": mode, "blocks": n, "product_error_mean": float,
        "product_error_max": float}`` (relative errors of the written products against the
        exact product means); None when ``layout`` has no LoRA pair.
    """
    if not layout.lora_modules:
        return None
    skip = _expert_blocks(layout) if skip_experts else set()
    states = [r.parameters for r in results]
    errors = []
    for factors in layout.lora_modules:
        for index in range(factors.num_experts):
            if (factors.lora_a, index) in skip:
                continue
            b, a, error = merge_lora_block(factors, index, states, weights, mode)
            if mode == "product-svd":
                factors.write(parameters, index, b, a)
            errors.append(error)
    return lora_record(mode, errors)


def lora_record(mode: str, errors: Sequence[float]) -> dict[str, Any]:
    """The ``"lora"`` entry of a decision record."""
    return {
        "aggregation": mode,
        "blocks": len(errors),
        "product_error_mean": round(sum(errors) / len(errors), RECORD_DIGITS) if errors else 0.0,
        "product_error_max": round(max(errors), RECORD_DIGITS) if errors else 0.0,
    }


def client_lora_deltas(
    results: Sequence[ClientResult], layer: MoELayerLayout, expert: int
) -> Tensor:
    """Expert ``expert``'s update ``s B_e A_e`` of every client, flattened: ``(C, P_e)``.

    Row ``i`` is ``layer.lora_delta_vector(results[i].parameters, expert)`` (every LoRA
    block of the expert, concatenated), ``P_e = sum out * in``.
    """
    return torch.stack([layer.lora_delta_vector(r.parameters, expert) for r in results])


def write_lora_expert(
    layer: MoELayerLayout,
    parameters: dict[str, Tensor],
    expert: int,
    states: Sequence[Mapping[str, Tensor]],
    weights: Tensor,
    mode: str,
) -> float:
    """Expert ``expert``'s LoRA blocks in ``parameters`` set to the ``weights``-merge of
    ``states`` (in place); returns the largest relative product error of its blocks.

    The merge's target update is ``sum_i w_i s B_i A_i`` per block; ``"factors"`` writes the
    weighted factor means, ``"product-svd"`` the rank-``r`` SVD of the target.
    """
    worst = 0.0
    for block in layer.lora_experts[expert]:
        b, a, error = merge_lora_block(block.factors, block.index, states, weights, mode)
        block.factors.write(parameters, block.index, b, a)
        worst = max(worst, error)
    return worst
