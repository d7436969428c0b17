"""Simulated malicious clients: model-poisoning updates for robustness measurements.

``federated.attack`` (simulator only) turns the honest result of each client in
``federated.attack-clients`` into a poisoned one before it reaches the server, on the
update ``d = theta_i - theta`` (client parameters minus the round's global ones):

* ``scale``: ``theta + attack_scale * d`` (a boosted update, e.g. ``1e3``);
* ``sign-flip``: ``theta - d`` (the update reversed).

Routing statistics, ``num_examples`` and metrics are left honest, so only the parameter
channel is attacked. The server's defences are :meth:`ServerState.screen`'s checks and
``federated.clip-update-norm``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from fedalign.config import ATTACKS
from fedalign.protocol import ClientResult

Tensor = torch.Tensor


def attack_factor(kind: str, scale: float) -> float:
    """The factor an attack multiplies the update by: ``scale``, ``-1`` or ``1`` (none)."""
    if kind == "scale":
        return float(scale)
    if kind == "sign-flip":
        return -1.0
    if kind == "none":
        return 1.0
    raise ValueError(f"unknown attack {kind!r}; accepted: {list(ATTACKS)}")


def poison_result(
    global_parameters: Mapping[str, Tensor], result: ClientResult, kind: str, scale: float
) -> ClientResult:
    """``result`` with every tensor ``theta + factor * (theta_i - theta)`` (see the module).

    Computed in float32 and cast back to the global tensor's dtype; ``none`` returns
    ``result`` itself.
    """
    factor = attack_factor(kind, scale)
    if factor == 1.0:
        return result
    parameters = dict(result.parameters)
    for name, reference in global_parameters.items():
        base = reference.float()
        delta = result.parameters[name].float() - base
        parameters[name] = (base + factor * delta).to(reference.dtype)
    return dataclasses.replace(result, parameters=parameters)
