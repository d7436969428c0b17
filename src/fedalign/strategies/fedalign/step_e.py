"""FedAlign-MoE step E and the round record's head: FedAvg of every tensor step D will not
rewrite (LoRA pairs included), before steps A-D run on their parts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult
from fedalign.strategies.averaging import (
    average_outside_experts,
    example_weights,
    trainable_layout,
    weighted_average,
)
from fedalign.strategies.fedalign.options import (
    METHOD_OPTION_DEFAULTS,
    RECORDED_OPTIONS,
    FedAlignOptions,
)
from fedalign.strategies.lora import aggregate_lora_modules
from fedalign.strategies.records import base_record
from fedalign.strategies.screening import check_results

Tensor = torch.Tensor


def start_round(
    name: str,
    options: FedAlignOptions,
    method: Mapping[str, Any],
    semantic_aggregation: bool,
    lora_aggregation: str,
    layout: MoELayout,
    server_round: int,
    global_parameters: Mapping[str, Tensor],
    results: Sequence[ClientResult],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The screened results' FedAvg (every tensor, or all but the experts when step D will
    rewrite each of them from sketches) and the record's head: round, clients, weights,
    ablation, ``routing_lambda``, the method options that differ from the defaults,
    ``sketch_dim``, ``merge_strength`` < 1, ``client_proximal_mu`` > 0 (as the clients use it)
    and the LoRA record."""
    check_results(global_parameters, results)
    layout = trainable_layout(layout, global_parameters)
    weights = example_weights(results)  # (C,)
    if options.sketch_dim > 0 and semantic_aggregation:
        # step D rewrites every expert: FedAvg only the rest (one pass less over experts)
        parameters = average_outside_experts(layout, global_parameters, results, weights)
    else:
        parameters = weighted_average(global_parameters, results, weights)
    record = base_record(name, server_round, results, weights)
    record["ablation"] = options.ablation
    record["routing_lambda"] = float(options.routing_lambda)
    if any(method[key] != METHOD_OPTION_DEFAULTS[key] for key in RECORDED_OPTIONS):
        record["method_options"] = dict(method)
    if options.sketch_dim > 0:
        record["sketch_dim"] = int(options.sketch_dim)
    if options.merge_strength < 1.0:
        record["merge_strength"] = float(options.merge_strength)
    if options.client_proximal_mu > 0:
        record["client_proximal_mu"] = float(options.client_proximal_mu)
    lora = aggregate_lora_modules(
        parameters, results, weights, layout, lora_aggregation, skip_experts=semantic_aggregation
    )
    if lora is not None:
        record["lora"] = lora
    return parameters, record
