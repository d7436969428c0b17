"""FedAlign-MoE: aggregation alignment for federated MoE fine-tuning under data heterogeneity.

Implements the server side of FedAlign-MoE (Fang, Wang, An, Lin, Deng, Chen, Fang,
"Aggregation Alignment for Federated Learning with Mixture-of-Experts under Data
Heterogeneity", arXiv 2603.21276, 2026) as specified in ``docs/method.md``:

* client instructions: the routing regulariser ``lambda * L_reg`` towards the global routing
  distribution ``p_g`` with adaptive per-expert strengths ``alpha_i(e)``;
* A. routing consistency weights ``omega_i(e)`` from expert overlap and routing margin;
* B. the global routing distribution ``p_g^t``;
* C. router rows aggregated with ``omega``;
* D. semantic-aware expert aggregation over the semantically aligned clients only
  (optionally personalised starting experts);
* E. FedAvg for everything else.

Choices of ours (docs/method.md's **[ours]** items) are options of :class:`FedAlignOptions`
or listed here. Shapes: ``C`` clients in the round, ``E`` experts, ``H`` hidden width,
``P_e`` values in one expert.

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

Modules: :mod:`.options` (options, ablation rows, presets), :mod:`.client_side` (client
instructions), :mod:`.step_e` (step E, record head), :mod:`.weights` and :mod:`.routers`
(steps A-C), :mod:`.semantic` and :mod:`.experts` (step D), :mod:`.decisions` (records),
:mod:`.strategy` (the round's orchestration).
"""

from __future__ import annotations

from fedalign.strategies.fedalign.options import (
    ABLATION_BASE_ROW,
    ABLATION_LEVEL,
    ABLATION_PRESETS,
    ABLATIONS,
    CONSISTENCY_SCORES,
    DEFAULT_ABLATION,
    METHOD_OPTION_DEFAULTS,
    OVERLAPS,
    RECORDED_OPTIONS,
    ROUTING_SIGNALS,
    ROUTING_TERM,
    SELECTIONS,
    SEMANTIC_CENTRES,
    THRESHOLD_STD_CHOICES,
    FedAlignOptions,
    ablation_overrides,
    resolve_method_options,
)
from fedalign.strategies.fedalign.semantic import (
    SKETCH_SEED,
    SemanticDecision,
    cosine_gram,
    fold_sketch,
    hidden_similarities,
    personal_region_weights,
    selection_weights,
    semantic_alignment,
    semantic_centre_vector,
    sketch_buckets,
    sketch_signs,
    sketch_vector,
    soft_selection_factors,
)
from fedalign.strategies.fedalign.strategy import (
    FedAlignMoE,
)
from fedalign.strategies.fedalign.weights import (
    consistency_signal,
    consistency_weights,
    global_routing_distribution,
)

__all__ = [
    "ABLATIONS",
    "ABLATION_BASE_ROW",
    "ABLATION_LEVEL",
    "ABLATION_PRESETS",
    "CONSISTENCY_SCORES",
    "DEFAULT_ABLATION",
    "METHOD_OPTION_DEFAULTS",
    "OVERLAPS",
    "RECORDED_OPTIONS",
    "ROUTING_SIGNALS",
    "ROUTING_TERM",
    "SELECTIONS",
    "SEMANTIC_CENTRES",
    "SKETCH_SEED",
    "THRESHOLD_STD_CHOICES",
    "FedAlignMoE",
    "FedAlignOptions",
    "SemanticDecision",
    "ablation_overrides",
    "consistency_signal",
    "consistency_weights",
    "cosine_gram",
    "fold_sketch",
    "global_routing_distribution",
    "hidden_similarities",
    "personal_region_weights",
    "resolve_method_options",
    "selection_weights",
    "semantic_alignment",
    "semantic_centre_vector",
    "sketch_buckets",
    "sketch_signs",
    "sketch_vector",
    "soft_selection_factors",
]
