"""The server side shared by every transport, and the in-process simulator's round loop.

* :class:`ServerState`: global parameters, strategy state, personalised parameters;
* :func:`sample_clients`, :func:`evaluate_global`, :class:`RoundOutcome`;
* :class:`Simulator`: the single-machine round loop (no files, no progress bars).
"""

from fedalign.federation.evaluation import evaluate_global
from fedalign.federation.rounds import RoundOutcome, evaluation_due
from fedalign.federation.sampling import sample_clients
from fedalign.federation.server import ServerState, strategy_from_config
from fedalign.federation.simulator import Simulator

__all__ = [
    "RoundOutcome",
    "ServerState",
    "Simulator",
    "evaluate_global",
    "evaluation_due",
    "sample_clients",
    "strategy_from_config",
]
