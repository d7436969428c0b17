"""FedAlign-MoE's client side: the instructions each selected client trains with, and the
per-client memory (``omega`` of its last round) the adaptive strengths come from.

* the routing regulariser ``lambda * L_reg`` (``"routing-alignment"``) toward ``p_g`` with
  per-expert strengths ``alpha_i(e)``, once the state holds a ``p_g``;
* FedProx's ``"proximal"`` term when ``client_proximal_mu`` > 0;
* the client's personalised experts as its starting point (``personalized_experts``),
  kept in the state between its rounds (:func:`store_personal_experts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedalign.moe.layout import MoELayout
from fedalign.protocol import LossTermSpec, TrainInstructions
from fedalign.strategies.base import StrategyState
from fedalign.strategies.fedalign.experts import PersonalVectors, personal_parameters
from fedalign.strategies.fedalign.options import ROUTING_TERM, FedAlignOptions

Tensor = torch.Tensor


def expert_alpha(
    layout: MoELayout, adaptive: bool, client_id: int, state: StrategyState
) -> dict[str, Tensor]:
    """Per layer ``alpha_i(e)``, shape ``(E,)``, for ``client_id``: ``clip(|S_t'| *
    omega_i(e), 0, 1)`` from its last round ``t'`` (``state["client_weights"]``); ones
    without one, or when not ``adaptive`` (ablations below ``"adaptive-reg"``)."""
    memory = state.get("client_weights", {}).get(client_id)
    alphas: dict[str, Tensor] = {}
    for layer in layout.layers:
        omega = memory["omega"].get(layer.name) if adaptive and memory else None
        if omega is None:
            alphas[layer.name] = torch.ones(layer.num_experts)
        else:
            alphas[layer.name] = (float(memory["num_selected"]) * omega.float()).clamp(0.0, 1.0)
    return alphas


def client_instructions(
    options: FedAlignOptions,
    routing_form: str,
    layout: MoELayout,
    adaptive: bool,
    client_ids: Sequence[int],
    state: StrategyState,
) -> dict[int, TrainInstructions]:
    """Per client: statistics collection, the proximal term (coefficient ``mu / 2``), the
    routing term (coefficient ``lambda``, tensors ``target`` = ``p_g`` and ``alpha``) once
    the state holds ``p_g``, and its personalised experts."""
    global_routing: Mapping[str, Tensor] = state.get("global_routing", {})
    personalised: Mapping[int, Mapping[str, Tensor]] = state.get("personalized_experts", {})
    mu, lam = float(options.client_proximal_mu), float(options.routing_lambda)
    instructions = {}
    for cid in client_ids:
        start = None
        if options.personalized_experts and cid in personalised:
            start = {name: tensor.clone() for name, tensor in personalised[cid].items()}
        terms = [LossTermSpec("proximal", coefficient=0.5 * mu)] if mu > 0 else []
        if lam > 0 and global_routing:
            target = {name: p.clone() for name, p in global_routing.items()}
            tensors = {"target": target, "alpha": expert_alpha(layout, adaptive, cid, state)}
            terms.append(
                LossTermSpec(ROUTING_TERM, lam, options={"form": routing_form}, tensors=tensors)
            )
        instructions[cid] = TrainInstructions(
            loss_terms=terms, collect_statistics=True, start_parameters=start
        )
    return instructions


def remember_clients(
    state: StrategyState,
    server_round: int,
    client_omega: Mapping[int, dict[str, Tensor]],
) -> dict[int, dict[str, Any]]:
    """``state["client_weights"]`` with this round's clients' ``omega`` (per layer), the
    round and the number selected: the memory :func:`expert_alpha` reads next time."""
    client_weights = dict(state.get("client_weights", {}))
    for cid, omega in client_omega.items():
        client_weights[cid] = {
            "round": int(server_round),
            "num_selected": len(client_omega),
            "omega": omega,
        }
    return client_weights


def store_personal_experts(
    layout: MoELayout,
    parameters: Mapping[str, Tensor],
    global_parameters: Mapping[str, Tensor],
    personal_vectors: PersonalVectors,
    new_state: StrategyState,
) -> dict[int, dict[str, Tensor]]:
    """Per client, its personalised expert tensors (:func:`.experts.personal_parameters`),
    also stored in ``new_state["personalized_experts"]`` for its next round."""
    client_parameters = personal_parameters(layout, parameters, global_parameters, personal_vectors)
    stored = dict(new_state.get("personalized_experts", {}))
    stored.update(client_parameters)
    new_state["personalized_experts"] = stored
    return client_parameters
