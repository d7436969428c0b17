"""Evaluation of the global model: the global test set, the server's validation set and the
clients' local test splits.

The validation set (``data.validation-examples``, held out of the training pool) goes
through the same :func:`~fedalign.client.evaluate` as the test set; benchmarks tune knobs
on it so that nothing is selected on the test set.

Per-client figures follow the evaluation rules (docs/method.md): the mean, the worst and
the 10th percentile of local accuracy are all taken over the same clients, those with at
least ``federated.min-local-test`` local test examples (a worst client measured on four
examples says little), and ``local_clients_evaluated`` counts them. When no client has that
many, mean and worst fall back to every client with a local split (the count says how
many) and the percentile is absent.

Diagnostics of where accuracy goes: the global model's accuracy per class
(``class_accuracy``), how much each MoE layer's expert choice says about the class on the
global test set (``expert_specialisation``: falling over rounds = experts blurring), and,
when the round's client results are given, the routing breakdown:
each client's local accuracy with its own trained router(s) against the global router(s),
every other tensor global (``own_router_gain``: positive when the client's own gating
would serve it better, i.e. when gating divergence costs it accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedalign.client import PreparedData, evaluate, expert_specialisation
from fedalign.models import MoEModel
from fedalign.protocol import ClientResult

Tensor = torch.Tensor


def evaluate_global(
    model: MoEModel,
    data: PreparedData,
    global_parameters: Mapping[str, Tensor],
    min_local_test: int = 20,
    results: Sequence[ClientResult] = (),
) -> dict[str, Any]:
    """Global test accuracy and loss; local test accuracy per client.

    Parameters
    ----------
    model : MoEModel
        Receives ``global_parameters``.
    data : PreparedData
        Its global test set, validation set (when any) and every prepared client's local
        test rows.
    global_parameters : mapping of str to Tensor
    min_local_test : int, default 20
        Clients with at least this many local test examples enter ``local_accuracy_p10``.
    results : sequence of ClientResult, default ()
        The round's client results: with them, the routing breakdown
        (:func:`routing_breakdown`).

    Returns
    -------
    dict
        ``global_accuracy``, ``global_loss``; ``mean_local_accuracy``,
        ``worst_local_accuracy`` and ``local_accuracy_p10`` over the same clients (see the
        module docstring), ``local_clients_evaluated`` (how many) and
        ``local_clients_with_test`` (clients with any local split); ``local_accuracy``
        (list, every client with a split, client order); ``class_accuracy`` (the global test
        set's accuracy per label id, None for a label without test examples);
        ``expert_specialisation`` (per MoE layer, the normalised mutual information between
        the experts the global test set's tokens are routed to and their class,
        :func:`~fedalign.client.evaluation.expert_specialisation`; empty for multiple
        choice) and its mean ``expert_specialisation_mean``;
        ``validation_accuracy`` and ``validation_loss`` only when ``data`` has a validation
        set; the keys of :func:`routing_breakdown` when ``results`` are given.
    """
    model.load_trainable_state(global_parameters)
    global_eval = evaluate(model, data.test, expert_classes=True)
    by_client = local_accuracies(model, data)
    local = list(by_client.values())
    sized = [a for c, a in by_client.items() if len(data.client_test[c]) >= min_local_test]
    counted = sized or local
    validation: dict[str, Any] = {}
    if data.validation is not None and len(data.validation) > 0:
        validation_eval = evaluate(model, data.validation)
        validation = {
            "validation_accuracy": validation_eval.accuracy,
            "validation_loss": validation_eval.loss,
        }
    return {
        "global_accuracy": global_eval.accuracy,
        "global_loss": global_eval.loss,
        "mean_local_accuracy": float(np.mean(counted)) if counted else None,
        "worst_local_accuracy": float(np.min(counted)) if counted else None,
        "local_accuracy": local,
        "local_accuracy_p10": float(np.percentile(sized, 10)) if sized else None,
        "local_clients_evaluated": len(counted),
        "local_clients_with_test": len(local),
        "class_accuracy": [
            None if np.isnan(a) else round(a, 6) for a in global_eval.label_accuracy
        ],
        **specialisation_metrics(global_eval.expert_label_counts),
        **validation,
        **(
            routing_breakdown(model, data, global_parameters, results, by_client) if results else {}
        ),
    }


def specialisation_metrics(counts: Mapping[str, Tensor]) -> dict[str, Any]:
    """``expert_specialisation`` per layer (rounded) and its mean over the layers that have
    one, from the evaluation's routing counts by class."""
    values = {layer: expert_specialisation(table) for layer, table in counts.items()}
    measured = [v for v in values.values() if v is not None]
    return {
        "expert_specialisation": {
            layer: None if v is None else round(v, 6) for layer, v in values.items()
        },
        "expert_specialisation_mean": float(np.mean(measured)) if measured else None,
    }


def local_accuracies(model: MoEModel, data: PreparedData) -> dict[int, float]:
    """Accuracy of the model as it is on each client's local test split (clients with one)."""
    return {
        client_id: evaluate(model, data.train.select(indices)).accuracy
        for client_id, indices in sorted(data.client_test.items())
        if len(indices) > 0
    }


def routing_breakdown(
    model: MoEModel,
    data: PreparedData,
    global_parameters: Mapping[str, Tensor],
    results: Sequence[ClientResult],
    global_local: Mapping[int, float],
) -> dict[str, Any]:
    """Each participating client's local accuracy with its own router tensors in the global
    model (experts and everything else global), against the global model's.

    Returns ``own_router_accuracy`` and ``own_router_gain`` (own minus global), each
    ``{client id: value}`` over the clients with a local test split, and
    ``own_router_gain_mean``; empty when the model has no trainable router. The model is
    left holding ``global_parameters``.
    """
    routers = model.layout.router_param_names() & set(global_parameters)
    if not routers:
        return {}
    own: dict[str, float] = {}
    for result in results:
        client_id = result.client_id
        if client_id not in global_local or not routers <= set(result.parameters):
            continue
        mixed = dict(global_parameters)
        mixed.update({name: result.parameters[name] for name in routers})
        model.load_trainable_state(mixed)
        indices = data.client_test[client_id]
        own[str(client_id)] = evaluate(model, data.train.select(indices)).accuracy
    model.load_trainable_state(global_parameters)
    gain = {cid: own[cid] - global_local[int(cid)] for cid in own}
    return {
        "own_router_accuracy": own,
        "own_router_gain": gain,
        "own_router_gain_mean": float(np.mean(list(gain.values()))) if gain else None,
    }
