"""The server's state between rounds, shared by the simulator and the Flower ServerApp.

:class:`ServerState` holds the global trainable parameters, the strategy's carried state
and the personalised starting parameters some strategies hand to clients. Both transports
ask it for a round's instructions and give it the round's aggregate, so the rules (a
client's personalised start overrides the global one; an aggregate is adopted whole) are
written once.

Before a strategy sees them, :meth:`ServerState.screen` restores compressed uploads to
float32 parameters (:func:`~fedalign.compression.restore_parameters`), checks the results
(:func:`~fedalign.strategies.screening.result_problem`: keys, shapes, dtypes, finite values,
routing statistics that are distributions, token counts that add up), rejects the bad ones
with a reason, and clips the updates of the rest
(:func:`~fedalign.strategies.screening.norm_targets`): an update above
``federated.screen-norm-multiple`` times the round's median update norm (on by default) is
scaled down to the norm of the client nearest to it in training examples, and with
``federated.clip-update-norm`` (off by default) every update to at most that norm. An
update is measured from where the client started (the global parameters, with its
personalised tensors when the server handed it some). What the screening did goes into the
decisions record as ``"screening"`` (:meth:`Screening.record`).

:meth:`ServerState.aggregate` hands the strategy the results as screened, except under
``strategy.semantic-privacy = public-probe``: a ``semantic_probe``
(:class:`~fedalign.federation.probe.SemanticProbe`) first replaces every client's (empty)
``mean_hidden`` with semantic vectors the server measures on its own probe set. The
decisions record then holds ``"semantic_privacy"`` (also under ``clip-noise``, from the
clients' reported noise scales); records of the default mode are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fedalign.compression import restore_parameters
from fedalign.config import ExperimentConfig, FederatedConfig
from fedalign.errors import ConfigError, OptionError
from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult, TrainInstructions
from fedalign.strategies import AggregationResult, Strategy, StrategyState, build_strategy
from fedalign.strategies.screening import clip_update, norm_targets, result_problem, update_norm

Tensor = torch.Tensor

SemanticProbeFn = Callable[[Mapping[str, Tensor], Sequence[ClientResult]], list[ClientResult]]
"""``(global parameters, results) -> results`` with server-measured semantic vectors."""

CLIP_NOISE_METRICS = (
    "semantic_clip",
    "semantic_noise_std",
    "semantic_mu",
    "semantic_epsilon",
    "semantic_delta",
)
"""Result metrics a ``clip-noise`` client reports (see ``semantic_privacy_metrics``)."""


def clip_noise_record(results: Sequence[ClientResult]) -> dict[str, Any] | None:
    """The decisions record's ``semantic_privacy`` entry from ``clip-noise`` clients' metrics.

    ``{"mode": "clip-noise", "<metric>": {"<client id>": value}}`` per metric of
    :data:`CLIP_NOISE_METRICS` some client reported; None when none did.
    """
    entry: dict[str, Any] = {}
    for key in CLIP_NOISE_METRICS:
        values = {str(r.client_id): r.metrics[key] for r in results if key in r.metrics}
        if values:
            entry[key] = values
    return {"mode": "clip-noise", **entry} if entry else None


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
    norms : dict of int to float
        Client id -> the L2 norm of its update, for every valid result (empty when no bound
        is on).
    median_norm : float or None
        The lower median of ``norms`` when ``federated.screen-norm-multiple`` is on.
    outlier_bound : float or None
        ``multiple * median_norm``: updates above it were scaled down (``clipped_to``).
    max_norm : float or None
        ``federated.clip-update-norm`` when on.
    clipped_to : dict of int to float
        Client id -> the norm its update was scaled down to, for the clipped clients.
    multiple : float
        ``federated.screen-norm-multiple`` (0 = off).
    """

    accepted: list[ClientResult]
    rejected: dict[int, str] = field(default_factory=dict)
    clipped: dict[int, float] = field(default_factory=dict)
    norms: dict[int, float] = field(default_factory=dict)
    median_norm: float | None = None
    outlier_bound: float | None = None
    max_norm: float | None = None
    clipped_to: dict[int, float] = field(default_factory=dict)
    multiple: float = 0.0

    def record(self) -> dict[str, Any] | None:
        """The decisions record's ``screening`` entry; None when no bound was on and no
        result was rejected.

        ``{"update_norms": {"id": norm}, "median_norm": m, "norm_multiple": k,
        "outlier_bound": k m, "max_norm": c, "clipped": {"id": norm before}, "clipped_to":
        {"id": norm after}, "rejected": {"id": reason}}`` (ids as strings, sorted;
        ``median_norm``, ``outlier_bound`` and ``max_norm`` null when not in force).
        """
        if not self.norms and not self.rejected:
            return None
        return {
            "update_norms": {str(k): v for k, v in sorted(self.norms.items())},
            "median_norm": self.median_norm,
            "norm_multiple": self.multiple,
            "outlier_bound": self.outlier_bound,
            "max_norm": self.max_norm,
            "clipped": {str(k): v for k, v in sorted(self.clipped.items())},
            "clipped_to": {str(k): v for k, v in sorted(self.clipped_to.items())},
            "rejected": {str(k): v for k, v in sorted(self.rejected.items())},
        }


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
    screen_norm_multiple : float, default ``FederatedConfig.screen_norm_multiple``
        ``federated.screen-norm-multiple``: when > 0, :meth:`screen` scales an update above
        this multiple of the round's median update norm down to the norm of the client
        nearest to it in training examples (0 = off).
    semantic_probe : callable or None, default None
        ``public-probe``: replaces the results' ``mean_hidden`` before a strategy that needs
        routing statistics aggregates (a :class:`~fedalign.federation.probe.SemanticProbe`;
        its ``record()``, when it has one, goes into the decisions record).
    """

    def __init__(
        self,
        strategy: Strategy,
        global_parameters: Mapping[str, Tensor],
        *,
        clip_update_norm: float = 0.0,
        screen_norm_multiple: float = FederatedConfig.screen_norm_multiple,
        semantic_probe: SemanticProbeFn | None = None,
    ) -> None:
        self.strategy = strategy
        self.clip_update_norm = float(clip_update_norm)
        self.screen_norm_multiple = float(screen_norm_multiple)
        self.semantic_probe = semantic_probe
        self.global_parameters: dict[str, Tensor] = dict(global_parameters)
        self.strategy_state: StrategyState = strategy.initial_state()
        self.personal_parameters: dict[int, dict[str, Tensor]] = {}
        self.completed_rounds = 0
        # the personalised start of each client of the round in progress (updates are
        # measured from it); set by instructions()
        self.round_starts: dict[int, dict[str, Tensor]] = {}

    def instructions(
        self, server_round: int, selected: Sequence[int]
    ) -> dict[int, TrainInstructions]:
        """The strategy's instructions, with each client's personalised start filled in."""
        instructions = self.strategy.configure_train(server_round, selected, self.strategy_state)
        for client_id in selected:
            personal = self.personal_parameters.get(client_id)
            if personal and instructions[client_id].start_parameters is None:
                instructions[client_id].start_parameters = personal
        self.round_starts = {
            client_id: dict(start)
            for client_id in selected
            if (start := instructions[client_id].start_parameters)
        }
        return instructions

    def screen(self, results: Sequence[ClientResult]) -> Screening:
        """Restore compressed uploads, reject invalid results (with a reason) and clip the
        outlying updates of the rest.

        A compressed result (``update`` set) becomes a copy with the restored parameters
        (global + decompressed delta) and no ``update``; a malformed one is rejected. A
        second result of the same client is rejected too. The median and the bounds
        (:func:`~fedalign.strategies.screening.norm_targets`) come from the norms of the
        valid results only. Valid results that are not clipped pass unchanged (the same
        objects).
        """
        screening = Screening(accepted=[], multiple=self.screen_norm_multiple)
        seen: set[int] = set()
        for result in results:
            if result.client_id in seen:
                screening.rejected[result.client_id] = "a second result from this client"
                continue
            seen.add(result.client_id)
            if result.update is not None:
                try:
                    restored = restore_parameters(self.global_parameters, result.update)
                except ValueError as error:
                    screening.rejected[result.client_id] = f"compressed update: {error}"
                    continue
                result = replace(result, parameters=restored, update=None)
            problem = result_problem(
                self.global_parameters,
                result,
                self.strategy.layout,
                require_statistics=self.strategy.needs_routing_statistics,
                allow_empty_hidden=self.semantic_probe is not None,
            )
            if problem is not None:
                screening.rejected[result.client_id] = problem
                continue
            screening.accepted.append(result)
        if self.screen_norm_multiple > 0 or self.clip_update_norm > 0:
            self._clip(screening)
        return screening

    def _clip(self, screening: Screening) -> None:
        """Measure every accepted update and clip the ones :func:`norm_targets` names (in
        place)."""
        starts = {
            result.client_id: {
                **self.global_parameters,
                **self.round_starts.get(result.client_id, {}),
            }
            for result in screening.accepted
        }
        for result in screening.accepted:
            screening.norms[result.client_id] = update_norm(
                starts[result.client_id], result.parameters
            )
        plan = norm_targets(
            screening.norms,
            self.screen_norm_multiple,
            self.clip_update_norm,
            {result.client_id: result.num_examples for result in screening.accepted},
        )
        screening.median_norm, screening.outlier_bound = plan.median, plan.outlier_bound
        screening.max_norm = self.clip_update_norm if self.clip_update_norm > 0 else None
        for index, result in enumerate(screening.accepted):
            target = plan.targets.get(result.client_id)
            if target is None:
                continue
            norm = screening.norms[result.client_id]
            screening.accepted[index], _ = clip_update(
                starts[result.client_id], result, target, norm
            )
            screening.clipped[result.client_id] = norm
            screening.clipped_to[result.client_id] = target

    def aggregate(
        self,
        server_round: int,
        results: Sequence[ClientResult],
        screening: Screening | None = None,
    ) -> AggregationResult:
        """The strategy's aggregate of ``results`` (not adopted yet); the record holds
        ``screening``'s :meth:`~Screening.record` as ``"screening"`` when there is one."""
        privacy = clip_noise_record(results)
        if self.semantic_probe is not None and self.strategy.needs_routing_statistics:
            results = self.semantic_probe(self.global_parameters, results)
            record = getattr(self.semantic_probe, "record", None)
            privacy = record() if callable(record) else {"mode": "public-probe"}
        outcome = self.strategy.aggregate(
            server_round, self.global_parameters, results, self.strategy_state
        )
        if privacy is not None:
            outcome.record["semantic_privacy"] = privacy
        screened = screening.record() if screening is not None else None
        if screened is not None:
            outcome.record["screening"] = screened
        return outcome

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
