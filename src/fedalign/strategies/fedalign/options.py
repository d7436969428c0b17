"""FedAlign-MoE's options: ablation rows, method options, presets (config keys)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedalign.errors import OptionError, check_choice, check_option
from fedalign.routing import ROUTING_FORMS

Tensor = torch.Tensor


ABLATIONS = (
    "fedavg",  # row 1: direct parameter averaging
    "uniform-align",  # row 2: gate distribution alignment, omega = 1/|S_t|, alpha = 1
    "consistency",  # row 3: + consistency weights o * m
    "overlap-only",  # row 3 variant: o only
    "margin-only",  # row 3 variant: m only
    "adaptive-reg",  # row 4: + adaptive expert-level regularisation alpha_i(e)
    "full",  # row 5: + semantic-aware expert aggregation (FedAlign-MoE)
    "full-sound",  # row 5 with the sound options of ABLATION_PRESETS
    "full-sound-prox",  # full-sound + the client proximal term: the default ("ours")
)
"""The paper's ablation rows, and the rows of ours, as values of the ``ablation`` option."""

DEFAULT_ABLATION = "full-sound-prox"
"""The row ``--strategy fedalign`` runs: the configuration the evidence chose
(docs/method.md, "Which defaults the evidence chose")."""

ABLATION_BASE_ROW: dict[str, str] = {"full-sound": "full", "full-sound-prox": "full"}
"""The paper's row a row of ours runs (same components, different option values)."""


def _with_rows_of_ours(paper: Mapping[str, Any]) -> dict[str, Any]:
    """``paper`` plus each row of ours, with the value of the paper's row it runs."""
    return {**paper, **{row: paper[base] for row, base in ABLATION_BASE_ROW.items()}}


_PAPER_LEVEL: dict[str, int] = {
    "fedavg": 0,
    "uniform-align": 1,
    "consistency": 2,
    "overlap-only": 2,
    "margin-only": 2,
    "adaptive-reg": 3,
    "full": 4,
}
ABLATION_LEVEL: dict[str, int] = _with_rows_of_ours(_PAPER_LEVEL)
"""Row of the paper's ablation table each ablation switch belongs to (0-based)."""

_PAPER_SCORES: dict[str, str] = {
    "uniform-align": "uniform",
    "consistency": "overlap*margin",
    "overlap-only": "overlap",
    "margin-only": "margin",
    "adaptive-reg": "overlap*margin",
    "full": "overlap*margin",
}
CONSISTENCY_SCORES: dict[str, str] = _with_rows_of_ours(_PAPER_SCORES)
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

_SOUND_OPTIONS: dict[str, Any] = {
    "routing_form": "batch-kl",
    "routing_signal": "usage",
    "overlap": "intersection",
    "count_weighted": True,
    "semantic_centre": "centred",
    "selection": "soft",
}

ABLATION_PRESETS: dict[str, dict[str, Any]] = {
    "full-sound": dict(_SOUND_OPTIONS),
    "full-sound-prox": dict(_SOUND_OPTIONS),
}
"""Ablation rows that also fix method options (keys of :data:`METHOD_OPTION_DEFAULTS`)."""

ROW_PROXIMAL_MU: dict[str, float] = {"full-sound-prox": 0.01}
"""``client_proximal_mu`` of a row when the option is left at 0: the value chosen on the
validation splits of both embedded datasets at Dirichlet 0.1 (mean validation accuracy of
FedProx, nouns and verbs: 0.638 at mu 0.01, 0.621 at 0.1). Any other value is used as given;
the row without the term is ``full-sound``."""


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
    if row in ROW_PROXIMAL_MU:
        overrides["strategy.client-proximal-mu"] = ROW_PROXIMAL_MU[row]
    return overrides


