"""The FedAlign-MoE strategy: the orchestration of steps A-E and the round's state.

The client side lives in :mod:`.client_side`, step E and the record's head in
:mod:`.step_e`, steps A-C per layer in :mod:`.routers`, step D in :mod:`.experts` (one loop,
exact or sketched update similarities), the decision records in :mod:`.decisions`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedalign.errors import OptionError
from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult, TrainInstructions
from fedalign.strategies.averaging import cast_like_reference, layer_statistics, trainable_layout
from fedalign.strategies.base import AggregationResult, Strategy, StrategyState
from fedalign.strategies.fedalign.client_side import (
    client_instructions,
    expert_alpha,
    remember_clients,
    store_personal_experts,
)
from fedalign.strategies.fedalign.decisions import expert_records, layer_record
from fedalign.strategies.fedalign.experts import (
    ExactUpdates,
    ExpertSettings,
    PersonalVectors,
    UpdatesFactory,
    aggregate_layer_experts,
    sketched_factory,
)
from fedalign.strategies.fedalign.options import (
    ABLATION_LEVEL,
    DEFAULT_ABLATION,
    METHOD_OPTION_DEFAULTS,
    FedAlignOptions,
)
from fedalign.strategies.fedalign.routers import align_layer_routing, routing_settings
from fedalign.strategies.fedalign.step_e import start_round
from fedalign.strategies.records import routing_metrics

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

    The choices of ours beyond docs/method.md are listed in the package docstring
    (:mod:`fedalign.strategies.fedalign`).
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
        # the options object holds its row's resolved method options (FedAlignOptions)
        self.method = {key: getattr(options, key) for key in METHOD_OPTION_DEFAULTS}
        self.method["count_weighted"] = bool(self.method["count_weighted"])
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
        """``fedalign`` for the default row (:data:`DEFAULT_ABLATION`), else
        ``fedalign-<ablation>`` (the paper's method is ``fedalign-full``)."""
        return cls.name if variant == DEFAULT_ABLATION else f"{cls.name}-{variant}"

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
        """Per layer ``alpha_i(e)`` for ``client_id`` (:func:`.client_side.expert_alpha`)."""
        return expert_alpha(self.layout, self._adaptive, client_id, state)

    def configure_train(
        self, server_round: int, client_ids: Sequence[int], state: StrategyState
    ) -> dict[int, TrainInstructions]:
        """Per client the instructions of :func:`.client_side.client_instructions`; ablation
        ``"fedavg"``: plain local training."""
        if self.ablation == "fedavg":
            return {cid: TrainInstructions() for cid in client_ids}
        return client_instructions(
            self.options,
            self.method["routing_form"],
            self.layout,
            self._adaptive,
            client_ids,
            state,
        )

    @property
    def _adaptive(self) -> bool:
        """Whether ``alpha_i(e)`` adapts (ablations from ``"adaptive-reg"`` on)."""
        return self.ablation_level >= ABLATION_LEVEL["adaptive-reg"]

    # ---------------------------------------------------------------- server side
    def aggregate(
        self,
        server_round: int,
        global_parameters: Mapping[str, Tensor],
        results: Sequence[ClientResult],
        state: StrategyState,
    ) -> AggregationResult:
        """Steps A-E of FedAlign-MoE (docs/method.md); the record's format: :mod:`.decisions`."""
        parameters, record = start_round(
            self.name,
            self.options,
            self.method,
            self.semantic_aggregation,
            self.lora_aggregation,
            self.layout,
            server_round,
            global_parameters,
            results,
        )
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
        settings = routing_settings(self.options, self.method)
        for layer in layout.layers:
            statistics = layer_statistics(results, layer.name)
            routing = align_layer_routing(
                layer, results, statistics, previous_reference, settings, parameters
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
        new_state["client_weights"] = remember_clients(state, server_round, client_omega)
        client_parameters: dict[int, dict[str, Tensor]] = {}
        if self.options.personalized_experts:
            client_parameters = store_personal_experts(
                layout, parameters, global_parameters, personal_vectors, new_state
            )
        return AggregationResult(parameters, new_state, record, client_parameters)

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
