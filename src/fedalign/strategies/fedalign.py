"""FedAlign-MoE: aggregation alignment for federated MoE fine-tuning under data heterogeneity.

Implements the server side of FedAlign-MoE (Fang, Wang, An, Lin, Deng, Chen, Fang,
"Aggregation Alignment for Federated Learning with Mixture-of-Experts under Data
Heterogeneity", arXiv 2603.21276, 2026) as specified in ``docs/METHOD.md``:

* client instructions: the routing regulariser ``lambda * L_reg`` towards the global routing
  distribution ``p_g`` with adaptive per-expert strengths ``alpha_i(e)``;
* A. routing consistency weights ``omega_i(e)`` from expert overlap and routing margin;
* B. the global routing distribution ``p_g^t``;
* C. router rows aggregated with ``omega``;
* D. semantic-aware expert aggregation over the semantically aligned clients only
  (optionally personalised starting experts);
* E. FedAvg for everything else.

Choices of ours (METHOD.md's **[ours]** items) are constructor options of
:class:`FedAlignMoE` or documented in its Notes. Shapes: ``C`` clients in the round, ``E``
experts, ``H`` hidden width, ``P_e`` values in one expert.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedalign.errors import OptionError, check_choice, check_option
from fedalign.moe.layout import MoELayerLayout, MoELayout
from fedalign.protocol import (
    ClientResult,
    LayerRoutingStatistics,
    LossTermSpec,
    TrainInstructions,
)
from fedalign.routing import ROUTING_FORMS
from fedalign.strategies.base import AggregationResult, Strategy, StrategyState
from fedalign.strategies.common import (
    base_record,
    cast_like_reference,
    check_results,
    client_expert_matrix,
    example_counts,
    example_weights,
    layer_statistics,
    normalise_weights,
    per_client,
    rounded,
    rounded_list,
    router_rows_average,
    routing_metrics,
    trainable_layout,
    weighted_average,
    write_expert_vector_in_place,
)

Tensor = torch.Tensor

ABLATIONS = (
    "fedavg",  # row 1: direct parameter averaging
    "uniform-align",  # row 2: gate distribution alignment, omega = 1/|S_t|, alpha = 1
    "consistency",  # row 3: + consistency weights o * m
    "overlap-only",  # row 3 variant: o only
    "margin-only",  # row 3 variant: m only
    "adaptive-reg",  # row 4: + adaptive expert-level regularisation alpha_i(e)
    "full",  # row 5: + semantic-aware expert aggregation (FedAlign-MoE)
    "full-sound",  # row 5 with the sound options of ABLATION_PRESETS ("ours")
)
"""The paper's ablation rows as values of the ``ablation`` option."""

ABLATION_LEVEL: dict[str, int] = {
    "fedavg": 0,
    "uniform-align": 1,
    "consistency": 2,
    "overlap-only": 2,
    "margin-only": 2,
    "adaptive-reg": 3,
    "full": 4,
    "full-sound": 4,
}
"""Row of the paper's ablation table each ablation switch belongs to (0-based)."""

CONSISTENCY_SCORES: dict[str, str] = {
    "uniform-align": "uniform",
    "consistency": "overlap*margin",
    "overlap-only": "overlap",
    "margin-only": "margin",
    "adaptive-reg": "overlap*margin",
    "full": "overlap*margin",
    "full-sound": "overlap*margin",
}
"""Consistency score ``s_i(e)`` used by each ablation (``fedavg`` uses none)."""

THRESHOLD_STD_CHOICES = ("population", "sample")

ROUTING_TERM = "routing-alignment"
"""The client loss term FedAlign-MoE asks for (``RoutingAlignmentTerm`` on the client)."""

RECORDED_OPTIONS = (
    "routing_form",
    "routing_signal",
    "count_weighted",
    "semantic_centre",
    "selection",
)
"""Method options whose non-default value adds ``"method_options"`` to the decision record
(``overlap`` predates the key: records of earlier runs with a non-default overlap lack it)."""


# ------------------------------------------------------------------ A/B: routing math
OVERLAPS = ("geometric", "bhattacharyya", "intersection")
"""Accepted definitions of the expert overlap ``o_i(e)`` (see :func:`consistency_weights`)."""