@dataclass
class FedAlignOptions:
    """Options of :class:`FedAlignMoE` (config keys ``strategy.<name>``).

    Parameters
    ----------
    ablation : str, default "full-sound-prox"
        Ablation row, one of :data:`ABLATIONS`: ``full`` is the paper's method (row 5),
        ``full-sound`` row 5 with the sound method options (:data:`ABLATION_PRESETS`),
        ``full-sound-prox`` (the default) those plus the client proximal term.
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
        Client regulariser ``L_reg``: ``literal`` (docs/method.md's top-k masked terms
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
    sketch_dim : int, default 0
        Step D's update cosines ``D_ij(e)``: ``0`` computes them exactly from the stacked
        ``(C, P_e)`` updates; ``k > 0`` estimates them from seeded ``k``-value random-
        projection sketches of each client's update (see
        :func:`~fedalign.strategies.fedalign.semantic.sketch_vector`) and merges the experts
        in a second pass over the clients, so the server never stacks the clients' updates
        (memory ``O(C k)`` per expert plus one model). Decisions are then approximate.
    client_proximal_mu : float, default 0.0
        FedProx's proximal term ``mu/2 * ||w - w_global||^2`` added to every client's loss
        beside the routing regulariser (0: off, the paper's method). Not part of the paper:
        an anchor that, under AdamW, acts on every coordinate whose task gradient is small
        (docs/method.md, "Which defaults the evidence chose"). Left at 0 on the
        ``full-sound-prox`` row it becomes that row's value (:data:`ROW_PROXIMAL_MU`, 0.01).
    merge_strength : float, default 1.0
        How far the router-row and expert merges (steps C and D) follow FedAlign-MoE's
        weights: each merge uses ``rho * w + (1 - rho) * n_i / n`` (``rho`` this value, in
        ``[0, 1]``), so its total variation from the clients' data shares is at most
        ``rho``. 1 is the paper's method; 0 merges every tensor as FedAvg does (an expert no
        client routed to keeps its value) while the routing target ``p_g`` and the
        regulariser stay FedAlign-MoE's. Not in the paper.
    """

    ablation: str = DEFAULT_ABLATION
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
    sketch_dim: int = 0
    client_proximal_mu: float = 0.0
    merge_strength: float = 1.0

    def __post_init__(self) -> None:
        check_choice("ablation", self.ablation, ABLATIONS)
        check_option("client_proximal_mu", self.client_proximal_mu, minimum=0.0)
        if self.client_proximal_mu == 0.0 and self.ablation in ROW_PROXIMAL_MU:
            self.client_proximal_mu = ROW_PROXIMAL_MU[self.ablation]
        check_option("routing_lambda", self.routing_lambda, minimum=0.0)
        check_option("merge_strength", self.merge_strength, minimum=0.0, maximum=1.0)
        check_option("beta", self.beta, minimum=0.0)
        check_option("eps", self.eps, minimum=0.0, strict_minimum=True)
        check_choice("overlap", self.overlap, OVERLAPS)
        check_choice("routing_form", self.routing_form, ROUTING_FORMS)
        check_choice("routing_signal", self.routing_signal, ROUTING_SIGNALS)
        check_choice("semantic_centre", self.semantic_centre, SEMANTIC_CENTRES)
        check_choice("selection", self.selection, SELECTIONS)
        if isinstance(self.sketch_dim, bool) or not isinstance(self.sketch_dim, int):
            raise OptionError("sketch_dim", self.sketch_dim, "must be an integer")
        check_option("sketch_dim", self.sketch_dim, minimum=0)
        if self.personalized_experts and ABLATION_LEVEL[self.ablation] < ABLATION_LEVEL["full"]:
            raise OptionError(
                "personalized_experts",
                self.personalized_experts,
                "needs ablation = 'full', 'full-sound' or 'full-sound-prox'",
            )
        resolved = resolve_method_options(
            self.ablation, {key: getattr(self, key) for key in METHOD_OPTION_DEFAULTS}
        )
        for key, value in resolved.items():  # a preset row's values, as the run uses them
            setattr(self, key, value)
