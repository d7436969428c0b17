"""Routing math shared by clients and strategies: statistics, regularisers, divergences.

Everything here is a pure function of tensors (no model, no module hooks):

* :class:`RoutingStatisticsAccumulator` turns router logits and the hidden states entering
  an MoE layer into the per-expert statistics a client uploads (FedAlign-MoE client step 2):
  routing distribution ``pbar_i(e)``, usage ``u_i(e)``, decision margin ``m_i(e)``, mean
  routed hidden state ``mu_i(e)`` and token counts;
* :func:`privatize_mean_hidden` adds norm-relative Gaussian noise to ``mu_i(e)`` (privacy
  option for the hidden-state summaries that leave the client);
* :func:`routing_regularizer` is the FedAlign-MoE alignment loss ``L_reg`` (forms
  ``literal``, ``batch-kl``, ``topk-kl``) and
  :func:`load_balancing_loss` the Switch-Transformer auxiliary loss;
* :func:`jensen_shannon`, :func:`routing_divergence` and :func:`semantic_dispersion` are the
  per-round divergence metrics every strategy records.

Shapes: ``N`` tokens, ``E`` experts, ``H`` hidden width, ``C`` clients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedalign.protocol import LayerRoutingStatistics, RoutingStatistics

Tensor = torch.Tensor

ROUTING_FORMS = ("literal", "batch-kl", "topk-kl")
"""Forms of the client regulariser ``L_reg`` (see :func:`routing_regularizer`)."""

GLOBAL_ROUTING_FLOOR = 1e-8
"""Smallest value of ``p_g(e)`` inside the regulariser's logarithm (``log(p / p_g)``)."""


def _check_top_k(top_k: int, num_experts: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}] (got {top_k})")


