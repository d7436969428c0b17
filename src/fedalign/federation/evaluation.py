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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedalign.client import PreparedData, evaluate
from fedalign.models import MoEModel

Tensor = torch.Tensor


def evaluate_global(
    model: MoEModel,
    data: PreparedData,
    global_parameters: Mapping[str, Tensor],
    min_local_test: int = 20,
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

    Returns
    -------
    dict
        ``global_accuracy``, ``global_loss``; ``mean_local_accuracy``,
        ``worst_local_accuracy`` and ``local_accuracy_p10`` over the same clients (see the
        module docstring), ``local_clients_evaluated`` (how many) and
        ``local_clients_with_test`` (clients with any local split); ``local_accuracy``
        (list, every client with a split, client order);
        ``validation_accuracy`` and ``validation_loss`` only when ``data`` has a validation
        set.
    """
    model.load_trainable_state(global_parameters)
    global_eval = evaluate(model, data.test)
    local: list[float] = []
    sized: list[float] = []
    for client_id in sorted(data.client_test):
        indices = data.client_test[client_id]
        if len(indices) == 0:
            continue
        accuracy = evaluate(model, data.train.select(indices)).accuracy
        local.append(accuracy)
        if len(indices) >= min_local_test:
            sized.append(accuracy)
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
        **validation,
    }
