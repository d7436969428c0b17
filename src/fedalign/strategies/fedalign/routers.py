"""FedAlign-MoE steps A-C for one MoE layer: consistency weights, the global routing
distribution and the router rows.

A. ``omega_i(e)`` from each client's routing signal against the previous global reference
   (:func:`~fedalign.strategies.fedalign.weights.consistency_weights`);
B. ``p_g^t(e) = sum_i omega_i(e) pbar_i(e)``;
C. router row ``e`` = ``sum_i omega_i(e) W_i[e]`` (with ``merge_strength`` ``rho < 1``: the
   weights ``rho omega_i(e) + (1 - rho) n_i / n``).

Shapes: ``C`` clients in the round, ``E`` experts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedalign.moe.layout import MoELayerLayout
from fedalign.protocol import ClientResult, LayerRoutingStatistics
from fedalign.strategies.averaging import example_weights, router_rows_average
from fedalign.strategies.fedalign.options import CONSISTENCY_SCORES, FedAlignOptions
from fedalign.strategies.fedalign.weights import (
    consistency_signal,
    consistency_weights,
    global_routing_distribution,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class RoutingSettings:
    """The options steps A-B read (resolved method options of :class:`FedAlignMoE`)."""

    ablation: str
    eps: float
    overlap: str
    routing_signal: str
    count_weighted: bool
    merge_strength: float = 1.0


def routing_settings(options: FedAlignOptions, method: Mapping[str, Any]) -> RoutingSettings:
    """Steps A-B's settings from the strategy's options and resolved method options."""
    return RoutingSettings(
        ablation=options.ablation,
        eps=float(options.eps),
        overlap=method["overlap"],
        routing_signal=method["routing_signal"],
        count_weighted=method["count_weighted"],
        merge_strength=float(options.merge_strength),
    )


@dataclass
class LayerRouting:
    """Steps A-B's outcome for one layer.

    Attributes
    ----------
    omega : Tensor, shape (C, E)
        Consistency weights (columns sum to one).
    global_routing : Tensor, shape (E,)
        ``p_g^t``.
    global_usage : Tensor or None, shape (E,)
        The ``omega``-weighted usage share (``routing_signal = "usage"`` only): next round's
        consistency reference.
    reference_source : str
        ``"previous-global"`` or ``"client-mean"`` (round 1, or a new layer).
    """

    omega: Tensor
    global_routing: Tensor
    global_usage: Tensor | None
    reference_source: str


def align_layer_routing(
    layer: MoELayerLayout,
    results: Sequence[ClientResult],
    statistics: Sequence[LayerRoutingStatistics],
    previous_reference: Mapping[str, Tensor],
    settings: RoutingSettings,
    parameters: dict[str, Tensor],
) -> LayerRouting:
    """Steps A-C for ``layer``: returns ``omega`` and ``p_g^t``; writes the layer's router
    tensors into ``parameters``.

    ``previous_reference`` holds last round's reference per layer in the signal's own space
    (``p_g^{t-1}`` for the softmax signal, the global usage share for ``"usage"``); without
    one, the plain mean of the clients' signals is the reference.
    """
    routing_distribution = torch.stack([s.routing_distribution.float() for s in statistics])
    margin = torch.stack([s.margin.float() for s in statistics])  # (C, E)
    usage = torch.stack([s.usage.float() for s in statistics])  # (C, E)
    token_count = torch.stack([s.token_count.float() for s in statistics])  # (C, E)
    signal = consistency_signal(
        routing_distribution, usage, layer.top_k, settings.routing_signal
    )  # (C, E)
    if layer.name in previous_reference:
        reference = previous_reference[layer.name].float()
        reference_source = "previous-global"
    else:
        reference = signal.mean(dim=0)
        reference_source = "client-mean"
    omega = consistency_weights(
        signal,
        margin,
        reference,
        CONSISTENCY_SCORES[settings.ablation],
        settings.eps,
        settings.overlap,
        token_count if settings.count_weighted else None,
    )  # (C, E)
    global_routing = global_routing_distribution(routing_distribution, omega)  # (E,)
    global_usage = None
    if settings.routing_signal == "usage":
        global_usage = global_routing_distribution(signal, omega)  # (E,)
    row_weights = omega
    if settings.merge_strength < 1.0:
        shares = example_weights(results)[:, None]  # (C, 1)
        row_weights = settings.merge_strength * omega + (1.0 - settings.merge_strength) * shares
    for name in layer.router_params:
        parameters[name] = router_rows_average(results, name, row_weights, layer.num_experts)
    return LayerRouting(omega, global_routing, global_usage, reference_source)
