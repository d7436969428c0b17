"""FedAvg (McMahan et al., 2017): every trainable tensor averaged with weights ``n_i``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedalign.protocol import ClientResult
from fedalign.strategies.averaging import example_weights, trainable_layout, weighted_average
from fedalign.strategies.base import AggregationResult, Strategy, StrategyState
from fedalign.strategies.lora import aggregate_lora_modules
from fedalign.strategies.records import base_record, routing_metrics
from fedalign.strategies.screening import check_results

Tensor = torch.Tensor


@dataclass
class FedAvgOptions:
    """FedAvg has no options."""


class FedAvg(Strategy):
    """Federated averaging: ``w = sum_i n_i w_i / sum_i n_i`` for every tensor.

    Parameters
    ----------
    layout : MoELayout
        Where routers and experts live (unused by the aggregation itself; kept for the
        common interface).

    Notes
    -----
    Routing statistics are not needed. When clients send them anyway, the record carries
    the round's ``routing_divergence`` (against the clients' mean routing) and
    ``semantic_dispersion``; otherwise those entries are empty. Clients with
    ``num_examples == 0`` everywhere give uniform weights.
    """

    name = "fedavg"
    options_type: type | None = FedAvgOptions

    def aggregate(
        self,
        server_round: int,
        global_parameters: Mapping[str, Tensor],
        results: Sequence[ClientResult],
        state: StrategyState,
    ) -> AggregationResult:
        """Weighted mean of the clients' tensors; the state passes through unchanged.

        Record: ``{"strategy", "round", "clients", "num_examples", "example_weights",
        "routing_divergence", "semantic_dispersion"}``, plus ``"lora"`` (see
        :func:`~fedalign.strategies.lora.aggregate_lora_modules`) with LoRA pairs: their
        factor means (``"factors"``) or exact product means re-factorised
        (``"product-svd"``).
        """
        check_results(global_parameters, results)
        weights = example_weights(results)  # (C,)
        parameters = weighted_average(global_parameters, results, weights)
        record = base_record(self.name, server_round, results, weights)
        record.update(routing_metrics(results, None))
        lora = aggregate_lora_modules(
            parameters,
            results,
            weights,
            trainable_layout(self.layout, global_parameters),
            self.lora_aggregation,
        )
        if lora is not None:
            record["lora"] = lora
        return AggregationResult(parameters=parameters, state=dict(state), record=record)
