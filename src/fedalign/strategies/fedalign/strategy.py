"""The FedAlign-MoE strategy: client instructions and the orchestration of steps A-E.

Steps A-C per layer live in :mod:`.routers`, step D in :mod:`.experts` (one loop, exact or
sketched update similarities), the decision records in :mod:`.decisions`; this module
holds the options, the client side and the round's state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedalign.errors import OptionError
from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult, LossTermSpec, TrainInstructions
from fedalign.strategies.averaging import (
    average_outside_experts,
    cast_like_reference,
    example_weights,
    layer_statistics,
    trainable_layout,
    weighted_average,
)
from fedalign.strategies.base import AggregationResult, Strategy, StrategyState
from fedalign.strategies.fedalign.decisions import expert_records, layer_record
from fedalign.strategies.fedalign.experts import (
    ExactUpdates,
    ExpertSettings,
    PersonalVectors,
    UpdatesFactory,
    aggregate_layer_experts,
    personal_parameters,
    sketched_factory,
)
from fedalign.strategies.fedalign.options import (
    ABLATION_LEVEL,
    METHOD_OPTION_DEFAULTS,
    RECORDED_OPTIONS,
    ROUTING_TERM,
    FedAlignOptions,
    resolve_method_options,
)
from fedalign.strategies.fedalign.routers import RoutingSettings, align_layer_routing
from fedalign.strategies.lora import aggregate_lora_modules
from fedalign.strategies.records import base_record, routing_metrics
from fedalign.strategies.screening import check_results

Tensor = torch.Tensor


class FedAlignMoE(Strategy):
    """FedAlign-MoE (arXiv 2603.21276) with the paper's ablation rows as switches.

    Parameters
    ----------
    layout : MoELayout
        Where routers and experts live among the trainable parameters.
    options : FedAlignOptions, optional
        The validated options (see :class:`FedAlignOptions` for each knob: ``ablation``,
        ``routing_lambda``, ``beta``, ``eps``, ``overlap``, ``personalized_experts``, the
        method options, ``sketch_dim``, ``client_proximal_mu``). Without it, keyword
        ``values`` build one (``FedAlignMoE(layout, ablation="consistency")``).

    Attributes
    ----------
    threshold_std : str
        ``"population"``: ``Sigma(e)`` divides by the ``n`` active clients.
    consensus_tolerance : float
        ``c_i >= tau_e - consensus_tolerance`` counts as aligned (guards float rounding).
    personalize_include_self : bool
        Client ``i``'s own update is part of its region with ``gamma_ii = 1``.

    Notes
    -----
    Choices of ours beyond docs/method.md:

    * Round 1 (no ``p_g`` in the state yet): clients get no routing term (no target).
    * ``alpha_i(e) = clip(|S_t'| * omega_i(e), 0, 1)`` from the client's last participating
      round ``t'``; ones before its first round and for ablations below ``"adaptive-reg"``.
    * Step D weights ``w_i ∝ n_i * u_i(e)`` over ``A_e``; if they are all 0, ``n_i``; then
      uniform. A client with ``count_i(e) = 0`` contributes nothing to expert ``e``.
    * Hidden-state similarities ``S`` of a layer are one batched ``einsum`` over all
      experts; update similarities ``D`` one ``(C, P_e) x (P_e, C)`` product per expert
      (exact), or the cosines of ``k``-value sketches (``sketch_dim = k``: memory
      ``O(C k + P_e)``, the experts not FedAvg'd first, the record holds ``"sketch_dim"``).
    * Personalised experts: client ``i``'s region holds itself and the active ``j`` with
      ``gamma_ij >= tau_e`` and ``gamma_ij > 0``. Inactive clients of ``e`` start from the
      new global ``theta(e)``; the tensors stay in the state until the client's next round.
    * ``routing_divergence`` in the record is measured against the new ``p_g^t``.
    * LoRA experts: step D works on each expert's weight update ``s B_e A_e``, exact even
      with ``sketch_dim > 0``. Not combinable with ``personalized_experts``.
    * As specified, ``o_i(e) = sqrt(pbar_i(e) * p_g^{t-1}(e))``: the common factor
      ``sqrt(p_g^{t-1}(e))`` cancels when ``s_i(e)`` is normalised over clients.
    """

    name = "fedalign"
    options_type = FedAlignOptions
    threshold_std = "population"
    consensus_tolerance = 1e-6
    personalize_include_self = True

    def __init__(
        self, layout: MoELayout, options: FedAlignOptions | None = None, **values: Any
    ) -> None:
        super().__init__(layout)
        if options is None:
            options = FedAlignOptions(**values)
        elif values:
            raise TypeError("give FedAlignMoE an options object or keyword values, not both")
        self.options = options
        given = {key: getattr(options, key) for key in METHOD_OPTION_DEFAULTS}
        given["count_weighted"] = bool(given["count_weighted"])
        self.method = resolve_method_options(options.ablation, given)
        self.needs_routing_statistics = options.ablation != "fedavg"
        if options.personalized_experts and layout.lora_expert_param_names():
            raise OptionError(
                "personalized_experts",
                True,
                "is not supported with LoRA experts (model.lora-experts = true)",
            )

    @classmethod
    def from_options(cls, layout: MoELayout, options: Any) -> FedAlignMoE:
        return cls(layout, options)

    @classmethod
    def run_label(cls, variant: str) -> str:
        """``fedalign-<ablation>`` for ablation rows other than ``full``."""
        return cls.name if variant == "full" else f"{cls.name}-{variant}"

    @property
    def ablation(self) -> str:
        return self.options.ablation

    @property
    def ablation_level(self) -> int:
        """0 (``"fedavg"``) to 4 (``"full"``): the ablation table row, 0-based."""
        return ABLATION_LEVEL[self.options.ablation]

    @property
    def semantic_aggregation(self) -> bool:
        """Whether step D runs (rows ``"full"`` and ``"full-sound"``)."""
        return self.ablation_level >= ABLATION_LEVEL["full"]

    def method_options(self) -> dict[str, Any]:
        """The method options in effect (keys of ``METHOD_OPTION_DEFAULTS``)."""
        return dict(self.method)

    # ---------------------------------------------------------------- client side
    def expert_alpha(self, client_id: int, state: StrategyState) -> dict[str, Tensor]:
        """Per layer ``alpha_i(e)``, shape ``(E,)``, for ``client_id``: ``clip(|S_t'| *
        omega_i(e), 0, 1)`` from its last round ``t'`` (``state["client_weights"]``); ones
        without one, or for ablations below ``"adaptive-reg"``."""
        memory = state.get("client_weights", {}).get(client_id)
        adaptive = self.ablation_level >= ABLATION_LEVEL["adaptive-reg"]
        alphas: dict[str, Tensor] = {}
        for layer in self.layout.layers:
            omega = memory["omega"].get(layer.name) if adaptive and memory else None
            if omega is None:
                alphas[layer.name] = torch.ones(layer.num_experts)
            else:
                alphas[layer.name] = (float(memory["num_selected"]) * omega.float()).clamp(0.0, 1.0)
        return alphas

    def configure_train(
        self, server_round: int, client_ids: Sequence[int], state: StrategyState
    ) -> dict[int, TrainInstructions]:
        """Per client: statistics collection; the ``"routing-alignment"`` term (coefficient
        ``lambda``, tensors ``target`` = ``p_g`` and ``alpha``) once the state holds ``p_g``;
        its personalised experts; FedProx's ``"proximal"`` term with ``client_proximal_mu``.
        Ablation ``"fedavg"``: plain local training."""
        if self.ablation == "fedavg":
            return {cid: TrainInstructions() for cid in client_ids}
        global_routing: Mapping[str, Tensor] = state.get("global_routing", {})
        personalised: Mapping[int, Mapping[str, Tensor]] = state.get("personalized_experts", {})
        mu, lam = float(self.options.client_proximal_mu), float(self.options.routing_lambda)
        instructions = {}
        for cid in client_ids:
            start = None
            if self.options.personalized_experts and cid in personalised:
                start = {name: tensor.clone() for name, tensor in personalised[cid].items()}
            terms = [LossTermSpec("proximal", coefficient=0.5 * mu)] if mu > 0 else []
            if lam > 0 and global_routing:
                target = {name: p.clone() for name, p in global_routing.items()}
                tensors = {"target": target, "alpha": self.expert_alpha(cid, state)}
                options = {"form": self.method["routing_form"]}
                terms.append(LossTermSpec(ROUTING_TERM, lam, options=options, tensors=tensors))
            instructions[cid] = TrainInstructions(
                loss_terms=terms, collect_statistics=True, start_parameters=start
            )
        return instructions

    # ---------------------------------------------------------------- server side
    def aggregate(
        self,
        server_round: int,
        global_parameters: Mapping[str, Tensor],
        results: Sequence[ClientResult],
        state: StrategyState,
    ) -> AggregationResult:
        """Steps A-E of FedAlign-MoE (docs/method.md).

        The round record's format: :mod:`.decisions`.
        """
        parameters, record = self._start(server_round, global_parameters, results)
        if self.ablation == "fedavg":
            record["layers"] = {}
            record.update(routing_metrics(results, None))
            return AggregationResult(parameters=parameters, state=dict(state), record=record)
        client_ids = [r.client_id for r in results]
        previous_reference: Mapping[str, Tensor] = state.get(
            "global_routing" if self.method["routing_signal"] == "softmax" else "global_usage",
            {},
        )
        new_state = dict(state)
        new_routing: dict[str, Tensor] = {}
        new_usage: dict[str, Tensor] = {}
        client_omega: dict[int, dict[str, Tensor]] = {cid: {} for cid in client_ids}
        personal_vectors: PersonalVectors = {cid: [] for cid in client_ids}
        layer_records: dict[str, Any] = {}
        layout = trainable_layout(self.layout, global_parameters)
        make_updates = self._updates_factory()
        for layer in layout.layers:
            statistics = layer_statistics(results, layer.name)
            routing = align_layer_routing(
                layer, results, statistics, previous_reference, self._routing_settings(), parameters
            )
            new_routing[layer.name] = routing.global_routing
            if routing.global_usage is not None:
                new_usage[layer.name] = routing.global_usage
            for index, cid in enumerate(client_ids):
                client_omega[cid][layer.name] = routing.omega[index].clone()
            experts = expert_records(client_ids, routing.omega, routing.global_routing)
            if self.semantic_aggregation:
                aggregate_layer_experts(
                    layer,
                    global_parameters,
                    results,
                    statistics,
                    parameters,
                    experts,
                    personal_vectors,
                    self._expert_settings(),
                    make_updates,
                )
            layer_records[layer.name] = layer_record(
                routing.reference_source, routing.global_routing, self.semantic_aggregation, experts
            )
        record["layers"] = layer_records
        record.update(routing_metrics(results, new_routing))
        parameters = cast_like_reference(parameters, global_parameters)
        new_state["global_routing"] = new_routing
        if new_usage:
            new_state["global_usage"] = new_usage
        client_weights = dict(state.get("client_weights", {}))
        for cid in client_ids:
            client_weights[cid] = {
                "round": int(server_round),
                "num_selected": len(client_ids),
                "omega": client_omega[cid],
            }
        new_state["client_weights"] = client_weights
        client_parameters = self._personalise(
            layout, parameters, global_parameters, personal_vectors, new_state
        )
        return AggregationResult(parameters, new_state, record, client_parameters)

    def _start(
        self,
        server_round: int,
        global_parameters: Mapping[str, Tensor],
        results: Sequence[ClientResult],
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Step E (FedAvg of every tensor step D will not rewrite, LoRA pairs included) and
        the round record's head."""
        check_results(global_parameters, results)
        layout = trainable_layout(self.layout, global_parameters)
        weights = example_weights(results)  # (C,)
        if self.options.sketch_dim > 0 and self.semantic_aggregation:
            # step D rewrites every expert: FedAvg only the rest (one pass less over experts)
            parameters = average_outside_experts(layout, global_parameters, results, weights)
        else:
            parameters = weighted_average(global_parameters, results, weights)
        record = base_record(self.name, server_round, results, weights)
        record["ablation"] = self.ablation
        record["routing_lambda"] = float(self.options.routing_lambda)
        if any(self.method[key] != METHOD_OPTION_DEFAULTS[key] for key in RECORDED_OPTIONS):
            record["method_options"] = self.method_options()
        if self.options.sketch_dim > 0:
            record["sketch_dim"] = int(self.options.sketch_dim)
        if self.options.merge_strength < 1.0:
            record["merge_strength"] = float(self.options.merge_strength)
        lora = aggregate_lora_modules(
            parameters,
            results,
            weights,
            layout,
            self.lora_aggregation,
            skip_experts=self.semantic_aggregation,
        )
        if lora is not None:
            record["lora"] = lora
        return parameters, record

    def _routing_settings(self) -> RoutingSettings:
        return RoutingSettings(
            ablation=self.ablation,
            eps=float(self.options.eps),
            overlap=self.method["overlap"],
            routing_signal=self.method["routing_signal"],
            count_weighted=self.method["count_weighted"],
            merge_strength=float(self.options.merge_strength),
        )

    def _expert_settings(self) -> ExpertSettings:
        return ExpertSettings(
            beta=float(self.options.beta),
            eps=float(self.options.eps),
            selection=self.method["selection"],
            semantic_centre=self.method["semantic_centre"],
            personalized_experts=bool(self.options.personalized_experts),
            lora_aggregation=self.lora_aggregation,
            threshold_std=self.threshold_std,
            consensus_tolerance=self.consensus_tolerance,
            personalize_include_self=self.personalize_include_self,
            merge_strength=float(self.options.merge_strength),
        )

    def _updates_factory(self) -> UpdatesFactory:
        if self.options.sketch_dim > 0:
            return sketched_factory(self.options.sketch_dim)
        return ExactUpdates

    def _personalise(
        self,
        layout: MoELayout,
        parameters: Mapping[str, Tensor],
        global_parameters: Mapping[str, Tensor],
        personal_vectors: PersonalVectors,
        new_state: StrategyState,
    ) -> dict[int, dict[str, Tensor]]:
        """Per client, its expert tensors (:func:`personal_parameters`), also stored in
        ``new_state["personalized_experts"]``; empty when not personalised."""
        if not self.options.personalized_experts:
            return {}
        client_parameters = personal_parameters(
            layout, parameters, global_parameters, personal_vectors
        )
        stored = dict(new_state.get("personalized_experts", {}))
        stored.update(client_parameters)
        new_state["personalized_experts"] = stored
        return client_parameters