ROUTING_SIGNALS = ("softmax", "usage")
"""Routing signal of the consistency weights: ``pbar_i(e)`` or usage shares ``u_i(e) / k``."""
SEMANTIC_CENTRES = ("uncentred", "centred")
"""Whether ``mu_i(e)`` are centred on the layer's token-weighted mean before the cosines."""
SELECTIONS = ("hard", "soft")
"""Step D's client selection: the aligned set only, or every active client, sigmoid-weighted."""

METHOD_OPTION_DEFAULTS: dict[str, Any] = {
    "routing_form": "literal",
    "routing_signal": "softmax",
    "overlap": "geometric",
    "count_weighted": False,
    "semantic_centre": "uncentred",
    "selection": "hard",
}
"""FedAlign-MoE's method options and their defaults (the behaviour before the options)."""

ABLATION_PRESETS: dict[str, dict[str, Any]] = {
    "full-sound": {
        "routing_form": "batch-kl",
        "routing_signal": "usage",
        "overlap": "intersection",
        "count_weighted": True,
        "semantic_centre": "centred",
        "selection": "soft",
    },
}
"""Ablation rows that also fix method options (keys of :data:`METHOD_OPTION_DEFAULTS`)."""

ABLATION_BASE_ROW: dict[str, str] = {"full-sound": "full"}
"""The paper's row a preset row runs (same components, different option values)."""


