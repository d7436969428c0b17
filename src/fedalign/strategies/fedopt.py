"""Adaptive server optimisers FedAdam and FedYogi (Reddi et al., 2021, "Adaptive Federated
Optimization").

The server treats ``Delta_t = FedAvg(client parameters) - x_t`` as a pseudo-gradient and
applies an Adam- or Yogi-style step with its own moments (kept in the strategy state):

* ``m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t``
* FedAdam: ``v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2``
* FedYogi: ``v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)``
* ``x_{t+1} = x_t + server_lr * m_t / (sqrt(v_t) + tau)``

As in the paper's Algorithm 2 there is no bias correction; ``m`` starts at 0 and ``v`` at
``initial_v`` (default ``tau**2``, the paper's ``v_{-1} >= tau^2``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedalign.errors import OptionError, check_option
from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult
from fedalign.strategies.averaging import cast_like, example_weights, weighted_tensor_average
from fedalign.strategies.base import AggregationResult, Strategy, StrategyState
from fedalign.strategies.records import base_record, rounded, routing_metrics
from fedalign.strategies.screening import check_results

Tensor = torch.Tensor


@dataclass
class FedOptOptions:
    """Options of :class:`FedAdam` and :class:`FedYogi` (config keys ``strategy.<name>``).

    Parameters
    ----------
    server_lr : float, default 0.01
        Server learning rate ``eta`` (> 0).
    server_beta1 : float, default 0.9
        First-moment decay, in [0, 1).
    server_beta2 : float, default 0.99
        Second-moment decay, in [0, 1).
    server_tau : float, default 1e-3
        Adaptivity constant (> 0).
    """

    server_lr: float = 0.01
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3

    def __post_init__(self) -> None:
        check_option("server_lr", self.server_lr, minimum=0.0, strict_minimum=True)
        for name in ("server_beta1", "server_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise OptionError(name, value, "must be in [0, 1)")
        check_option("server_tau", self.server_tau, minimum=0.0, strict_minimum=True)


class FedOpt(Strategy):
    """Base of the adaptive server optimisers (Reddi et al., 2021).

    Parameters
    ----------
    layout : MoELayout
        Where routers and experts live (unused: every tensor gets the same update rule).
    server_lr : float, default 0.01
        Server learning rate ``eta``.
    beta1 : float, default 0.9
        First-moment decay.
    beta2 : float, default 0.99
        Second-moment decay.
    tau : float, default 1e-3
        Adaptivity constant added to ``sqrt(v)``.
    initial_v : float or None, default None
        Starting value of the second moment; ``None`` means ``tau**2``.

    Notes
    -----
    State: ``{"first_moment": {name: Tensor}, "second_moment": {name: Tensor}}`` (float32,
    same shapes as the parameters), created in the first round.
    """

    name = "fedopt"
    supports_lora_products = False
    options_type = FedOptOptions

    @classmethod
    def from_options(cls, layout: MoELayout, options: Any) -> FedOpt:
        return cls(
            layout,
            options.server_lr,
            options.server_beta1,
            options.server_beta2,
            options.server_tau,
        )

    def __init__(
        self,
        layout: MoELayout,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        initial_v: float | None = None,
    ) -> None:
        super().__init__(layout)
        FedOptOptions(server_lr, beta1, beta2, tau)
        self.server_lr = float(server_lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.tau = float(tau)
        self.initial_v = float(tau**2 if initial_v is None else initial_v)

    @abstractmethod
    def _second_moment(self, previous: Tensor, pseudo_gradient: Tensor) -> Tensor:
        """``v_t`` from ``v_{t-1}`` and ``Delta_t`` (same shapes)."""

    def aggregate(
        self,
        server_round: int,
        global_parameters: Mapping[str, Tensor],
        results: Sequence[ClientResult],
        state: StrategyState,
    ) -> AggregationResult:
        """One server optimiser step along the FedAvg pseudo-gradient.

        Record: the FedAvg fields plus ``"server_lr"`` and ``"pseudo_gradient_norm"`` (the
        L2 norm of ``Delta_t`` over all tensors).
        """
        check_results(global_parameters, results)
        weights = example_weights(results)  # (C,)
        previous_first: Mapping[str, Tensor] = state.get("first_moment", {})
        previous_second: Mapping[str, Tensor] = state.get("second_moment", {})
        first_moment: dict[str, Tensor] = {}
        second_moment: dict[str, Tensor] = {}
        parameters: dict[str, Tensor] = {}
        squared_norm = 0.0
        for name, reference in global_parameters.items():
            current = reference.float()
            average = weighted_tensor_average(results, name, weights, reference.shape)
            pseudo_gradient = average - current
            squared_norm += float(pseudo_gradient.square().sum())
            first = previous_first.get(name, torch.zeros_like(current))
            second = previous_second.get(name, torch.full_like(current, self.initial_v))
            first = self.beta1 * first + (1.0 - self.beta1) * pseudo_gradient
            second = self._second_moment(second, pseudo_gradient)
            first_moment[name] = first
            second_moment[name] = second
            updated = current + self.server_lr * first / (second.sqrt() + self.tau)
            parameters[name] = cast_like(updated, reference)

        record = base_record(self.name, server_round, results, weights)
        record["server_lr"] = self.server_lr
        record["pseudo_gradient_norm"] = rounded(squared_norm**0.5)
        record.update(routing_metrics(results, None))
        new_state = dict(state)
        new_state["first_moment"] = first_moment
        new_state["second_moment"] = second_moment
        return AggregationResult(parameters=parameters, state=new_state, record=record)


class FedAdam(FedOpt):
    """FedAdam: ``v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2``. See :class:`FedOpt`."""

    name = "fedadam"

    def _second_moment(self, previous: Tensor, pseudo_gradient: Tensor) -> Tensor:
        return self.beta2 * previous + (1.0 - self.beta2) * pseudo_gradient.square()


class FedYogi(FedOpt):
    """FedYogi: ``v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)``.

    See :class:`FedOpt`.
    """

    name = "fedyogi"

    def _second_moment(self, previous: Tensor, pseudo_gradient: Tensor) -> Tensor:
        squared = pseudo_gradient.square()
        return previous - (1.0 - self.beta2) * squared * torch.sign(previous - squared)
