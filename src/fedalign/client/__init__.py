"""The client side: inputs, task objectives, loss terms, local training, routing
statistics, one round.

Imports only from the layers below (config, protocol, moe, models, data, routing math);
the server side (strategies, federation) is never imported here.
"""

from fedalign.client.evaluation import Evaluation, evaluate, expert_specialisation
from fedalign.client.inputs import ModelInputs, compute_prefix_inputs, forward_logits
from fedalign.client.losses import (
    LOSS_TERMS,
    CallableTerm,
    LoadBalancingTerm,
    LossTerm,
    ProximalTerm,
    RoutingAlignmentTerm,
    StepContext,
    build_loss_terms,
)
from fedalign.client.objectives import (
    OBJECTIVES,
    ClassificationObjective,
    MultipleChoiceObjective,
    TaskObjective,
    calibrated_cross_entropy,
    choice_scores,
    continuation_log_likelihood,
    lm_loss,
    objective_for,
)
from fedalign.client.prepare import (
    ModelLoader,
    Prepared,
    PreparedData,
    load_model,
    prepare,
    prepare_data,
)
from fedalign.client.round import (
    ClientRound,
    client_loss_terms,
    client_seed,
    client_statistics,
    run_client_round,
)
from fedalign.client.statistics import compute_routing_statistics
from fedalign.client.trainer import LocalTrainingResult, total_local_steps, train_local

__all__ = [
    "LOSS_TERMS",
    "OBJECTIVES",
    "CallableTerm",
    "ClassificationObjective",
    "ClientRound",
    "Evaluation",
    "LoadBalancingTerm",
    "LocalTrainingResult",
    "LossTerm",
    "ModelInputs",
    "ModelLoader",
    "MultipleChoiceObjective",
    "Prepared",
    "PreparedData",
    "ProximalTerm",
    "RoutingAlignmentTerm",
    "StepContext",
    "TaskObjective",
    "build_loss_terms",
    "calibrated_cross_entropy",
    "choice_scores",
    "client_loss_terms",
    "client_seed",
    "client_statistics",
    "compute_prefix_inputs",
    "compute_routing_statistics",
    "continuation_log_likelihood",
    "evaluate",
    "expert_specialisation",
    "forward_logits",
    "lm_loss",
    "load_model",
    "objective_for",
    "prepare",
    "prepare_data",
    "run_client_round",
    "total_local_steps",
    "train_local",
]
