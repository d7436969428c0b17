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

Choices of ours (docs/method.md's **[ours]** items) are constructor options of
:class:`FedAlignMoE` or documented in its Notes. Shapes: ``C`` clients in the round, ``E``
experts, ``H`` hidden width, ``P_e`` values in one expert.
"""

from __future__ import annotations

from fedalign.strategies.fedalign.options import (
    ABLATION_BASE_ROW,
    ABLATION_LEVEL,
    ABLATION_PRESETS,
    ABLATIONS,
    CONSISTENCY_SCORES,
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