def _routing_probabilities(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Softmax probabilities in float32 and the top-k membership mask.

    Parameters
    ----------
    logits : Tensor, shape (N, E)
    top_k : int

    Returns
    -------
    probabilities : Tensor, shape (N, E), float32
    routed : Tensor, shape (N, E), bool
        ``routed[x, e]`` is True when ``e`` is among the ``top_k`` experts of token ``x``.
    """
    probabilities = torch.softmax(logits.float(), dim=-1)
    selected = probabilities.topk(top_k, dim=-1).indices  # (N, k)
    routed = torch.zeros_like(probabilities, dtype=torch.bool)
    routed.scatter_(1, selected, True)
    return probabilities, routed


class RoutingStatisticsAccumulator:
    """Accumulates one MoE layer's routing statistics over batches of tokens.

    Feed it the router logits and the hidden states entering the layer for the (already
    padding-filtered) tokens of each batch, then call :meth:`result`. Per-token math is
    float32; the running sums are kept in float64 so that splitting the tokens into
    batches gives the same statistics as one big batch.

    Parameters
    ----------
    num_experts : int
        Routed experts ``E``.
    hidden_size : int
        Width ``H`` of the hidden states entering the layer.
    top_k : int
        Experts selected per token.

    Notes
    -----
    The margin of a token routed to ``e`` is ``p(x, e) - p(x, e_(k+1))`` where ``e_(k+1)`` is
    the best expert *not* selected. When ``top_k == num_experts`` every expert is selected
    and there is no ``(k+1)``-th probability; 0 is used in its place, so the margin equals
    ``p(x, e)``.
    """

    def __init__(self, num_experts: int, hidden_size: int, top_k: int) -> None:
        _check_top_k(top_k, num_experts)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.top_k = top_k
        self._probability_sum = torch.zeros(num_experts, dtype=torch.float64)
        self._token_count = torch.zeros(num_experts, dtype=torch.float64)
        self._margin_sum = torch.zeros(num_experts, dtype=torch.float64)
        self._hidden_sum = torch.zeros(num_experts, hidden_size, dtype=torch.float64)
        self._num_tokens = 0

    @torch.no_grad()
    def update(self, logits: Tensor, hidden: Tensor) -> None:
        """Add a batch of tokens.

        Parameters
        ----------
        logits : Tensor, shape (N, E)
            Router logits (any float dtype; leading dimensions are flattened).
        hidden : Tensor, shape (N, H)
            Hidden states entering the MoE layer for the same tokens.
        """
        logits = logits.detach().reshape(-1, self.num_experts)
        hidden = hidden.detach().reshape(-1, self.hidden_size)
        if logits.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"logits cover {logits.shape[0]} tokens but hidden states {hidden.shape[0]}"
            )
        if logits.shape[0] == 0:
            return
        if self._hidden_sum.device != logits.device:
            # sums live where the tokens are (a GPU): no per-batch transfer
            self._to(logits.device)
        probabilities, routed = _routing_probabilities(logits, self.top_k)  # (N, E) each
        if self.top_k < self.num_experts:
            # Best non-selected probability: the (k+1)-th largest of each row, shape (N, 1).
            runner_up = probabilities.topk(self.top_k + 1, dim=-1).values[:, -1:]
        else:
            runner_up = torch.zeros_like(probabilities[:, :1])
        routed_float = routed.float()
        margins = (probabilities - runner_up) * routed_float  # (N, E), 0 where not routed

        self._probability_sum += probabilities.double().sum(dim=0)
        self._token_count += routed_float.double().sum(dim=0)
        self._margin_sum += margins.double().sum(dim=0)
        # (E, N) @ (N, H) -> (E, H): sum of hidden states over the tokens routed to each expert.
        self._hidden_sum += routed_float.double().T @ hidden.float().double()
        self._num_tokens += int(logits.shape[0])

    def _to(self, device: torch.device) -> None:
        self._probability_sum = self._probability_sum.to(device)
        self._token_count = self._token_count.to(device)
        self._margin_sum = self._margin_sum.to(device)
        self._hidden_sum = self._hidden_sum.to(device)

    def result(self) -> LayerRoutingStatistics:
        """The statistics of all tokens seen so far (float32, on CPU).

        Experts that received no token get margin 0 and mean hidden state 0; with no token
        at all, every statistic is 0.
        """
        num_tokens = max(self._num_tokens, 1)
        routed_count = self._token_count.clamp(min=1.0)
        return LayerRoutingStatistics(
            routing_distribution=(self._probability_sum / num_tokens).float().cpu(),
            usage=(self._token_count / num_tokens).float().cpu(),
            margin=(self._margin_sum / routed_count).float().cpu(),
            mean_hidden=(self._hidden_sum / routed_count[:, None]).float().cpu(),
            token_count=self._token_count.float().cpu(),
            num_tokens=self._num_tokens,
        )


def privatize_mean_hidden(
    mean_hidden: Tensor, noise_std: float, generator: torch.Generator | None = None
) -> Tensor:
    """Add Gaussian noise relative to each row's norm to the mean hidden states ``mu_i(e)``.

    Row ``e`` becomes ``mu(e) + noise_std * ||mu(e)|| * z`` with ``z ~ N(0, I)``, so the noise
    is scale-free (a ``noise_std`` of 0.1 perturbs each summary by about 10% of its norm per
    coordinate). Rows that are zero (experts without tokens) stay zero.

    Parameters
    ----------
    mean_hidden : Tensor, shape (E, H)
    noise_std : float
        Relative noise scale; 0 returns ``mean_hidden`` itself.
    generator : torch.Generator or None, default None
        Source of randomness (for reproducible runs).

    Returns
    -------
    Tensor, shape (E, H)
    """
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0 (got {noise_std})")
    if noise_std == 0:
        return mean_hidden
    values = mean_hidden.float()
    row_norms = values.norm(dim=-1, keepdim=True)  # (E, 1)
    noise = torch.randn(values.shape, generator=generator, dtype=torch.float32)
    return (values + noise_std * row_norms * noise).to(mean_hidden.dtype)


def weighted_kl_terms(p: Tensor, log_p: Tensor, q: Tensor, alpha: Tensor) -> Tensor:
    """Per-entry terms ``alpha * (p log(p / q) - p + q)`` of a weighted KL divergence.

    Each term is ``>= 0`` and zero iff ``p = q`` (it is the Bregman divergence of ``x log x``),
    so the sum is a divergence for any weights ``alpha >= 0``. When ``p`` and ``q`` both sum
    to 1 and ``alpha`` is constant, the sum is ``alpha * KL(p || q)``: the ``- p + q`` parts
    cancel.

    Parameters
    ----------
    p : Tensor, shape (..., E)
    log_p : Tensor, shape (..., E)
        ``log p`` (passed in so a ``log_softmax`` keeps its precision).
    q : Tensor, shape (..., E) or (E,)
        Positive reference (a constant).
    alpha : Tensor, shape (E,)

    Returns
    -------
    Tensor, shape (..., E)
    """
    return alpha * (p * (log_p - q.log()) - p + q)


def _batch_kl_regularizer(logits: Tensor, target: Tensor, alpha: Tensor) -> Tensor:
    """``sum_e alpha(e) (pbar log(pbar / p_g) - pbar + p_g)`` of the batch mean ``pbar``."""
    log_probabilities = torch.log_softmax(logits, dim=-1)  # (N, E)
    # log pbar = logsumexp_x log p(x, e) - log N: stable even for tiny probabilities.
    log_mean = torch.logsumexp(log_probabilities, dim=0) - math.log(logits.shape[0])  # (E,)
    return weighted_kl_terms(log_mean.exp(), log_mean, target, alpha).sum()


def _topk_kl_regularizer(logits: Tensor, target: Tensor, alpha: Tensor, top_k: int) -> Tensor:
    """Mean over tokens of the weighted KL of ``p`` and ``p_g`` renormalised over ``TopK(x)``."""
    log_probabilities = torch.log_softmax(logits, dim=-1)  # (N, E)
    selected = log_probabilities.detach().topk(top_k, dim=-1).indices  # (N, k)
    # Renormalised over the selected experts: log p~ = log p - logsumexp_{TopK} log p.
    chosen_log_p = log_probabilities.gather(1, selected)  # (N, k)
    log_p = chosen_log_p - torch.logsumexp(chosen_log_p, dim=-1, keepdim=True)  # (N, k)
    chosen_target = target[selected]  # (N, k)
    q = chosen_target / chosen_target.sum(dim=-1, keepdim=True)  # (N, k)
    terms = weighted_kl_terms(log_p.exp(), log_p, q, alpha[selected])  # (N, k)
    return terms.sum(dim=-1).mean()


def routing_regularizer(
    logits: Tensor,
    global_routing: Tensor,
    expert_alpha: Tensor,
    top_k: int,
    floor: float = GLOBAL_ROUTING_FLOOR,
    form: str = "literal",
) -> Tensor:
    """FedAlign-MoE routing alignment loss ``L_reg`` in one of three forms.

    * ``"literal"`` (docs/method.md's literal reading, the default for now):
      ``L = mean_x sum_{e in TopK(x)} alpha(e) * p(x, e) * log(p(x, e) / p_g(e))``. Not a
      divergence: each term is smallest at ``p = p_g / e``, so it is *not* minimised at
      ``p = p_g`` and mostly penalises confident routing.
    * ``"batch-kl"``: with the batch's routing distribution ``pbar(e) = mean_x p(x, e)``,
      ``L = sum_e alpha(e) * (pbar(e) log(pbar(e) / p_g(e)) - pbar(e) + p_g(e))``, which is
      ``KL(pbar || p_g)`` for ``alpha = 1`` (docs/method.md's form) and stays ``>= 0``, zero iff
      ``pbar = p_g`` where ``alpha > 0``, for any per-expert ``alpha``.
    * ``"topk-kl"``: per token, ``p~(x, .)`` and ``p_g~`` are ``p(x, .)`` and ``p_g``
      renormalised over ``TopK(x)``; ``L = mean_x sum_{e in TopK(x)} alpha(e) (p~ log(p~ /
      p_g~) - p~ + p_g~)`` (``KL(p~ || p_g~)`` for ``alpha = 1``). Zero iff they agree on the
      chosen experts; identically zero for ``top_k = 1`` (a single renormalised entry is 1).

    The ``- p + q`` parts (see :func:`weighted_kl_terms`) are ours: they cancel for a
    constant ``alpha`` and keep each weighted term non-negative when ``alpha_i(e)`` varies.

    Parameters
    ----------
    logits : Tensor, shape (N, E)
        Router logits of ``N`` (padding-filtered) tokens; gradients flow into them.
    global_routing : Tensor, shape (E,)
        Global routing distribution ``p_g`` (treated as a constant).
    expert_alpha : Tensor, shape (E,)
        Per-expert strengths ``alpha(e)`` (treated as a constant).
    top_k : int
        Experts selected per token; only their terms count.
    floor : float, default GLOBAL_ROUTING_FLOOR
        ``p_g`` is clamped to at least this value inside the logarithm.
    form : {"literal", "batch-kl", "topk-kl"}, default "literal"
        See above.

    Returns
    -------
    Tensor, shape ()
        float32 scalar; 0 when ``N == 0``.
    """
    num_experts = logits.shape[-1]
    _check_top_k(top_k, num_experts)
    if form not in ROUTING_FORMS:
        raise ValueError(f"unknown routing form {form!r}; accepted: {list(ROUTING_FORMS)}")
    logits = logits.reshape(-1, num_experts).float()
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if form != "literal":
        target = global_routing.detach().float().to(logits.device).clamp(min=floor)  # (E,)
        target = target / target.sum()
        alpha = expert_alpha.detach().float().to(logits.device)  # (E,)
        if form == "batch-kl":
            return _batch_kl_regularizer(logits, target, alpha)
        return _topk_kl_regularizer(logits, target, alpha, top_k)
    log_probabilities = torch.log_softmax(logits, dim=-1)  # (N, E)
    probabilities = log_probabilities.exp()
    selected = probabilities.detach().topk(top_k, dim=-1).indices  # (N, k)
    routed = torch.zeros_like(probabilities).scatter_(1, selected, 1.0)  # (N, E) 0/1
    target = global_routing.detach().float().to(logits.device).clamp(min=floor)  # (E,)
    alpha = expert_alpha.detach().float().to(logits.device)  # (E,)
    per_entry = alpha * probabilities * (log_probabilities - target.log())  # (N, E)
    return (per_entry * routed).sum(dim=-1).mean()


def load_balancing_loss(logits: Tensor, top_k: int) -> Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the ``N * top_k`` expert assignments that go to ``e`` and
    ``P_e`` the mean routing probability of ``e``. Perfectly balanced routing gives 1.

    Parameters
    ----------
    logits : Tensor, shape (N, E)
    top_k : int

    Returns
    -------
    Tensor, shape ()
        float32 scalar, differentiable through ``P_e``; 0 when ``N == 0``.
    """
    num_experts = logits.shape[-1]
    _check_top_k(top_k, num_experts)
    logits = logits.reshape(-1, num_experts).float()
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    probabilities = torch.softmax(logits, dim=-1)  # (N, E)
    selected = probabilities.detach().topk(top_k, dim=-1).indices  # (N, k)
    routed = torch.zeros_like(probabilities).scatter_(1, selected, 1.0)  # (N, E)
    assignment_fraction = routed.mean(dim=0) / top_k  # (E,), sums to 1
    mean_probability = probabilities.mean(dim=0)  # (E,)
    return num_experts * (assignment_fraction * mean_probability).sum()


def _normalise_distributions(distributions: Tensor) -> Tensor:
    """Rows scaled to sum to 1 (float64); all-zero rows stay zero."""
    distributions = distributions.double().clamp(min=0.0)
    totals = distributions.sum(dim=-1, keepdim=True)
    return distributions / totals.clamp(min=torch.finfo(torch.float64).tiny)


def _jensen_shannon_rows(rows: Tensor, reference: Tensor) -> Tensor:
    """JS divergence (natural log) of each row of ``rows`` (C, E) against ``reference`` (E,)."""
    p = _normalise_distributions(rows)  # (C, E)
    q = _normalise_distributions(reference).expand_as(p)  # (C, E)
    mixture = 0.5 * (p + q)

    def kl_to_mixture(x: Tensor) -> Tensor:
        # 0 * log(0 / m) = 0: xlogy handles the zero entries.
        return (torch.xlogy(x, x) - torch.xlogy(x, mixture)).sum(dim=-1)

    divergence = 0.5 * kl_to_mixture(p) + 0.5 * kl_to_mixture(q)  # (C,)
    return divergence.clamp(min=0.0, max=math.log(2.0))


def jensen_shannon(p: Tensor, q: Tensor) -> float:
    """Jensen-Shannon divergence between two distributions over experts.

    Both inputs are renormalised to sum to 1. Natural logarithm, so the value lies in
    ``[0, ln 2]``.

    Parameters
    ----------
    p, q : Tensor, shape (E,)

    Returns
    -------
    float
    """
    return float(_jensen_shannon_rows(p.reshape(1, -1), q.reshape(-1))[0])


def _layer_names(client_stats: Sequence[RoutingStatistics]) -> list[str]:
    names: list[str] = []
    for stats in client_stats:
        for name in stats:
            if name not in names:
                names.append(name)
    return names


def routing_divergence(
    client_stats: Sequence[RoutingStatistics], global_routing: Mapping[str, Tensor] | None
) -> dict[str, dict[str, Any]]:
    """Gating preference divergence: JS between each client's routing and the global one.

    Parameters
    ----------
    client_stats : sequence of dict of str to LayerRoutingStatistics
        One entry per client, keyed by layer name.
    global_routing : dict of str to Tensor or None
        Per layer ``p_g`` (shape ``(E,)``). ``None``, or a layer missing from it, uses the
        plain mean of the clients' routing distributions as the reference.

    Returns
    -------
    dict
        ``{layer: {"mean_js": float, "max_js": float, "mean_usage_js": float,
        "max_usage_js": float, "num_clients": int}}``. The ``usage`` entries compare the
        clients' top-k usage shares (``u_i(e) / sum_e u_i(e)``) with their mean: routing
        *decisions* can diverge while the softmax distributions stay close (a fresh router
        with small logits). Clients that saw no token in a layer are left out of that
        layer; a layer nobody saw gets zeros and ``num_clients = 0``.
    """
    metrics: dict[str, dict[str, Any]] = {}
    for name in _layer_names(client_stats):
        rows = [
            stats[name].routing_distribution.float()
            for stats in client_stats
            if name in stats and stats[name].num_tokens > 0
        ]
        if not rows:
            metrics[name] = {
                "mean_js": 0.0,
                "max_js": 0.0,
                "mean_usage_js": 0.0,
                "max_usage_js": 0.0,
                "num_clients": 0,
            }
            continue
        distributions = torch.stack(rows)  # (C, E)
        if global_routing is not None and name in global_routing:
            reference = global_routing[name].float()
        else:
            reference = distributions.mean(dim=0)
        divergences = _jensen_shannon_rows(distributions, reference)  # (C,)
        usage = torch.stack(
            [
                stats[name].usage.float()
                for stats in client_stats
                if name in stats and stats[name].num_tokens > 0
            ]
        )  # (C, E)
        usage_shares = _normalise_distributions(usage)
        usage_divergences = _jensen_shannon_rows(usage_shares, usage_shares.mean(dim=0))  # (C,)
        metrics[name] = {
            "mean_js": float(divergences.mean()),
            "max_js": float(divergences.max()),
            "mean_usage_js": float(usage_divergences.mean()),
            "max_usage_js": float(usage_divergences.max()),
            "num_clients": len(rows),
        }
    return metrics


def semantic_dispersion(client_stats: Sequence[RoutingStatistics]) -> dict[str, dict[str, Any]]:
    """Expert semantic blurring: how differently clients use same-index experts.

    For each expert, the mean over pairs of distinct clients that both routed tokens to it
    of ``1 - cos(mu_i(e), mu_j(e))``; then the mean over experts. All pairs of one layer are
    computed with one batched product of normalised ``mu`` matrices.

    Parameters
    ----------
    client_stats : sequence of dict of str to LayerRoutingStatistics

    Returns
    -------
    dict
        ``{layer: {"mean_dispersion": float or None, "per_expert": [float or None, ...]}}``.
        Experts with fewer than two active clients have no pair: ``None`` and left out of
        the mean (``None`` when no expert has a pair).
    """
    metrics: dict[str, dict[str, Any]] = {}
    for name in _layer_names(client_stats):
        layer_stats = [stats[name] for stats in client_stats if name in stats]
        mean_hidden = torch.stack([s.mean_hidden.float() for s in layer_stats])  # (C, E, H)
        active = torch.stack([s.token_count.float() > 0 for s in layer_stats])  # (C, E)
        directions = F.normalize(mean_hidden, dim=-1)  # (C, E, H)
        cosine = torch.einsum("ceh,deh->ecd", directions, directions)  # (E, C, C)
        active_by_expert = active.T  # (E, C)
        pair_mask = active_by_expert[:, :, None] & active_by_expert[:, None, :]  # (E, C, C)
        pair_mask &= ~torch.eye(len(layer_stats), dtype=torch.bool)
        pair_counts = pair_mask.sum(dim=(1, 2))  # (E,)
        dispersion_sum = ((1.0 - cosine) * pair_mask).sum(dim=(1, 2))  # (E,)
        per_expert: list[float | None] = [
            float(total / count) if count > 0 else None
            for total, count in zip(dispersion_sum.tolist(), pair_counts.tolist(), strict=True)
        ]
        defined = [value for value in per_expert if value is not None]
        metrics[name] = {
            "mean_dispersion": sum(defined) / len(defined) if defined else None,
            "per_expert": per_expert,
        }
    return metrics