def resolve_method_options(ablation: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The method options a FedAlign-MoE ablation row actually runs with.

    For a preset row (:data:`ABLATION_PRESETS`) every option still at its default
    (:data:`METHOD_OPTION_DEFAULTS`) takes the preset's value; an option set to a third
    value conflicts with the preset. Other rows return ``options`` as given.

    Parameters
    ----------
    ablation : str
        The ablation row.
    options : mapping of str to Any
        Values of (some of) the keys of :data:`METHOD_OPTION_DEFAULTS`; missing keys take
        their default.

    Returns
    -------
    dict of str to Any
        Every key of :data:`METHOD_OPTION_DEFAULTS`.

    Raises
    ------
    OptionError
        An option set to a value other than its default and the preset's.
    """
    unknown = set(options) - set(METHOD_OPTION_DEFAULTS)
    if unknown:
        raise OptionError("method options", sorted(unknown), "are unknown")
    resolved = {**METHOD_OPTION_DEFAULTS, **options}
    preset = ABLATION_PRESETS.get(ablation)
    if preset is None:
        return resolved
    for key, value in preset.items():
        given = resolved[key]
        if given == METHOD_OPTION_DEFAULTS[key]:
            resolved[key] = value
        elif given != value:
            raise OptionError(
                key,
                given,
                f"conflicts with ablation {ablation!r}, which sets it to {value!r} (use "
                f"ablation {ABLATION_BASE_ROW[ablation]!r} to combine options freely)",
            )
    return resolved


def ablation_overrides(row: str) -> dict[str, Any]:
    """Config keys (``section.key`` form, for ``--set``) that run ablation row ``row``.

    A paper row gives ``strategy.name`` and ``strategy.ablation``; a preset row gives its
    base row plus every option it fixes, spelled out, so the same run can be asked for
    with plain keys.

    >>> ablation_overrides("full-sound")["strategy.routing-form"]
    'batch-kl'
    """
    check_choice("ablation", row, ABLATIONS)
    overrides: dict[str, Any] = {
        "strategy.name": "fedalign",
        "strategy.ablation": ABLATION_BASE_ROW.get(row, row),
    }
    for key, value in ABLATION_PRESETS.get(row, {}).items():
        overrides[f"strategy.{key.replace('_', '-')}"] = value
    return overrides


def consistency_signal(
    routing_distribution: Tensor, usage: Tensor, top_k: int, signal: str = "softmax"
) -> Tensor:
    """The per-client routing signal the consistency weights compare (step A).

    Parameters
    ----------
    routing_distribution : Tensor, shape (C, E)
        Clients' softmax means ``pbar_i(e)``.
    usage : Tensor, shape (C, E)
        Clients' usage ``u_i(e)`` (fraction of tokens with ``e`` in their top-k; sums to
        ``top_k`` over experts).
    top_k : int
        Experts selected per token.
    signal : {"softmax", "usage"}, default "softmax"
        ``pbar_i(e)`` itself, or the usage shares ``u_i(e) / top_k`` (sum to 1).

    Returns
    -------
    Tensor, shape (C, E), float32
    """
    if signal == "softmax":
        return routing_distribution.float()
    if signal == "usage":
        return usage.float() / top_k
    raise ValueError(f"unknown routing signal {signal!r}; accepted: {list(ROUTING_SIGNALS)}")


@dataclass
class FedAlignOptions:
    """Options of :class:`FedAlignMoE` (config keys ``strategy.<name>``).

    Parameters
    ----------
    ablation : str, default "full"
        Ablation row, one of :data:`ABLATIONS`.
    routing_lambda : float, default 0.1
        Weight ``lambda`` of the routing regulariser (>= 0).
    beta : float, default 1.0
        Threshold ``tau_e = M(e) - beta * Sigma(e)`` of semantic aggregation (>= 0).
    eps : float, default 1e-6
        Floor that keeps consistency weights defined (> 0).
    overlap : str, default "geometric"
        Expert overlap ``o_i(e)``, one of :data:`OVERLAPS`.
    personalized_experts : bool, default False
        Clients start each round from their semantic region's experts (needs ``"full"`` or
        ``"full-sound"``).
    routing_form : str, default "literal"
        Client regulariser ``L_reg``: ``literal`` (METHOD.md's top-k masked terms
        ``p log(p / p_g)``; not a divergence), ``batch-kl`` (the batch's mean routing
        distribution against ``p_g``) or ``topk-kl`` (per token, both renormalised over its
        top-k experts); see :data:`fedalign.routing.ROUTING_FORMS`.
    routing_signal : str, default "softmax"
        What the consistency weights compare with the global reference: the softmax means
        ``pbar_i(e)`` or the usage shares ``u_i(e) / k`` (:data:`ROUTING_SIGNALS`).
    count_weighted : bool, default False
        Multiply the consistency score ``s_i(e)`` by the routed-token count ``count_i(e)``.
    semantic_centre : str, default "uncentred"
        ``centred``: subtract the layer's token-count-weighted mean of all ``mu_i(e)`` before
        the semantic cosines ``S_ij(e)``; ``uncentred``: raw cosines.
    selection : str, default "hard"
        Step D: ``hard`` merges the aligned set ``A_e`` only; ``soft`` keeps every active
        client with weight ``n_i u_i(e) sigmoid((c_i(e) - tau_e) / max(Sigma(e), eps))``.
    """

    ablation: str = "full"
    routing_lambda: float = 0.1
    beta: float = 1.0
    eps: float = 1e-6
    overlap: str = "geometric"
    personalized_experts: bool = False
    routing_form: str = "literal"
    routing_signal: str = "softmax"
    count_weighted: bool = False
    semantic_centre: str = "uncentred"
    selection: str = "hard"

    def __post_init__(self) -> None:
        check_choice("ablation", self.ablation, ABLATIONS)
        check_option("routing_lambda", self.routing_lambda, minimum=0.0)
        check_option("beta", self.beta, minimum=0.0)
        check_option("eps", self.eps, minimum=0.0, strict_minimum=True)
        check_choice("overlap", self.overlap, OVERLAPS)
        check_choice("routing_form", self.routing_form, ROUTING_FORMS)
        check_choice("routing_signal", self.routing_signal, ROUTING_SIGNALS)
        check_choice("semantic_centre", self.semantic_centre, SEMANTIC_CENTRES)
        check_choice("selection", self.selection, SELECTIONS)
        if self.personalized_experts and ABLATION_LEVEL[self.ablation] < ABLATION_LEVEL["full"]:
            raise OptionError(
                "personalized_experts",
                self.personalized_experts,
                "needs ablation = 'full' or 'full-sound'",
            )
        resolve_method_options(
            self.ablation,
            {
                "routing_form": self.routing_form,
                "routing_signal": self.routing_signal,
                "overlap": self.overlap,
                "count_weighted": self.count_weighted,
                "semantic_centre": self.semantic_centre,
                "selection": self.selection,
            },
        )


def consistency_weights(
    routing_distribution: Tensor,
    margin: Tensor,
    previous_global_routing: Tensor,
    score: str = "overlap*margin",
    eps: float = 1e-6,
    overlap: str = "geometric",
    token_count: Tensor | None = None,
) -> Tensor:
    """Routing consistency weights ``omega_i(e) = s_i(e) / sum_j s_j(e)`` (step A).

    Parameters
    ----------
    routing_distribution : Tensor, shape (C, E)
        Clients' routing signal: ``pbar_i(e)``, or the usage shares ``u_i(e) / k`` (see
        :func:`consistency_signal`).
    margin : Tensor, shape (C, E)
        Clients' routing margins ``m_i(e)``.
    previous_global_routing : Tensor, shape (E,)
        The global reference in the same signal: ``p_g^{t-1}`` (in round 1 the plain mean
        of the clients' signals).
    score : {"overlap*margin", "overlap", "margin", "uniform"}, default "overlap*margin"
        ``s = o * m``, ``s = o``, ``s = m`` with ``o_i(e) = sqrt(pbar_i(e) * p_g^{t-1}(e))``,
        or ``omega = 1 / C``.
    eps : float, default 1e-6
        Floor on ``s``, so an expert nobody scores gets uniform weights.
    overlap : {"geometric", "bhattacharyya", "intersection"}, default "geometric"
        The expert overlap ``o_i(e)``: ``sqrt(pbar_i(e) * p_g(e))`` (METHOD.md; ``p_g``
        cancels in the normalisation over clients), the Bhattacharyya coefficient
        ``sum_e' sqrt(pbar_i(e') * p_g(e'))`` of the client's whole routing distribution
        with ``p_g`` (one value per client), or ``min(pbar_i(e), p_g(e))``.
    token_count : Tensor of shape (C, E) or None, default None
        When given, ``s_i(e)`` is multiplied by the routed-token count ``count_i(e)``
        (before the ``eps`` floor), so a client with one routed token cannot outweigh one
        with thousands. Not applied to ``score = "uniform"``.

    Returns
    -------
    Tensor, shape (C, E)
        Columns sum to 1.
    """
    routing_distribution = routing_distribution.float()
    num_clients = routing_distribution.shape[0]
    if score == "uniform":
        return torch.full_like(routing_distribution, 1.0 / num_clients)
    reference = previous_global_routing.float()[None, :]  # (1, E)
    if overlap == "geometric":
        expert_overlap = (routing_distribution * reference).clamp(min=0).sqrt()  # (C, E)
    elif overlap == "bhattacharyya":
        coefficient = (routing_distribution * reference).clamp(min=0).sqrt().sum(dim=1)  # (C,)
        expert_overlap = coefficient[:, None].expand_as(routing_distribution)  # (C, E)
    elif overlap == "intersection":
        expert_overlap = torch.minimum(routing_distribution, reference)  # (C, E)
    else:
        raise ValueError(f"unknown overlap {overlap!r}; accepted: {list(OVERLAPS)}")
    if score == "overlap*margin":
        raw_score = expert_overlap * margin.float()
    elif score == "overlap":
        raw_score = expert_overlap
    elif score == "margin":
        raw_score = margin.float()
    else:
        raise ValueError(
            f"unknown consistency score {score!r}; accepted: "
            "['overlap*margin', 'overlap', 'margin', 'uniform']"
        )
    if token_count is not None:
        raw_score = raw_score * token_count.float()
    floored = raw_score.clamp(min=eps)  # (C, E)
    return floored / floored.sum(dim=0, keepdim=True)


def global_routing_distribution(routing_distribution: Tensor, weights: Tensor) -> Tensor:
    """``p_g^t(e) = sum_i omega_i(e) * pbar_i(e)`` renormalised over experts (step B).

    Parameters
    ----------
    routing_distribution : Tensor, shape (C, E)
    weights : Tensor, shape (C, E)

    Returns
    -------
    Tensor, shape (E,)
        Sums to 1 (uniform if every ``pbar`` is 0).
    """
    combined = (weights.float() * routing_distribution.float()).sum(dim=0)  # (E,)
    total = combined.sum()
    if total <= 0:
        return torch.full_like(combined, 1.0 / combined.numel())
    return combined / total


# -------------------------------------------------------------- D: semantic alignment
def cosine_gram(vectors: Tensor, eps: float = 1e-12) -> Tensor:
    """Pairwise cosine similarities of the rows, from one matrix product.

    ``(V V^T)_ij / (max(|v_i|, eps) * max(|v_j|, eps))``, i.e. the Gram matrix of the
    normalised rows (as :func:`torch.nn.functional.normalize` would give) without writing a
    normalised ``(C, P)`` copy. Zero rows have similarity 0 with everything.

    Parameters
    ----------
    vectors : Tensor, shape (C, P)
    eps : float, default 1e-12

    Returns
    -------
    Tensor, shape (C, C), values in [-1, 1]
    """
    gram = vectors @ vectors.T  # (C, C)
    norms = vectors.norm(dim=1).clamp(min=eps)  # (C,)
    return (gram / (norms[:, None] * norms[None, :])).clamp(-1.0, 1.0)


def semantic_centre_vector(mean_hidden: Tensor, token_count: Tensor) -> Tensor:
    """Token-count-weighted mean of all ``mu_i(e)`` of a layer over clients and experts.

    ``c = sum_{i,e} count_i(e) mu_i(e) / sum_{i,e} count_i(e)``; zero when no token.

    Parameters
    ----------
    mean_hidden : Tensor, shape (C, E, H)
    token_count : Tensor, shape (C, E)

    Returns
    -------
    Tensor, shape (H,), float32
    """
    weights = token_count.double()  # (C, E)
    total = weights.sum()
    if total <= 0:
        return torch.zeros(mean_hidden.shape[-1])
    weighted = torch.einsum("ce,ceh->h", weights, mean_hidden.double())  # (H,)
    return (weighted / total).float()


def hidden_similarities(
    mean_hidden: Tensor, token_count: Tensor, centre: str = "uncentred"
) -> Tensor:
    """Semantic similarities ``S_ij(e)`` of one layer, all experts at once.

    ``cos(mu_i(e) - c, mu_j(e) - c)`` with ``c`` = :func:`semantic_centre_vector`
    (``centred``) or ``c = 0`` (``uncentred``). Entries of clients with ``count_i(e) = 0``
    stay zero vectors (similarity 0), centred or not.

    Parameters
    ----------
    mean_hidden : Tensor, shape (C, E, H)
    token_count : Tensor, shape (C, E)
    centre : {"uncentred", "centred"}, default "uncentred"

    Returns
    -------
    Tensor, shape (E, C, C)
    """
    mean_hidden = mean_hidden.float()
    if centre == "centred":
        centre_vector = semantic_centre_vector(mean_hidden, token_count)  # (H,)
        active = (token_count > 0).float()[:, :, None]  # (C, E, 1)
        mean_hidden = (mean_hidden - centre_vector) * active
    elif centre != "uncentred":
        raise ValueError(f"unknown semantic centre {centre!r}; accepted: {list(SEMANTIC_CENTRES)}")
    directions = F.normalize(mean_hidden, dim=-1)  # (C, E, H), zero rows stay zero
    # (C, E, H) x (C, E, H) -> (E, C, C).
    return torch.einsum("ceh,deh->ecd", directions, directions)


@dataclass
class SemanticDecision:
    """Step D's decision for one expert of one layer.

    Parameters
    ----------
    gamma : Tensor, shape (C, C)
        ``gamma_ij = S_ij * max(D_ij, 0)``.
    consensus : Tensor, shape (C,)
        ``c_i``; NaN for inactive clients (and for everyone when fewer than two are active).
    threshold : float or None
        ``tau_e = M - beta * Sigma``; ``None`` when fewer than two clients are active.
    aligned : Tensor, shape (C,), bool
        Clients whose updates are aggregated (``A_e``, or the active clients on fallback).
    fallback : str or None
        ``"no-active-client"``, ``"single-active-client"``, ``"empty-aligned-set"`` or None.
    spread : float or None, default None
        ``Sigma``, the standard deviation of the active clients' ``c_i``; ``None`` when
        fewer than two clients are active.
    """

    gamma: Tensor
    consensus: Tensor
    threshold: float | None
    aligned: Tensor
    fallback: str | None
    spread: float | None = None


def semantic_alignment(
    hidden_similarity: Tensor,
    update_similarity: Tensor,
    active: Tensor,
    beta: float = 1.0,
    threshold_std: str = "population",
    tolerance: float = 1e-6,
) -> SemanticDecision:
    """Which clients' updates of one expert are semantically aligned (step D).

    Parameters
    ----------
    hidden_similarity : Tensor, shape (C, C)
        ``S_ij = cos(mu_i(e), mu_j(e))``.
    update_similarity : Tensor, shape (C, C)
        ``D_ij = cos(dtheta_i(e), dtheta_j(e))``.
    active : Tensor, shape (C,), bool
        ``count_i(e) > 0``.
    beta : float, default 1.0
        ``tau_e = M - beta * Sigma``.
    threshold_std : {"population", "sample"}, default "population"
        Standard deviation ``Sigma`` of the ``c_i`` over the active clients with divisor
        ``n`` (population) or ``n - 1`` (sample).
    tolerance : float, default 1e-6
        ``c_i >= tau_e - tolerance`` counts as aligned, so rounding cannot drop a client
        when all ``c_i`` are equal (``Sigma = 0``).

    Returns
    -------
    SemanticDecision
    """
    num_clients = active.numel()
    gamma = hidden_similarity.float() * update_similarity.float().clamp(min=0.0)  # (C, C)
    consensus = torch.full((num_clients,), float("nan"))
    num_active = int(active.sum())
    if num_active == 0:
        return SemanticDecision(gamma, consensus, None, active.clone(), "no-active-client")
    if num_active == 1:
        return SemanticDecision(gamma, consensus, None, active.clone(), "single-active-client")
    # c_i = mean over active j != i of gamma_ij: mask (C, C) keeps active columns off the diagonal.
    others = active[None, :] & ~torch.eye(num_clients, dtype=torch.bool)
    consensus_all = (gamma * others.float()).sum(dim=1) / (num_active - 1)  # (C,)
    consensus = torch.where(active, consensus_all, consensus)
    active_consensus = consensus_all[active]  # (n_active,)
    spread = active_consensus.std(correction=0 if threshold_std == "population" else 1)
    threshold = float(active_consensus.mean() - beta * spread)
    aligned = active & (consensus_all >= threshold - tolerance)
    if not aligned.any():
        return SemanticDecision(
            gamma, consensus, threshold, active.clone(), "empty-aligned-set", float(spread)
        )
    return SemanticDecision(gamma, consensus, threshold, aligned, None, float(spread))


def soft_selection_factors(decision: SemanticDecision, active: Tensor, eps: float = 1e-6) -> Tensor:
    """Soft membership ``sigmoid((c_i - tau) / max(Sigma, eps))`` of every active client.

    Parameters
    ----------
    decision : SemanticDecision
    active : Tensor, shape (C,), bool
    eps : float, default 1e-6
        Floor on ``Sigma`` (all ``c_i`` equal gives factor 1/2 for everyone).

    Returns
    -------
    Tensor, shape (C,)
        0 for inactive clients; 1 for every active client when no threshold exists (fewer
        than two active clients).
    """
    if decision.threshold is None or decision.spread is None:
        return active.float()
    scale = max(decision.spread, eps)
    consensus = torch.nan_to_num(decision.consensus.float(), nan=0.0)  # (C,)
    factors = torch.sigmoid((consensus - decision.threshold) / scale)  # (C,)
    return factors * active.float()


def selection_weights(
    decision: SemanticDecision,
    active: Tensor,
    num_examples: Tensor,
    usage: Tensor,
    selection: str = "hard",
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Step D's merge weights ``w_i(e)`` for one expert.

    * ``hard``: ``w_i ∝ n_i u_i(e)`` over the aligned set (``decision.aligned``);
    * ``soft``: ``w_i ∝ n_i u_i(e) sigmoid((c_i - tau) / max(Sigma, eps))`` over every active
      client (see :func:`soft_selection_factors`).

    If the usage-weighted values are all 0, ``n_i`` times the membership is used, then the
    membership alone.

    Parameters
    ----------
    decision : SemanticDecision
    active : Tensor, shape (C,), bool
    num_examples : Tensor, shape (C,)
        ``n_i``.
    usage : Tensor, shape (C,)
        ``u_i(e)``.
    selection : {"hard", "soft"}, default "hard"
    eps : float, default 1e-6

    Returns
    -------
    weights : Tensor, shape (C,)
        Sum to 1 (zero outside the membership).
    membership : Tensor, shape (C,)
        The 0/1 aligned indicator (hard) or the soft factors (soft).
    """
    if selection == "hard":
        membership = decision.aligned.float()
    elif selection == "soft":
        membership = soft_selection_factors(decision, active, eps)
    else:
        raise ValueError(f"unknown selection {selection!r}; accepted: {list(SELECTIONS)}")
    weights = normalise_weights(
        num_examples * usage * membership, num_examples * membership, membership
    )
    return weights, membership


def personal_region_weights(
    decision: SemanticDecision, active: Tensor, include_self: bool = True, tolerance: float = 1e-6
) -> Tensor:
    """Row ``i``: client ``i``'s weights over the clients in its semantic region.

    Region of active client ``i`` = active ``j`` with ``gamma_ij >= tau_e`` (and > 0), plus
    ``i`` itself with ``gamma_ii = 1`` when ``include_self``. Weights are ``gamma_ij``
    normalised over the region. Without a threshold (fewer than two active clients) the
    region is ``i`` alone.

    Parameters
    ----------
    decision : SemanticDecision
    active : Tensor, shape (C,), bool
    include_self : bool, default True
    tolerance : float, default 1e-6

    Returns
    -------
    Tensor, shape (C, C)
        Rows sum to 1, or are all zero (inactive client, or an empty region).
    """
    num_clients = active.numel()
    gamma = decision.gamma.clone()
    if decision.threshold is None:
        in_region = torch.zeros(num_clients, num_clients, dtype=torch.bool)
    else:
        in_region = (gamma >= decision.threshold - tolerance) & (gamma > 0) & active[None, :]
    diagonal = torch.eye(num_clients, dtype=torch.bool)
    in_region &= ~diagonal
    if include_self:
        gamma[diagonal] = 1.0
        in_region |= diagonal
    in_region &= active[:, None]  # rows of inactive clients stay empty
    region_gamma = gamma * in_region.float()  # (C, C)
    totals = region_gamma.sum(dim=1, keepdim=True)  # (C, 1)
    return torch.where(totals > 0, region_gamma / totals.clamp(min=1e-12), 0.0)


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
        :func:`consistency_weights`. ``"geometric"`` is METHOD.md's.
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

    Notes
    -----
    Choices of ours beyond METHOD.md:

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
        layer); with ``personalized_experts``, the client's stored personalised experts.
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
        """Steps A-E of FedAlign-MoE (see the module docstring and METHOD.md).

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
        """
        check_results(global_parameters, results)
        layout = trainable_layout(self.layout, global_parameters)
        weights = example_weights(results)  # (C,)
        parameters = weighted_average(global_parameters, results, weights)
        record = base_record(self.name, server_round, results, weights)
        record["ablation"] = self.ablation
        record["routing_lambda"] = self.routing_lambda
        options = self.method_options()
        if any(options[key] != METHOD_OPTION_DEFAULTS[key] for key in RECORDED_OPTIONS):
            record["method_options"] = options
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
                self._aggregate_experts(
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
        counts = example_counts(results)  # (C,)
        usage = torch.stack([s.usage.float() for s in statistics])  # (C, E)
        token_count = torch.stack([s.token_count.float() for s in statistics])  # (C, E)
        mean_hidden = torch.stack([s.mean_hidden.float() for s in statistics])  # (C, E, H)
        # S for all experts at once: (E, C, C).
        hidden_similarity = hidden_similarities(mean_hidden, token_count, self.semantic_centre)

        for expert in range(layer.num_experts):
            expert_record = expert_records[expert]
            active = token_count[:, expert] > 0  # (C,)
            expert_record["active"] = [
                cid for cid, a in zip(client_ids, active.tolist(), strict=True) if a
            ]
            if not layer.experts[expert]:
                expert_record["fallback"] = "no-trainable-parameters"
                continue
            previous = layer.expert_vector(global_parameters, expert).float()  # (P_e,)
            if not active.any():
                expert_record["fallback"] = "no-active-client"
                write_expert_vector_in_place(layer, parameters, expert, previous)
                continue
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

            expert_record["consensus"] = {
                str(cid): rounded(c)
                for cid, c, a in zip(
                    client_ids, decision.consensus.tolist(), active.tolist(), strict=True
                )
                if a and not math.isnan(c)  # NaN: no consensus defined (< 2 active)
            }
            expert_record["tau"] = (
                None if decision.threshold is None else rounded(decision.threshold)
            )
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
                    for cid, m, a in zip(
                        client_ids, membership.tolist(), active.tolist(), strict=True
                    )
                    if a
                }

            if self.personalized_experts:
                region_weights = personal_region_weights(
                    decision, active, self.personalize_include_self, self.consensus_tolerance
                )  # (C, C)
                personal = previous + region_weights @ updates  # (C, P_e)
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
