"""Screening of client results before any strategy aggregates them, and update clipping.

:func:`result_problem` says what is wrong with one client's result (keys, shapes, dtypes,
finite values, routing statistics that are not distributions), :func:`check_results`
raises on the first problem; :func:`clip_update` scales an update whose norm exceeds a bound,
and :func:`norm_targets` says which updates of a round to clip and to what norm: an outlier
above a multiple of the median update norm (``federated.screen-norm-multiple``) to the norm
of the client nearest to it in training examples, and any update to an absolute bound
(``federated.clip-update-norm``). The server
screens once for both transports (:class:`fedalign.federation.ServerState`).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult
from fedalign.strategies.averaging import cast_like

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- checks
DISTRIBUTION_TOLERANCE = 1e-3
"""How far a client's ``routing_distribution`` may sum from 1, and ``usage`` stray
outside ``[0, 1]`` (float32 means over thousands of tokens are accurate to ~1e-6)."""

TOKEN_COUNT_TOLERANCE = 1e-3
"""Relative tolerance of ``sum(token_count) == top_k * num_tokens`` (plus half a token)."""


def parameter_problem(
    global_parameters: Mapping[str, Tensor], result: ClientResult, *, check_dtype: bool = True
) -> str | None:
    """Why ``result``'s parameters cannot be aggregated, or None when they can.

    Checks, in order: missing keys, extra keys, shapes, dtypes (when ``check_dtype``),
    non-finite values, and a negative ``num_examples``.
    """
    missing = [name for name in global_parameters if name not in result.parameters]
    if missing:
        return f"missing parameter {missing[0]!r}" + (
            f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        )
    extra = [name for name in result.parameters if name not in global_parameters]
    if extra:
        return f"unexpected parameter {extra[0]!r}" + (
            f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        )
    for name, reference in global_parameters.items():
        tensor = result.parameters[name]
        if not isinstance(tensor, Tensor):
            return f"parameter {name!r} is a {type(tensor).__name__}, not a tensor"
        if tensor.shape != reference.shape:
            return (
                f"parameter {name!r} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(reference.shape)}"
            )
        if check_dtype and tensor.dtype != reference.dtype:
            return f"parameter {name!r} has dtype {tensor.dtype}, expected {reference.dtype}"
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"parameter {name!r} has non-finite values"
    if int(result.num_examples) < 0:
        return f"num_examples is negative ({result.num_examples})"
    return None


def statistics_problem(
    result: ClientResult,
    layout: MoELayout,
    *,
    required: bool = False,
    allow_empty_hidden: bool = False,
) -> str | None:
    """Why ``result``'s routing statistics are not valid, or None when they are.

    Every reported layer must be a layer of ``layout``; with ``required`` every layer of
    ``layout`` must be reported. Per layer: shapes ``(E,)`` and ``(E, H)`` with ``H`` the
    layer's ``hidden_size`` (or ``(E, 0)`` with ``allow_empty_hidden``: the server measures
    the semantics itself, ``strategy.semantic-privacy = public-probe``), finite values,
    ``routing_distribution`` non-negative and summing to 1 (within
    :data:`DISTRIBUTION_TOLERANCE`; all zero when no token was seen), ``usage`` in
    ``[0, 1]``, ``token_count`` non-negative and summing to ``top_k * num_tokens`` (within
    :data:`TOKEN_COUNT_TOLERANCE`).
    """
    layers = {layer.name: layer for layer in layout.layers}
    statistics = result.routing_statistics
    unknown = [name for name in statistics if name not in layers]
    if unknown:
        return f"routing statistics for unknown MoE layer {unknown[0]!r}"
    if required:
        absent = [name for name in layers if name not in statistics]
        if absent:
            return f"no routing statistics for MoE layer {absent[0]!r}"
    tol = DISTRIBUTION_TOLERANCE
    for name, stats in statistics.items():
        experts = layers[name].num_experts
        where = f"routing statistics of layer {name!r}"
        vectors = {
            "routing_distribution": stats.routing_distribution,
            "usage": stats.usage,
            "margin": stats.margin,
            "token_count": stats.token_count,
        }
        for field_name, vector in vectors.items():
            if not isinstance(vector, Tensor) or tuple(vector.shape) != (experts,):
                shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector)
                return f"{where}: {field_name} has shape {shape}, expected ({experts},)"
            if not bool(torch.isfinite(vector).all()):
                return f"{where}: {field_name} has non-finite values"
        hidden = stats.mean_hidden
        width = layers[name].hidden_size
        widths = (width, 0) if allow_empty_hidden else (width,)
        if (
            not isinstance(hidden, Tensor)
            or hidden.dim() != 2
            or hidden.shape[0] != experts
            or hidden.shape[1] not in widths
        ):
            shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden)
            shapes = " or ".join(f"({experts}, {w})" for w in widths)
            return f"{where}: mean_hidden has shape {shape}, expected {shapes}"
        if not bool(torch.isfinite(hidden).all()):
            return f"{where}: mean_hidden has non-finite values"
        num_tokens = int(stats.num_tokens)
        if num_tokens < 0:
            return f"{where}: num_tokens is negative ({num_tokens})"
        distribution = stats.routing_distribution.double()
        if bool((distribution < 0).any()):
            return f"{where}: routing_distribution has negative values"
        total = float(distribution.sum())
        if num_tokens > 0 and abs(total - 1.0) > tol:
            return f"{where}: routing_distribution sums to {total:.6g}, not 1"
        usage = stats.usage.double()
        if bool((usage < -tol).any() | (usage > 1 + tol).any()):
            return f"{where}: usage outside [0, 1] (min {float(usage.min()):.6g}, max " + (
                f"{float(usage.max()):.6g})"
            )
        counts = stats.token_count.double()
        if bool((counts < 0).any()):
            return f"{where}: token_count has negative values"
        expected = layers[name].top_k * num_tokens
        if abs(float(counts.sum()) - expected) > TOKEN_COUNT_TOLERANCE * expected + 0.5:
            return (
                f"{where}: token counts sum to {float(counts.sum()):.6g}, expected top_k * "
                f"num_tokens = {layers[name].top_k} * {num_tokens} = {expected}"
            )
    return None


def result_problem(
    global_parameters: Mapping[str, Tensor],
    result: ClientResult,
    layout: MoELayout,
    *,
    require_statistics: bool = False,
    allow_empty_hidden: bool = False,
) -> str | None:
    """:func:`parameter_problem`, then :func:`statistics_problem`; None for a valid result."""
    return parameter_problem(global_parameters, result) or statistics_problem(
        result, layout, required=require_statistics, allow_empty_hidden=allow_empty_hidden
    )


def check_results(global_parameters: Mapping[str, Tensor], results: Sequence[ClientResult]) -> None:
    """Raise ``ValueError`` unless every result carries every global tensor with its shape,
    no other tensor, and only finite values.

    Parameters
    ----------
    global_parameters : dict of str to Tensor
    results : sequence of ClientResult

    Notes
    -----
    The server screens results with :func:`result_problem` before a strategy sees them
    (rejecting a bad client instead of failing the round); this is the strategies' own
    guard against being called with results nobody checked.
    """
    if not results:
        raise ValueError("no client results to aggregate")
    seen: set[int] = set()
    for result in results:
        if result.client_id in seen:
            raise ValueError(f"client {result.client_id} appears twice in the results")
        seen.add(result.client_id)
        problem = parameter_problem(global_parameters, result, check_dtype=False)
        if problem is not None:
            raise ValueError(f"client {result.client_id}: {problem}")


# --------------------------------------------------------------------------- clipping
def update_norm(global_parameters: Mapping[str, Tensor], parameters: Mapping[str, Tensor]) -> float:
    """L2 norm of ``parameters - global_parameters`` over every global tensor (float64)."""
    total = 0.0
    for name, reference in global_parameters.items():
        delta = parameters[name].double() - reference.double()
        total += float((delta * delta).sum())
    return total**0.5


@dataclass
class NormTargets:
    """What the norm screening does in one round (:func:`norm_targets`).

    Parameters
    ----------
    median : float or None
        The lower median of the update norms (None when the relative rule is off or has
        no scale: no norm, or a median of 0).
    outlier_bound : float or None
        ``multiple * median``: updates above it are outliers (None when the rule is off).
    targets : dict of int to float
        Client id -> the norm its update is scaled down to, for the clients to clip.
    """

    median: float | None
    outlier_bound: float | None
    targets: dict[int, float]


def norm_targets(
    norms: Mapping[int, float],
    multiple: float,
    max_norm: float,
    examples: Mapping[int, int] | None = None,
) -> NormTargets:
    """Which updates a round clips, and to what norm.

    ``median`` is the lower median of ``norms`` (for an even count the smaller of the two
    middle norms, so that with two clients an outlier is measured against the other one);
    the relative rule is off when ``multiple`` is 0, no norm was given, or the median is 0
    (half of the clients or more did not move: no scale to compare with). An update above
    ``multiple * median`` is an outlier: its size carries no information the server can
    trust, so it is scaled down (its direction kept) to the norm an honest update of its
    size has: the norm of the client, among the others, whose number of training examples
    is closest to its own (the lower median of their norms on a tie; the median when
    ``examples`` is not given). Under epoch-based local training an update's norm grows
    with the client's steps, so a large client is not shrunk to a small one's size nor a
    small one blown up to a large one's. With ``max_norm`` > 0 (``federated.clip-update-norm``)
    every update is also held to at most ``max_norm``.

    Parameters
    ----------
    norms : mapping of int to float
        Client id -> the L2 norm of its update, for the round's valid results.
    multiple : float
        ``federated.screen-norm-multiple``: 0 (off) or >= 1.
    max_norm : float
        ``federated.clip-update-norm``: 0 (off) or > 0.
    examples : mapping of int to int or None, default None
        Client id -> its ``num_examples`` (every client of ``norms``).
    """
    median = statistics.median_low(norms.values()) if multiple > 0 and norms else None
    if median is not None and median <= 0:
        median = None
    bound = multiple * median if median is not None else None
    inliers = {c: n for c, n in norms.items() if bound is None or n <= bound}
    targets: dict[int, float] = {}
    for client_id, norm in norms.items():
        target = norm
        if median is not None and client_id not in inliers:
            target = _honest_size(client_id, inliers, median, examples)
        if max_norm > 0:
            target = min(target, max_norm)
        if target < norm:
            targets[client_id] = target
    return NormTargets(median, bound, targets)


def _honest_size(
    client_id: int,
    inliers: Mapping[int, float],
    median: float,
    examples: Mapping[int, int] | None,
) -> float:
    """The norm an outlier is scaled to: the inlier norm of the client(s) nearest in number
    of training examples (lower median on a tie), or ``median`` without ``examples``."""
    if examples is None:
        return median
    distance = {c: abs(int(examples[c]) - int(examples[client_id])) for c in inliers}
    nearest = min(distance.values())
    return float(statistics.median_low(n for c, n in inliers.items() if distance[c] == nearest))


def clip_update(
    global_parameters: Mapping[str, Tensor],
    result: ClientResult,
    max_norm: float,
    norm: float | None = None,
) -> tuple[ClientResult, float]:
    """``result`` with its update scaled down to L2 norm ``max_norm``, and the norm before.

    A result whose update norm is at most ``max_norm`` is returned as is (the same object);
    otherwise every tensor becomes ``global + (client - global) * max_norm / norm``,
    computed in float32 and cast to the global tensor's dtype.

    Parameters
    ----------
    global_parameters : dict of str to Tensor
        What the update is measured from (the global parameters, or the client's
        personalised start).
    result : ClientResult
    max_norm : float
        > 0.
    norm : float or None, default None
        The update's norm when already known (:func:`update_norm`); computed otherwise.
    """
    if norm is None:
        norm = update_norm(global_parameters, result.parameters)
    if norm <= max_norm:
        return result, norm
    scale = max_norm / norm
    parameters = dict(result.parameters)
    for name, reference in global_parameters.items():
        delta = result.parameters[name].float() - reference.float()
        parameters[name] = cast_like(reference.float() + delta * scale, reference)
    return dataclasses.replace(result, parameters=parameters), norm
