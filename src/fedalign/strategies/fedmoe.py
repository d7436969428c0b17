"""FedMoE-style activation-aware aggregation (after Mei et al., 2024).

Expert ``e`` of a layer is aggregated only from the clients that actually used it:
clients with usage ``u_i(e) >= u_min`` contribute, weighted by ``n_i * u_i(e)``. When no
client qualifies the expert keeps its previous global value. Routers and every other
tensor are FedAvg'd by ``n_i``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedalign.errors import check_option
from fedalign.moe.layout import MoELayerLayout, MoELayout
from fedalign.protocol import ClientResult
from fedalign.strategies.averaging import (
    cast_like_reference,
    client_expert_matrix,
    example_counts,
    example_weights,
    layer_statistics,
    normalise_weights,
    trainable_layout,
    weighted_average,
    write_expert_vector_in_place,
)
from fedalign.strategies.base import AggregationResult, Strategy, StrategyState
from fedalign.strategies.lora import aggregate_lora_modules, with_remainder, write_lora_expert
from fedalign.strategies.records import base_record, rounded, routing_metrics
from fedalign.strategies.screening import check_results

Tensor = torch.Tensor


@dataclass
class FedMoEOptions:
    """Options of :class:`FedMoE` (config keys ``strategy.<name>``).

    Parameters
    ----------
    fedmoe_u_min : float, default 0.01
        Minimum usage ``u_i(e)`` for client ``i`` to contribute to expert ``e``, in [0, 1].
    """

    fedmoe_u_min: float = 0.01

    def __post_init__(self) -> None:
        check_option("fedmoe_u_min", self.fedmoe_u_min, minimum=0.0, maximum=1.0)


class FedMoE(Strategy):
    """Activation-aware expert aggregation; FedAvg for routers and everything else.

    Parameters
    ----------
    layout : MoELayout
        Where routers and experts live.
    u_min : float, default 0.01
        Minimum usage ``u_i(e)`` (fraction of the client's tokens with ``e`` in their
        top-k) for client ``i`` to contribute to expert ``e``.

    Notes
    -----
    Weights over the qualifying clients are ``n_i * u_i(e)`` normalised; if they are all 0
    (possible only with ``u_min == 0``) the qualifying clients are weighted by ``n_i``.
    LoRA experts (``model.lora-experts``) get the same weights on their updates
    ``s B_e A_e``: factor means or the re-factorised product mean (``lora_aggregation``).
    """

    name = "fedmoe"
    options_type = FedMoEOptions

    @classmethod
    def from_options(cls, layout: MoELayout, options: Any) -> FedMoE:
        return cls(layout, options.fedmoe_u_min)

    needs_routing_statistics = True

    def __init__(self, layout: MoELayout, u_min: float = 0.01) -> None:
        super().__init__(layout)
        self.u_min = float(FedMoEOptions(u_min).fedmoe_u_min)

    def aggregate(
        self,
        server_round: int,
        global_parameters: Mapping[str, Tensor],
        results: Sequence[ClientResult],
        state: StrategyState,
    ) -> AggregationResult:
        """FedAvg, then every expert replaced by its activation-aware aggregate.

        Record: the FedAvg fields plus ``"u_min"`` and ``"layers": {layer: {"experts":
        [{"expert": e, "qualified": [ids], "weights": {id: w}, "fallback": str or None}]}}``
        with fallback ``"no-qualified-client"`` (previous global value kept) or
        ``"no-trainable-parameters"``.
        """
        check_results(global_parameters, results)
        layout = trainable_layout(self.layout, global_parameters)
        client_ids = [r.client_id for r in results]
        weights = example_weights(results)  # (C,)
        counts = example_counts(results)  # (C,)
        parameters = weighted_average(global_parameters, results, weights)
        # LoRA pairs outside the routed experts (attention, router); experts come below
        lora = aggregate_lora_modules(
            parameters, results, weights, layout, self.lora_aggregation, skip_experts=True
        )

        layer_records: dict[str, Any] = {}
        for layer in layout.layers:
            usage = torch.stack(
                [s.usage.float() for s in layer_statistics(results, layer.name)]
            )  # (C, E)
            expert_records = []
            for expert in range(layer.num_experts):
                qualified = usage[:, expert] >= self.u_min  # (C,)
                expert_record: dict[str, Any] = {
                    "expert": expert,
                    "qualified": [
                        cid for cid, q in zip(client_ids, qualified.tolist(), strict=True) if q
                    ],
                    "weights": {},
                    "fallback": None,
                }
                expert_records.append(expert_record)
                if layer.has_lora_expert(expert):
                    self._merge_lora_expert(
                        layer,
                        expert,
                        global_parameters,
                        results,
                        parameters,
                        counts,
                        usage[:, expert],
                        qualified,
                        expert_record,
                    )
                    continue
                if not layer.experts[expert]:
                    expert_record["fallback"] = "no-trainable-parameters"
                    continue
                if not qualified.any():
                    expert_record["fallback"] = "no-qualified-client"
                    previous = layer.expert_vector(global_parameters, expert)
                    write_expert_vector_in_place(layer, parameters, expert, previous)
                    continue
                mask = qualified.float()
                expert_weights = normalise_weights(
                    counts * usage[:, expert] * mask, counts * mask, mask
                )  # (C,), zero for non-qualified clients
                # (C,) @ (C, P_e) -> (P_e,)
                vector = expert_weights @ client_expert_matrix(results, layer, expert)
                write_expert_vector_in_place(layer, parameters, expert, vector)
                expert_record["weights"] = {
                    str(cid): rounded(w)
                    for cid, w, q in zip(
                        client_ids, expert_weights.tolist(), qualified.tolist(), strict=True
                    )
                    if q
                }
            layer_records[layer.name] = {"experts": expert_records}

        record = base_record(self.name, server_round, results, weights)
        record["u_min"] = self.u_min
        record["layers"] = layer_records
        record.update(routing_metrics(results, None))
        if lora is not None:
            record["lora"] = lora
        return AggregationResult(
            parameters=cast_like_reference(parameters, global_parameters),
            state=dict(state),
            record=record,
        )

    def _merge_lora_expert(
        self,
        layer: MoELayerLayout,
        expert: int,
        global_parameters: Mapping[str, Tensor],
        results: Sequence[ClientResult],
        parameters: dict[str, Tensor],
        counts: Tensor,
        usage: Tensor,
        qualified: Tensor,
        expert_record: dict[str, Any],
    ) -> None:
        """A LoRA expert: the qualified clients' weights applied to its factors or products.

        The target update is ``sum_i w_i s B_i(e) A_i(e)`` (``w_i ∝ n_i u_i(e)`` over the
        qualified clients), written per ``lora_aggregation``; the record gains
        ``"lora_product_error"``.
        """
        if not qualified.any():
            expert_record["fallback"] = "no-qualified-client"
            states, merge = [global_parameters], torch.ones(1)
        else:
            mask = qualified.float()
            expert_weights = normalise_weights(counts * usage * mask, counts * mask, mask)  # (C,)
            states, merge = with_remainder(results, expert_weights, global_parameters)
            expert_record["weights"] = {
                str(r.client_id): rounded(w)
                for r, w, q in zip(
                    results, expert_weights.tolist(), qualified.tolist(), strict=True
                )
                if q
            }
        error = write_lora_expert(layer, parameters, expert, states, merge, self.lora_aggregation)
        expert_record["lora_product_error"] = rounded(error)
