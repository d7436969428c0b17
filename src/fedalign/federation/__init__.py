"""The server side shared by every transport, and the in-process simulator's round loop.

* :class:`ServerState`: global parameters, strategy state, personalised parameters;
* :func:`sample_clients`, :func:`evaluate_global`, :class:`RoundOutcome`;
* :class:`Simulator`: the single-machine round loop (no files, no progress bars);
* :class:`SemanticProbe`: public-probe semantic vectors; :func:`poison_result`: simulated
  malicious clients.
"""

from fedalign.federation.attacks import poison_result
from fedalign.federation.evaluation import evaluate_global
from fedalign.federation.probe import SemanticProbe, semantic_probe_for
from fedalign.federation.rounds import RoundOutcome, clipped_extra, evaluation_due
from fedalign.federation.sampling import sample_clients
from fedalign.federation.server import SemanticProbeFn, ServerState, strategy_from_config
from fedalign.federation.simulator import Simulator

__all__ = [
    "RoundOutcome",
    "SemanticProbe",
    "SemanticProbeFn",
    "ServerState",
    "Simulator",
    "clipped_extra",
    "evaluate_global",
    "evaluation_due",
    "poison_result",
    "sample_clients",
    "semantic_probe_for",
    "strategy_from_config",
]
