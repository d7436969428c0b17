"""The server's state between rounds, shared by the simulator and the Flower ServerApp.

:class:`ServerState` holds the global trainable parameters, the strategy's carried state
and the personalised starting parameters some strategies hand to clients. Both transports
ask it for a round's instructions and give it the round's aggregate, so the rules (a
client's personalised start overrides the global one; an aggregate is adopted whole) are
written once.

Before a strategy sees them, :meth:`ServerState.screen` checks the results
(:func:`~fedalign.strategies.common.result_problem`: keys, shapes, dtypes, finite values,
routing statistics that are distributions, token counts that add up), rejects the bad ones
with a reason, and clips the updates of the rest when ``federated.clip-update-norm`` > 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedalign.config import ExperimentConfig
from fedalign.errors import ConfigError, OptionError
from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult, TrainInstructions
from fedalign.strategies import AggregationResult, Strategy, StrategyState, build_strategy
from fedalign.strategies.common import clip_update, result_problem

Tensor = torch.Tensor


def strategy_from_config(config: ExperimentConfig, layout: MoELayout) -> Strategy:
    """The configured strategy (options validated by ``config.validate`` beforehand)."""
    try:
        return build_strategy(
            config.strategy.name,
            config.strategy.option_values(),
            layout,
            lora_aggregation=config.model.lora_aggregation,
        )
    except OptionError as error:
        if error.option != "lora_aggregation":
            raise
        raise ConfigError(
            f"model.lora-aggregation {error.requirement} (got {error.value!r})"
        ) from error


@dataclass
class Screening:
    """The results of a round after :meth:`ServerState.screen`.

    Parameters
    ----------
    accepted : list of ClientResult
        Valid results (clipped when clipping is on), in arrival order.
    rejected : dict of int to str
        Client id -> why its result was rejected (never aggregated).
    clipped : dict of int to float
        Client id -> its update norm before clipping, for the clipped clients.
    """

    accepted: list[ClientResult]
    rejected: dict[int, str] = field(default_factory=dict)
    clipped: dict[int, float] = field(default_factory=dict)


class ServerState:
    """Global parameters, strategy state and personalised parameters of a federation.

    Parameters
    ----------
    strategy : Strategy
    global_parameters : mapping of str to Tensor
        The initial global trainable parameters.
    clip_update_norm : float, default 0.0
        ``federated.clip-update-norm``: when > 0, :meth:`screen` scales each client's update
        down to at most this L2 norm.
    """

    def __init__(
        self,
        strategy: Strategy,
        global_parameters: Mapping[str, Tensor],
        *,
        clip_update_norm: float = 0.0,
    ) -> None:
        self.strategy = strategy
        self.clip_update_norm = float(clip_update_norm)
        self.global_parameters: dict[str, Tensor] = dict(global_parameters)
        self.strategy_state: StrategyState = strategy.initial_state()
        self.personal_parameters: dict[int, dict[str, Tensor]] = {}
        self.completed_rounds = 0

    def instructions(
        self, server_round: int, selected: Sequence[int]
    ) -> dict[int, TrainInstructions]:
        """The strategy's instructions, with each client's personalised start filled in."""
        instructions = self.strategy.configure_train(server_round, selected, self.strategy_state)
        for client_id in selected:
            personal = self.personal_parameters.get(client_id)
            if personal and instructions[client_id].start_parameters is None:
                instructions[client_id].start_parameters = personal
        return instructions

    def screen(self, results: Sequence[ClientResult]) -> Screening:
        """Reject invalid results (with a reason) and clip the rest when clipping is on.

        A second result of the same client is rejected too. Valid results pass unchanged
        (the same objects) when clipping is off.
        """
        screening = Screening(accepted=[])
        seen: set[int] = set()
        for result in results:
            if result.client_id in seen:
                screening.rejected[result.client_id] = "a second result from this client"
                continue
            seen.add(result.client_id)
            problem = result_problem(
                self.global_parameters,
                result,
                self.strategy.layout,
                require_statistics=self.strategy.needs_routing_statistics,
            )
            if problem is not None:
                screening.rejected[result.client_id] = problem
                continue
            if self.clip_update_norm > 0:
                clipped, norm = clip_update(self.global_parameters, result, self.clip_update_norm)
                if clipped is not result:
                    screening.clipped[result.client_id] = norm
                result = clipped
            screening.accepted.append(result)
        return screening

    def aggregate(self, server_round: int, results: Sequence[ClientResult]) -> AggregationResult:
        """The strategy's aggregate of ``results`` (not adopted yet)."""
        return self.strategy.aggregate(
            server_round, self.global_parameters, results, self.strategy_state
        )

    def adopt(self, server_round: int, outcome: AggregationResult) -> None:
        """Make ``outcome`` the global state after ``server_round``."""
        self.global_parameters = outcome.parameters
        self.strategy_state = outcome.state
        self.personal_parameters.update(outcome.client_parameters)
        self.completed_rounds = server_round

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly."""
        return {
            "round": self.completed_rounds,
            "global_parameters": self.global_parameters,
            "strategy_state": self.strategy_state,
            "personal_parameters": self.personal_parameters,
        }

    def load_state_dict(self, payload: Mapping[str, Any]) -> None:
        self.completed_rounds = int(payload["round"])
        self.global_parameters = payload["global_parameters"]
        self.strategy_state = payload["strategy_state"]
        self.personal_parameters = payload["personal_parameters"]
