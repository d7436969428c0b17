"""FedAlign-MoE step D: semantic-aware expert aggregation (similarities, consensus, selection).

Shapes: ``C`` clients in the round, ``E`` experts, ``H`` hidden width, ``P_e`` values in one
expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedalign.strategies.averaging import normalise_weights
from fedalign.strategies.fedalign.options import SELECTIONS, SEMANTIC_CENTRES

Tensor = torch.Tensor


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


SKETCH_SEED = 14
"""Seed of the update sketches' random signs (with the vector length; see :func:`sketch_signs`)."""


def sketch_signs(size: int, seed: int = SKETCH_SEED) -> Tensor:
    """The random ``+-1`` signs of :func:`sketch_vector` for vectors of ``size`` values.

    Seeded by ``seed`` and ``size`` only, so every client (and the server) draws the same
    signs for an expert without any message: a client could send its sketch alone.

    Returns
    -------
    Tensor, shape (size,), float32
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + size)
    return torch.randint(0, 2, (size,), generator=generator).float().mul_(2.0).sub_(1.0)


def sketch_buckets(sketch_dim: int) -> int:
    """Buckets of a ``sketch_dim`` sketch: the largest prime ``<= sketch_dim`` (1 for 1).

    The bucket of value ``p`` is ``p mod buckets``. Weight matrices are flattened row by
    row, so with a bucket count that shares a factor with the row length (``1024`` and
    ``H = 384``) a whole column lands in a few buckets, and updates whose energy sits in a few
    columns (outlier hidden dimensions) are sketched far worse. A prime count is coprime with
    every row length below it: a column is spread over all buckets.
    """
    if sketch_dim < 2:
        return max(sketch_dim, 1)
    for candidate in range(sketch_dim, 1, -1):
        if all(candidate % d for d in range(2, int(candidate**0.5) + 1)):
            return candidate
    return 2  # pragma: no cover - 2 is prime


def fold_sketch(signed: Tensor, sketch_dim: int) -> Tensor:
    """``y_b = sum_{p = b mod k} signed_p``: the bucket sums of :func:`sketch_vector`.

    Parameters
    ----------
    signed : Tensor, shape (P,)
        The vector already multiplied by its signs.
    sketch_dim : int
        ``k`` >= 1.

    Returns
    -------
    Tensor, shape (k,), float32
    """
    signed = signed.float()
    size = signed.numel()
    whole = size - size % sketch_dim
    sketch = signed[:whole].view(-1, sketch_dim).sum(dim=0) if whole else torch.zeros(sketch_dim)
    if whole < size:
        sketch[: size - whole] += signed[whole:]
    return sketch


def sketch_vector(vector: Tensor, signs: Tensor, sketch_dim: int) -> Tensor:
    """Random-projection sketch of ``vector`` (a CountSketch with buckets ``p mod k``).

    ``y_b = sum_{p = b mod k} s_p v_p`` with ``k = sketch_buckets(sketch_dim)`` (a prime)
    and random signs ``s_p`` (:func:`sketch_signs`):
    a linear map ``R^P -> R^k`` with ``E[<Sx, Sy>] = <x, y>`` and a standard deviation of
    about ``|x| |y| / sqrt(k)`` for vectors whose energy is spread over many coordinates
    (the sparse Johnson-Lindenstrauss transform with a fixed bucket map and random signs).
    Costs two passes over ``vector`` and no ``(P, k)`` matrix.

    Parameters
    ----------
    vector : Tensor, shape (P,)
    signs : Tensor, shape (P,)
    sketch_dim : int
        >= 1; the sketch has ``sketch_buckets(sketch_dim)`` values.

    Returns
    -------
    Tensor, shape (k,), float32
    """
    return fold_sketch(vector.float() * signs, sketch_buckets(sketch_dim))


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
