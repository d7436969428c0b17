"""FedAlign-MoE's decision records: one entry per expert, filled by steps B-D.

    Record (JSON-able)::

        {"strategy": "fedalign", "round", "clients", "num_examples", "example_weights",
         "ablation", "routing_lambda",
         "layers": {layer: {
             "routing_reference": "previous-global" | "client-mean",
             "global_routing": [E floats],               # p_g^t
             "expert_aggregation": "semantic" | "fedavg",
             "experts": [{"expert": e,
                          "omega": {id: omega_i(e)}, "p_g": p_g^t(e),
                          "active": [ids] | None, "consensus": {id: c_i} | None,
                          "tau": float | None, "aligned": [ids] | None,
                          "aggregation_weights": {id: w_i} | None,
                          "fallback": str | None}, ...]}},
         "routing_divergence": {...}, "semantic_dispersion": {...}}

    With a method option of :data:`RECORDED_OPTIONS` off its default the record holds
    ``"method_options"``; with the client proximal term on, ``"client_proximal_mu"``; with
    ``selection = "soft"`` each semantic expert holds ``"selection": "soft"`` and
    ``"soft_membership"`` (``"aligned"`` stays the hard set). Ablation ``"fedavg"``: the
    FedAvg record with ``"layers": {}``. LoRA pairs add ``"lora"``; LoRA experts
    ``"lora_update_size"`` and ``"lora_product_error"``.

Shapes: ``C`` clients in the round, ``E`` experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedalign.strategies.fedalign.semantic import SemanticDecision
from fedalign.strategies.records import per_client, rounded, rounded_list

Tensor = torch.Tensor


def expert_records(
    client_ids: Sequence[int], omega: Tensor, global_routing: Tensor
) -> list[dict[str, Any]]:
    """One record per expert with step A-B's ``omega`` ``(C, E)`` and ``p_g`` ``(E,)``; the
    step-D fields start as None (they stay None when step D does not run)."""
    return [
        {
            "expert": expert,
            "omega": per_client(client_ids, omega[:, expert]),
            "p_g": rounded(float(global_routing[expert])),
            "active": None,
            "consensus": None,
            "tau": None,
            "aligned": None,
            "aggregation_weights": None,
            "fallback": None,
        }
        for expert in range(int(global_routing.shape[0]))
    ]


def layer_record(
    reference_source: str,
    global_routing: Tensor,
    semantic: bool,
    experts: list[dict[str, Any]],
) -> dict[str, Any]:
    """A layer's entry of the round record."""
    return {
        "routing_reference": reference_source,
        "global_routing": rounded_list(global_routing),
        "expert_aggregation": "semantic" if semantic else "fedavg",
        "experts": experts,
    }


def fill_expert_record(
    record: dict[str, Any],
    client_ids: Sequence[int],
    decision: SemanticDecision,
    active: Tensor,
    aggregation_weights: Tensor,
    membership: Tensor,
    selection: str,
) -> None:
    """Step D's decision for one expert into its record (consensus, tau, aligned, weights;
    the soft membership with ``selection = "soft"``)."""
    record["consensus"] = {
        str(cid): rounded(c)
        for cid, c, a in zip(client_ids, decision.consensus.tolist(), active.tolist(), strict=True)
        if a and not math.isnan(c)  # NaN: no consensus defined (< 2 active)
    }
    record["tau"] = None if decision.threshold is None else rounded(decision.threshold)
    record["aligned"] = [
        cid for cid, a in zip(client_ids, decision.aligned.tolist(), strict=True) if a
    ]
    merged = decision.aligned if selection == "hard" else active
    merged = merged | (aggregation_weights > 0)  # a blended merge (merge_strength < 1)
    record["aggregation_weights"] = {
        str(cid): rounded(w)
        for cid, w, a in zip(client_ids, aggregation_weights.tolist(), merged.tolist(), strict=True)
        if a
    }
    record["fallback"] = decision.fallback
    if selection == "soft":
        record["selection"] = "soft"
        record["soft_membership"] = {
            str(cid): rounded(m)
            for cid, m, a in zip(client_ids, membership.tolist(), active.tolist(), strict=True)
            if a
        }
