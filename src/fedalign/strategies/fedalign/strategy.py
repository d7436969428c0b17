"""The FedAlign-MoE strategy: client instructions and the server aggregation (steps A-E)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedalign.errors import OptionError, check_choice
from fedalign.moe.layout import MoELayerLayout, MoELayout
from fedalign.protocol import (
    ClientResult,
    LayerRoutingStatistics,
    LossTermSpec,
    TrainInstructions,
)
from fedalign.strategies.averaging import (
    cast_like_reference,
    client_expert_matrix,
    example_counts,
    example_weights,
    layer_statistics,
    router_rows_average,
    trainable_layout,
    weighted_average,
    write_expert_vector_in_place,
)
from fedalign.strategies.base import AggregationResult, Strategy, StrategyState
from fedalign.strategies.fedalign.options import (
    ABLATION_LEVEL,
    CONSISTENCY_SCORES,
    METHOD_OPTION_DEFAULTS,
    RECORDED_OPTIONS,
    ROUTING_TERM,
    THRESHOLD_STD_CHOICES,
    FedAlignOptions,
    resolve_method_options,
)
from fedalign.strategies.fedalign.semantic import (
    SemanticDecision,
    cosine_gram,
    fold_sketch,
    hidden_similarities,
    personal_region_weights,
    selection_weights,
    semantic_alignment,
    sketch_buckets,
    sketch_signs,
)
from fedalign.strategies.fedalign.weights import (
    consistency_signal,
    consistency_weights,
    global_routing_distribution,
)
from fedalign.strategies.lora import (
    aggregate_lora_modules,
    client_lora_deltas,
    with_remainder,
    write_lora_expert,
)
from fedalign.strategies.records import (
    base_record,
    per_client,
    rounded,
    rounded_list,
    routing_metrics,
)
from fedalign.strategies.screening import check_results

Tensor = torch.Tensor


# ---------------------------------------------------------------------- the strategy
class FedAlignMoE(Strategy):
    """FedAlign-MoE (arXiv 2603.21276) with the paper's ablation rows as switches.

    Parameters
    ----------
    layout : MoELayout
        Where routers and experts live among the trainable parameters.
    ablation : str, default "full"
        Ablation row (see :data:`ABLATIONS`): ``"fedavg"`` (plain FedAvg, no
        regulariser, no statistics), ``"uniform-align"`` (``omega = 1/|S_t|``, ``alpha = 1``),
        ``"consistency"`` (``s = o * m``), ``"overlap-only"`` (``s = o``), ``"margin-only"``
        (``s = m``), ``"adaptive-reg"`` (+ adaptive ``alpha_i(e)``), ``"full"`` (+ semantic
        expert aggregation), ``"full-sound"`` (``"full"`` with the sound method options of
        :data:`fedalign.config.ABLATION_PRESETS`: options left at their defaults take the
        preset's values). Below ``"full"`` experts are FedAvg'd by ``n_i``.
    routing_lambda : float, default 0.1
        Weight ``lambda`` of the routing regulariser sent to clients.
    beta : float, default 1.0
        Threshold ``tau_e = M(e) - beta * Sigma(e)`` of semantic aggregation.
    eps : float, default 1e-6
        Floor on the consistency scores ``s_i(e)``.
    personalized_experts : bool, default False
        Clients start each round from their semantic region's experts (needs ``"full"``).
    threshold_std : {"population", "sample"}, default "population"
        Standard deviation used for ``Sigma(e)`` (divisor ``n`` or ``n - 1`` active clients).
    consensus_tolerance : float, default 1e-6
        ``c_i >= tau_e - consensus_tolerance`` counts as aligned (guards float rounding).
    overlap : {"geometric", "bhattacharyya", "intersection"}, default "geometric"
        Definition of the expert overlap ``o_i(e)`` in the consistency score; see
        :func:`consistency_weights`. ``"geometric"`` is docs/method.md's.
    personalize_include_self : bool, default True
        Whether client ``i``'s own update is part of its region with ``gamma_ii = 1``
        (``cos`` of a vector with itself).
    routing_form : {"literal", "batch-kl", "topk-kl"}, default "literal"
        Form of the client regulariser ``L_reg`` sent in the instructions (see
        :func:`fedalign.routing.routing_regularizer`).
    routing_signal : {"softmax", "usage"}, default "softmax"
        Signal of the consistency weights: ``pbar_i(e)`` against ``p_g^{t-1}``, or the usage
        shares ``u_i(e) / k`` against the previous round's global usage share (``omega``-
        weighted like ``p_g``, kept in the state as ``"global_usage"``).
    count_weighted : bool, default False
        Multiply ``s_i(e)`` by ``count_i(e)``.
    semantic_centre : {"uncentred", "centred"}, default "uncentred"
        Centre the ``mu_i(e)`` on the layer's token-weighted mean before ``S_ij(e)``.
    selection : {"hard", "soft"}, default "hard"
        Step D's merge over the aligned set only, or over every active client with
        sigmoid weights (see :func:`selection_weights`).
    sketch_dim : int, default 0
        ``0``: step D's update cosines ``D_ij(e)`` are exact (the clients' updates of one
        expert stacked, ``(C, P_e)``). ``k > 0``: bounded memory; ``D_ij(e)`` are the cosines
        of ``k``-value sketches of the updates (:func:`sketch_vector`, seeded, computed client
        by client), the merge is accumulated in a second pass over the clients (zero-weight
        clients skipped), and the experts are not FedAvg'd first. Needs ``"full"``-level
        ablations to matter; the record then holds ``"sketch_dim"``.

    Notes
    -----
    Choices of ours beyond docs/method.md:

    * Round 1 (no ``p_g`` in the state yet, i.e. before any client has reported): clients
      get ``routing_lambda = 0`` since there is no target distribution.
    * ``alpha_i(e) = clip(|S_t'| * omega_i(e), 0, 1)`` from the client's last participating
      round ``t'``; ones before its first round and for ablations below ``"adaptive-reg"``.
    * Step D weights ``w_i ∝ n_i * u_i(e)`` over ``A_e``; if they are all 0, ``n_i``; then
      uniform. A client with ``count_i(e) = 0`` contributes nothing to expert ``e``.
    * Gram matrices: the hidden-state similarities ``S`` of a layer are one batched
      ``einsum`` over all experts; the update similarities ``D`` are one ``(C, P_e) x (P_e,
      C)`` product per expert, so only one expert's client updates are in memory at a time.
      ``D`` is the Gram matrix of the updates divided by the outer product of their norms
      (the cosines of the normalised rows, without a normalised copy).
    * ``Sigma(e)`` is the population standard deviation by default (``threshold_std``).
    * Personalised experts: client ``i``'s region holds itself (``gamma_ii = 1``, option
      ``personalize_include_self``) and the active ``j`` with ``gamma_ij >= tau_e`` and
      ``gamma_ij > 0`` (a negative ``gamma`` never pulls). Inactive clients of ``e`` start
      from the new global ``theta(e)``. The tensors are stored in the state per client until
      its next participation (stale under partial participation).
    * ``routing_divergence`` in the record is measured against the new ``p_g^t``.
    * LoRA experts (``model.lora-experts``): step D's consensus and merge work on each
      expert's weight update ``s B_e A_e`` (:meth:`_aggregate_lora_expert`), exact even with
      ``sketch_dim > 0``; the merged update is written as factor means or re-factorised
      (``lora_aggregation``). Not combinable with ``personalized_experts``.
    * As specified, ``o_i(e) = sqrt(pbar_i(e) * p_g^{t-1}(e))``: the factor
      ``sqrt(p_g^{t-1}(e))`` is common to all clients of expert ``e`` and cancels when
      ``s_i(e)`` is normalised over clients, so ``p_g^{t-1}`` changes ``omega`` only through
      the ``eps`` floor.
    """

    name = "fedalign"

    def __init__(
        self,
        layout: MoELayout,
        *,
        ablation: str = "full",
        routing_lambda: float = 0.1,
        beta: float = 1.0,
        eps: float = 1e-6,
        personalized_experts: bool = False,
        threshold_std: str = "population",
        consensus_tolerance: float = 1e-6,
        personalize_include_self: bool = True,
        overlap: str = "geometric",
        routing_form: str = "literal",
        routing_signal: str = "softmax",
        count_weighted: bool = False,
        semantic_centre: str = "uncentred",
        selection: str = "hard",
        sketch_dim: int = 0,
        client_proximal_mu: float = 0.0,
    ) -> None:
        super().__init__(layout)
        FedAlignOptions(
            ablation,
            routing_lambda,
            beta,
            eps,
            overlap,
            personalized_experts,
            routing_form,
            routing_signal,
            bool(count_weighted),
            semantic_centre,
            selection,
            sketch_dim,
            client_proximal_mu,
        )
        check_choice("threshold_std", threshold_std, THRESHOLD_STD_CHOICES)
        options = resolve_method_options(
            ablation,
            {
                "routing_form": routing_form,
                "routing_signal": routing_signal,
                "overlap": overlap,
                "count_weighted": bool(count_weighted),
                "semantic_centre": semantic_centre,
                "selection": selection,
            },
        )
        self.overlap: str = options["overlap"]
        self.routing_form: str = options["routing_form"]
        self.routing_signal: str = options["routing_signal"]
        self.count_weighted: bool = options["count_weighted"]
        self.semantic_centre: str = options["semantic_centre"]
        self.selection: str = options["selection"]
        self.ablation = ablation
        self.routing_lambda = float(routing_lambda)
        self.beta = float(beta)
        self.eps = float(eps)
        self.personalized_experts = bool(personalized_experts)
        self.threshold_std = threshold_std
        self.consensus_tolerance = float(consensus_tolerance)
        self.personalize_include_self = bool(personalize_include_self)
        self.needs_routing_statistics = ablation != "fedavg"
        self.sketch_dim = int(sketch_dim)
        self.client_proximal_mu = float(client_proximal_mu)
        if self.personalized_experts and layout.lora_expert_param_names():
            raise OptionError(
                "personalized_experts",
                True,
                "is not supported with LoRA experts (model.lora-experts = true)",
            )

    @property
    def ablation_level(self) -> int:
        """0 (``"fedavg"``) to 4 (``"full"``): the ablation table row, 0-based."""
        return ABLATION_LEVEL[self.ablation]

    @property
    def semantic_aggregation(self) -> bool:
        """Whether step D runs (rows ``"full"`` and ``"full-sound"``)."""
        return self.ablation_level >= ABLATION_LEVEL["full"]

    def method_options(self) -> dict[str, Any]:
        """The method options in effect (keys of ``METHOD_OPTION_DEFAULTS``)."""
        return {key: getattr(self, key) for key in METHOD_OPTION_DEFAULTS}

    # ---------------------------------------------------------------- client side
    def expert_alpha(self, client_id: int, state: StrategyState) -> dict[str, Tensor]:
        """Per layer ``alpha_i(e)``, shape ``(E,)``, for ``client_id``.

        ``clip(|S_t'| * omega_i(e), 0, 1)`` from the client's last participating round
        ``t'`` (kept in ``state["client_weights"]``); ones when it has none, or for ablations
        below ``"adaptive-reg"``.
        """
        memory = state.get("client_weights", {}).get(client_id)
        alphas: dict[str, Tensor] = {}
        for layer in self.layout.layers:
            if self.ablation_level < ABLATION_LEVEL["adaptive-reg"] or memory is None:
                alphas[layer.name] = torch.ones(layer.num_experts)
                continue
            omega = memory["omega"].get(layer.name)
            if omega is None:
                alphas[layer.name] = torch.ones(layer.num_experts)
                continue
            alphas[layer.name] = (float(memory["num_selected"]) * omega.float()).clamp(0.0, 1.0)
        return alphas

    def configure_train(
        self, server_round: int, client_ids: Sequence[int], state: StrategyState
    ) -> dict[int, TrainInstructions]:
        """Routing-regulariser instructions (and personalised experts) for each client.

        Ablation ``"fedavg"``: plain local training, no statistics. Otherwise
        ``collect_statistics=True``; once the state holds ``p_g`` (from round 2) and
        ``routing_lambda > 0``, the ``"routing-alignment"`` loss term with coefficient
        ``lambda``, tensors ``target`` (``p_g`` per layer) and ``alpha`` (``alpha_i(e)`` per
        layer); with ``personalized_experts``, the client's stored personalised experts; with
        ``client_proximal_mu > 0``, FedProx's ``"proximal"`` term with coefficient ``mu / 2``
        (not for ablation ``"fedavg"``, plain averaging).
        """
        if self.ablation == "fedavg":
            return {cid: TrainInstructions() for cid in client_ids}
        global_routing: Mapping[str, Tensor] = state.get("global_routing", {})
        personalised: Mapping[int, Mapping[str, Tensor]] = state.get("personalized_experts", {})
        instructions = {}
        for cid in client_ids:
            start = None
            if self.personalized_experts and cid in personalised:
                start = {name: tensor.clone() for name, tensor in personalised[cid].items()}
            terms = []
            if self.client_proximal_mu > 0:
                terms.append(LossTermSpec("proximal", coefficient=0.5 * self.client_proximal_mu))
            if self.routing_lambda > 0 and global_routing:
                target = {name: p.clone() for name, p in global_routing.items()}
                alpha = self.expert_alpha(cid, state)
                terms.append(
                    LossTermSpec(
                        ROUTING_TERM,
                        coefficient=self.routing_lambda,
                        options={"form": self.routing_form},
                        tensors={"target": target, "alpha": alpha},
                    )
                )
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
        """Steps A-E of FedAlign-MoE (see the module docstring and docs/method.md).

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

        Only when one of :data:`RECORDED_OPTIONS` differs from its default (so that records
        of the default options stay as they were), the record also holds ``"method_options"``
        (every option in effect) and, with ``selection = "soft"``, each expert of a
        semantic layer holds ``"selection": "soft"`` and ``"soft_membership": {id:
        sigmoid((c_i - tau) / max(Sigma, eps))}``, its ``"aggregation_weights"`` covering
        every active client (``"aligned"`` is still the hard set ``A_e``, for reference).
        A record without ``"selection"`` ran the hard selection.

        Ablation ``"fedavg"`` gives the FedAvg record with ``"layers": {}``.

        With LoRA pairs among the parameters the record also holds ``"lora"`` (see
        :func:`~fedalign.strategies.lora.aggregate_lora_modules`; the routed experts' pairs
        are left out when step D runs), and each LoRA expert of step D
        ``"lora_update_size"`` (length of the update vector ``s B_e A_e`` the consensus
        used) and ``"lora_product_error"``.
        """
        check_results(global_parameters, results)
        layout = trainable_layout(self.layout, global_parameters)
        weights = example_weights(results)  # (C,)
        if self.sketch_dim > 0 and self.semantic_aggregation:
            # step D rewrites every expert: FedAvg only the rest (one pass less over experts)
            parameters = self._average_outside_experts(layout, global_parameters, results, weights)
        else:
            parameters = weighted_average(global_parameters, results, weights)
        record = base_record(self.name, server_round, results, weights)
        record["ablation"] = self.ablation
        record["routing_lambda"] = self.routing_lambda
        options = self.method_options()
        if any(options[key] != METHOD_OPTION_DEFAULTS[key] for key in RECORDED_OPTIONS):
            record["method_options"] = options
        if self.sketch_dim > 0:
            record["sketch_dim"] = self.sketch_dim
        # LoRA pairs (step E); the routed experts' are merged in step D when it runs
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
        if self.ablation == "fedavg":
            record["layers"] = {}
            record.update(routing_metrics(results, None))
            return AggregationResult(parameters=parameters, state=dict(state), record=record)

        client_ids = [r.client_id for r in results]
        previous_routing: Mapping[str, Tensor] = state.get("global_routing", {})
        # The consistency reference lives in the signal's own space (p_g for the softmax).
        previous_reference: Mapping[str, Tensor] = (
            previous_routing if self.routing_signal == "softmax" else state.get("global_usage", {})
        )
        new_routing: dict[str, Tensor] = {}
        new_usage: dict[str, Tensor] = {}
        client_omega: dict[int, dict[str, Tensor]] = {cid: {} for cid in client_ids}
        personal_vectors: dict[int, list[tuple[MoELayerLayout, int, Tensor]]] = {
            cid: [] for cid in client_ids
        }
        layer_records: dict[str, Any] = {}
        for layer in layout.layers:
            statistics = layer_statistics(results, layer.name)
            routing_distribution = torch.stack(
                [s.routing_distribution.float() for s in statistics]
            )  # (C, E)
            margin = torch.stack([s.margin.float() for s in statistics])  # (C, E)
            usage = torch.stack([s.usage.float() for s in statistics])  # (C, E)
            token_count = torch.stack([s.token_count.float() for s in statistics])  # (C, E)
            signal = consistency_signal(
                routing_distribution, usage, layer.top_k, self.routing_signal
            )  # (C, E)
            # A. consistency weights against the previous global reference (p_g^{t-1} for
            # the softmax signal; round 1: plain mean of the clients' signals).
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
                CONSISTENCY_SCORES[self.ablation],
                self.eps,
                self.overlap,
                token_count if self.count_weighted else None,
            )  # (C, E)
            # B. global routing distribution p_g^t.
            global_routing = global_routing_distribution(routing_distribution, omega)  # (E,)
            new_routing[layer.name] = global_routing
            if self.routing_signal == "usage":
                new_usage[layer.name] = global_routing_distribution(signal, omega)  # (E,)
            for index, cid in enumerate(client_ids):
                client_omega[cid][layer.name] = omega[index].clone()
            # C. router rows.
            for name in layer.router_params:
                parameters[name] = router_rows_average(results, name, omega, layer.num_experts)

            expert_records: list[dict[str, Any]] = [
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
                for expert in range(layer.num_experts)
            ]
            # D. semantic-aware expert aggregation (full method only; else experts stay FedAvg).
            if self.semantic_aggregation:
                aggregate_experts = (
                    self._aggregate_experts_sketched
                    if self.sketch_dim > 0
                    else self._aggregate_experts
                )
                aggregate_experts(
                    layer,
                    global_parameters,
                    results,
                    statistics,
                    parameters,
                    expert_records,
                    personal_vectors,
                )
            layer_records[layer.name] = {
                "routing_reference": reference_source,
                "global_routing": rounded_list(global_routing),
                "expert_aggregation": "semantic" if self.semantic_aggregation else "fedavg",
                "experts": expert_records,
            }

        record["layers"] = layer_records
        record.update(routing_metrics(results, new_routing))
        parameters = cast_like_reference(parameters, global_parameters)

        new_state = dict(state)
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

        client_parameters: dict[int, dict[str, Tensor]] = {}
        if self.personalized_experts:
            client_parameters = self._personal_parameters(
                layout, parameters, global_parameters, personal_vectors
            )
            stored = dict(state.get("personalized_experts", {}))
            stored.update(client_parameters)
            new_state["personalized_experts"] = stored
        return AggregationResult(
            parameters=parameters,
            state=new_state,
            record=record,
            client_parameters=client_parameters,
        )

    def _step_d_inputs(
        self, results: Sequence[ClientResult], statistics: Sequence[LayerRoutingStatistics]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Step D's per-layer inputs: example counts ``(C,)``, usage ``(C, E)``, routed-token
        counts ``(C, E)`` and the semantic similarities ``S`` of every expert ``(E, C, C)``."""
        counts = example_counts(results)  # (C,)
        usage = torch.stack([s.usage.float() for s in statistics])  # (C, E)
        token_count = torch.stack([s.token_count.float() for s in statistics])  # (C, E)
        mean_hidden = torch.stack([s.mean_hidden.float() for s in statistics])  # (C, E, H)
        hidden_similarity = hidden_similarities(mean_hidden, token_count, self.semantic_centre)
        return counts, usage, token_count, hidden_similarity

    def _aggregate_experts(
        self,
        layer: MoELayerLayout,
        global_parameters: Mapping[str, Tensor],
        results: Sequence[ClientResult],
        statistics: Sequence[LayerRoutingStatistics],
        parameters: dict[str, Tensor],
        expert_records: list[dict[str, Any]],
        personal_vectors: dict[int, list[tuple[MoELayerLayout, int, Tensor]]],
    ) -> None:
        """Step D for one layer: write every expert into ``parameters``, fill the records."""
        client_ids = [r.client_id for r in results]
        counts, usage, token_count, hidden_similarity = self._step_d_inputs(results, statistics)

        for expert in range(layer.num_experts):
            expert_record = expert_records[expert]
            if layer.has_lora_expert(expert):
                self._aggregate_lora_expert(
                    layer,
                    expert,
                    global_parameters,
                    results,
                    (hidden_similarity[expert], counts, usage[:, expert], token_count[:, expert]),
                    parameters,
                    expert_record,
                )
                continue
            opening = _expert_start(
                layer, expert, global_parameters, parameters, client_ids, token_count, expert_record
            )
            if opening is None:
                continue
            active, previous = opening  # (C,), (P_e,)
            updates = client_expert_matrix(results, layer, expert).sub_(previous)  # (C, P_e)
            update_similarity = cosine_gram(updates)  # (C, C)
            decision = semantic_alignment(
                hidden_similarity[expert],
                update_similarity,
                active,
                beta=self.beta,
                threshold_std=self.threshold_std,
                tolerance=self.consensus_tolerance,
            )
            aggregation_weights, membership = selection_weights(
                decision, active, counts, usage[:, expert], self.selection, self.eps
            )  # (C,), zero outside the aligned set (hard) or the active clients (soft)
            new_vector = previous + aggregation_weights @ updates  # (P_e,)
            write_expert_vector_in_place(layer, parameters, expert, new_vector)

            self._fill_expert_record(
                expert_record, client_ids, decision, active, aggregation_weights, membership
            )

            if self.personalized_experts:
                region_weights = personal_region_weights(
                    decision, active, self.personalize_include_self, self.consensus_tolerance
                )  # (C, C)
                personal = previous + region_weights @ updates  # (C, P_e)
                has_region = region_weights.sum(dim=1) > 0  # (C,)
                for index, cid in enumerate(client_ids):
                    if has_region[index]:
                        personal_vectors[cid].append((layer, expert, personal[index]))

    def _aggregate_lora_expert(
        self,
        layer: MoELayerLayout,
        expert: int,
        global_parameters: Mapping[str, Tensor],
        results: Sequence[ClientResult],
        signals: tuple[Tensor, Tensor, Tensor, Tensor],
        parameters: dict[str, Tensor],
        expert_record: dict[str, Any],
    ) -> None:
        """Step D for one LoRA expert, on its weight updates ``delta_e = s B_e A_e``.

        The direction consensus uses the cosines of ``delta_e(client i) - delta_e(global)``
        (flattened over the expert's LoRA blocks), never the raw factors; the merge target
        ``delta_e(global) + sum_i w_i (delta_e(i) - delta_e(global))`` is written per
        ``lora_aggregation`` (factor means with the same weights, or the re-factorised
        product mean); the record gains ``"lora_product_error"``.

        Parameters
        ----------
        signals : tuple of Tensor
            ``(S (C, C), n (C,), u(e) (C,), count(e) (C,))``: hidden-state similarities,
            example counts, usage and token counts of this expert.
        """
        hidden_similarity, counts, usage, token_count = signals
        client_ids = [r.client_id for r in results]
        active = token_count > 0  # (C,)
        expert_record["active"] = [
            cid for cid, a in zip(client_ids, active.tolist(), strict=True) if a
        ]
        if not active.any():
            expert_record["fallback"] = "no-active-client"
            write_lora_expert(
                layer, parameters, expert, [global_parameters], torch.ones(1), "factors"
            )
            return
        previous = layer.lora_delta_vector(global_parameters, expert)  # (P_e,)
        updates = client_lora_deltas(results, layer, expert).sub_(previous)  # (C, P_e)
        decision = semantic_alignment(
            hidden_similarity,
            cosine_gram(updates),
            active,
            beta=self.beta,
            threshold_std=self.threshold_std,
            tolerance=self.consensus_tolerance,
        )
        aggregation_weights, membership = selection_weights(
            decision, active, counts, usage, self.selection, self.eps
        )  # (C,)
        states, merge = with_remainder(results, aggregation_weights, global_parameters)
        error = write_lora_expert(layer, parameters, expert, states, merge, self.lora_aggregation)
        self._fill_expert_record(
            expert_record, client_ids, decision, active, aggregation_weights, membership
        )
        expert_record["lora_update_size"] = int(updates.shape[1])
        expert_record["lora_product_error"] = rounded(error)

    def _fill_expert_record(
        self,
        expert_record: dict[str, Any],
        client_ids: Sequence[int],
        decision: SemanticDecision,
        active: Tensor,
        aggregation_weights: Tensor,
        membership: Tensor,
    ) -> None:
        """Step D's decision for one expert into its record (consensus, tau, aligned, ...)."""
        expert_record["consensus"] = {
            str(cid): rounded(c)
            for cid, c, a in zip(
                client_ids, decision.consensus.tolist(), active.tolist(), strict=True
            )
            if a and not math.isnan(c)  # NaN: no consensus defined (< 2 active)
        }
        expert_record["tau"] = None if decision.threshold is None else rounded(decision.threshold)
        expert_record["aligned"] = [
            cid for cid, a in zip(client_ids, decision.aligned.tolist(), strict=True) if a
        ]
        merged = decision.aligned if self.selection == "hard" else active
        expert_record["aggregation_weights"] = {
            str(cid): rounded(w)
            for cid, w, a in zip(
                client_ids, aggregation_weights.tolist(), merged.tolist(), strict=True
            )
            if a
        }
        expert_record["fallback"] = decision.fallback
        if self.selection == "soft":
            expert_record["selection"] = "soft"
            expert_record["soft_membership"] = {
                str(cid): rounded(m)
                for cid, m, a in zip(client_ids, membership.tolist(), active.tolist(), strict=True)
                if a
            }

    @staticmethod
    def _average_outside_experts(
        layout: MoELayout,
        global_parameters: Mapping[str, Tensor],
        results: Sequence[ClientResult],
        weights: Tensor,
    ) -> dict[str, Tensor]:
        """FedAvg of the non-expert tensors; expert tensors start as copies of the global ones.

        For step D paths that write every expert themselves (``sketch_dim > 0``).
        """
        expert_names = layout.expert_param_names()
        rest = {n: t for n, t in global_parameters.items() if n not in expert_names}
        parameters = weighted_average(rest, results, weights)
        for name in global_parameters:
            if name in expert_names:
                parameters[name] = global_parameters[name].clone()
        return {name: parameters[name] for name in global_parameters}

    def _aggregate_experts_sketched(
        self,
        layer: MoELayerLayout,
        global_parameters: Mapping[str, Tensor],
        results: Sequence[ClientResult],
        statistics: Sequence[LayerRoutingStatistics],
        parameters: dict[str, Tensor],
        expert_records: list[dict[str, Any]],
        personal_vectors: dict[int, list[tuple[MoELayerLayout, int, Tensor]]],
    ) -> None:
        """Step D for one layer in bounded memory (``sketch_dim > 0``); same records.

        Per expert, two passes over the clients' tensors: (1) each active client's signed
        update ``(theta_i(e) - theta(e)) * s`` is written into one ``(P_e,)`` buffer (one
        fused pass per slice) and folded to ``k`` values (:func:`fold_sketch`), so ``D`` is
        the cosine Gram of a ``(C, k)`` matrix; (2) after the decision,
        ``sum_i w_i theta_i(e) + (1 - sum_i w_i) theta(e)`` (``= theta(e) + sum_i w_i
        dtheta_i(e)``) is accumulated client by client, skipping zero weights. Memory:
        ``O(C k + P_e)`` per expert (plus ``O(C P_e)`` for personalised experts, which are
        ``C`` outputs).
        """
        client_ids = [r.client_id for r in results]
        counts, usage, token_count, hidden_similarity = self._step_d_inputs(results, statistics)
        signs_by_size: dict[int, Tensor] = {}
        buckets = sketch_buckets(self.sketch_dim)  # a prime <= sketch_dim

        for expert in range(layer.num_experts):
            expert_record = expert_records[expert]
            if layer.has_lora_expert(expert):
                # LoRA experts: exact update cosines (a (C, P_e) matrix of deltas either way)
                self._aggregate_lora_expert(
                    layer,
                    expert,
                    global_parameters,
                    results,
                    (hidden_similarity[expert], counts, usage[:, expert], token_count[:, expert]),
                    parameters,
                    expert_record,
                )
                continue
            opening = _expert_start(
                layer, expert, global_parameters, parameters, client_ids, token_count, expert_record
            )
            if opening is None:
                continue
            active, previous = opening  # (C,), (P_e,)
            size = previous.numel()
            if size not in signs_by_size:
                signs_by_size[size] = sketch_signs(size)
            signs = signs_by_size[size]
            # pass 1: (theta_i - theta) * s in one fused pass per slice, then bucket sums
            negative_signed_previous = previous * signs
            negative_signed_previous.neg_()  # (P_e,)
            buffer = torch.empty(size)  # (P_e,)
            sketches = torch.zeros(len(results), buckets)  # (C, k); inactive rows 0
            for row, (result, is_active) in enumerate(zip(results, active.tolist(), strict=True)):
                if not is_active:
                    continue
                for start, part in expert_parts(layer, result.parameters, expert):
                    stop = start + part.numel()
                    torch.addcmul(
                        negative_signed_previous[start:stop],
                        part,
                        signs[start:stop],
                        out=buffer[start:stop],
                    )
                sketches[row] = fold_sketch(buffer, buckets)
            del negative_signed_previous
            decision = semantic_alignment(
                hidden_similarity[expert],
                cosine_gram(sketches),
                active,
                beta=self.beta,
                threshold_std=self.threshold_std,
                tolerance=self.consensus_tolerance,
            )
            aggregation_weights, membership = selection_weights(
                decision, active, counts, usage[:, expert], self.selection, self.eps
            )  # (C,)
            # pass 2: theta + sum_i w_i (theta_i - theta) = sum_i w_i theta_i + (1 - sum w) theta,
            # accumulated client by client over the clients with a weight
            merged = torch.zeros(size)  # (P_e,)
            for result, weight in zip(results, aggregation_weights.tolist(), strict=True):
                if weight == 0.0:
                    continue
                for start, part in expert_parts(layer, result.parameters, expert):
                    merged[start : start + part.numel()].add_(part, alpha=weight)
            remainder = 1.0 - float(aggregation_weights.double().sum())
            if remainder != 0.0:
                merged.add_(previous, alpha=remainder)
            write_expert_vector_in_place(layer, parameters, expert, merged)
            personal = None
            region_weights = None
            if self.personalized_experts:
                region_weights = personal_region_weights(
                    decision, active, self.personalize_include_self, self.consensus_tolerance
                )  # (C, C)
                personal = previous.expand(len(results), size).clone()  # (C, P_e)
                for row, result in enumerate(results):
                    if region_weights[:, row].any():
                        read_update_into(layer, result.parameters, expert, previous, buffer)
                        personal.addr_(region_weights[:, row], buffer)
            self._fill_expert_record(
                expert_record, client_ids, decision, active, aggregation_weights, membership
            )
            if personal is not None and region_weights is not None:
                has_region = region_weights.sum(dim=1) > 0  # (C,)
                for index, cid in enumerate(client_ids):
                    if has_region[index]:
                        personal_vectors[cid].append((layer, expert, personal[index]))

    @staticmethod
    def _personal_parameters(
        layout: MoELayout,
        parameters: Mapping[str, Tensor],
        global_parameters: Mapping[str, Tensor],
        personal_vectors: Mapping[int, list[tuple[MoELayerLayout, int, Tensor]]],
    ) -> dict[int, dict[str, Tensor]]:
        """Per client, its expert tensors: the new global ones with its personal experts."""
        expert_names = sorted(layout.expert_param_names())
        client_parameters: dict[int, dict[str, Tensor]] = {}
        for cid, vectors in personal_vectors.items():
            if not vectors:
                continue
            own = {name: parameters[name].clone() for name in expert_names}
            for layer, expert, vector in vectors:
                write_expert_vector_in_place(layer, own, expert, vector)
            client_parameters[cid] = cast_like_reference(own, global_parameters)
        return client_parameters


def read_update_into(
    layer: MoELayerLayout,
    state: Mapping[str, Tensor],
    expert: int,
    previous: Tensor,
    out: Tensor,
) -> Tensor:
    """``expert_vector(state, expert) - previous`` written into ``out`` (float32, ``(P_e,)``).

    Copies the expert's slices straight into the preallocated buffer (no concatenation,
    no new ``(P_e,)`` tensor per client).
    """
    offset = 0
    for expert_slice in layer.experts[expert]:
        part = expert_slice.read(state).reshape(-1)
        out[offset : offset + part.numel()].copy_(part)
        offset += part.numel()
    return out.sub_(previous)


def expert_parts(
    layer: MoELayerLayout, state: Mapping[str, Tensor], expert: int
) -> list[tuple[int, Tensor]]:
    """``(offset, flat view)`` of each slice of ``expert`` in ``state``: no copy, any dtype.

    Offsets are positions in :meth:`MoELayerLayout.expert_vector`'s order.
    """
    parts = []
    offset = 0
    for expert_slice in layer.experts[expert]:
        part = expert_slice.read(state).reshape(-1)
        parts.append((offset, part))
        offset += part.numel()
    return parts


def _expert_start(
    layer: MoELayerLayout,
    expert: int,
    global_parameters: Mapping[str, Tensor],
    parameters: dict[str, Tensor],
    client_ids: Sequence[int],
    token_count: Tensor,
    expert_record: dict[str, Any],
) -> tuple[Tensor, Tensor] | None:
    """Step D's start for one expert: its active clients ``(C,)`` and previous value
    ``(P_e,)``; ``None`` (with the record's fallback written) when there is nothing to merge:
    no trainable parameters, or no active client (the previous value is kept)."""
    active = token_count[:, expert] > 0  # (C,)
    expert_record["active"] = [cid for cid, a in zip(client_ids, active.tolist(), strict=True) if a]
    if not layer.experts[expert]:
        expert_record["fallback"] = "no-trainable-parameters"
        return None
    previous = layer.expert_vector(global_parameters, expert).float()  # (P_e,)
    if not active.any():
        expert_record["fallback"] = "no-active-client"
        write_expert_vector_in_place(layer, parameters, expert, previous)
        return None
    return active, previous
