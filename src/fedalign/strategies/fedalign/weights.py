"""FedAlign-MoE steps A and B: routing consistency weights and the global routing distribution.

Shapes: ``C`` clients in the round, ``E`` experts.
"""

from __future__ import annotations

import torch

from fedalign.strategies.fedalign.options import OVERLAPS, ROUTING_SIGNALS

Tensor = torch.Tensor


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
        The expert overlap ``o_i(e)``: ``sqrt(pbar_i(e) * p_g(e))`` (docs/method.md; ``p_g``
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
