"""Small helpers shared by test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import torch

from fedalign.config import ExperimentConfig
from fedalign.moe.layout import ExpertSlice, MoELayerLayout, MoELayout
from fedalign.protocol import TrainInstructions

ROUTING_TERM = "routing-alignment"


def routing_lambda(instructions: TrainInstructions) -> float:
    """``lambda`` of the routing-alignment term (0 when the instructions carry none)."""
    term = instructions.term(ROUTING_TERM)
    return 0.0 if term is None else term.coefficient


def global_routing(instructions: TrainInstructions) -> dict[str, torch.Tensor]:
    """Per layer ``p_g`` of the routing-alignment term (empty when none)."""
    term = instructions.term(ROUTING_TERM)
    return {} if term is None else term.tensors["target"]


def expert_alpha(instructions: TrainInstructions) -> dict[str, torch.Tensor]:
    """Per layer ``alpha_i(e)`` of the routing-alignment term (empty when none)."""
    term = instructions.term(ROUTING_TERM)
    return {} if term is None else term.tensors["alpha"]


def proximal_mu(instructions: TrainInstructions) -> float:
    """FedProx ``mu`` (the proximal term's coefficient is ``mu / 2``)."""
    term = instructions.term("proximal")
    return 0.0 if term is None else 2.0 * term.coefficient


def tiny_config(**overrides: object) -> ExperimentConfig:
    """A tiny-upcycled run on 240 WordNet glosses, 3 clients, 2 rounds of 3 local steps.

    ``overrides`` use ``section__key=value`` (``strategy__name="fedalign"``).
    """
    config = ExperimentConfig()
    config.model.name = "tiny-upcycled"
    config.model.max_length = 24
    config.data.max_train_examples = 240
    config.data.max_test_examples = 80
    config.partition.num_clients = 3
    config.partition.alpha = 0.5
    config.partition.min_client_size = 10
    config.federated.rounds = 2
    config.train.local_steps = 3
    config.train.batch_size = 8
    config.train.lr = 1e-3
    config.strategy.stats_max_examples = 32
    config.run.progress = False
    for key, value in overrides.items():
        config.set(key.replace("__", "."), value)
    return config


TINY_CLI = [
    "--model",
    "tiny-upcycled",
    "--max-train-examples",
    "200",
    "--max-test-examples",
    "80",
    "--clients",
    "3",
    "--alpha",
    "0.5",
    "--local-steps",
    "2",
    "--rounds",
    "2",
    "--no-progress",
    "--set",
    "model.max-length=24",
    "--set",
    "strategy.stats-max-examples=16",
    "--set",
    "partition.min-client-size=5",
]
"""Command-line options of a tiny run (3 clients, 2 rounds of 2 local steps)."""


def tiny_choice_config(dataset: str = "mmlu", **overrides: object) -> ExperimentConfig:
    """A tiny causal Qwen3-MoE on the shipped ``mmlu`` / ``hellaswag`` sample (48 rows, 4
    groups): 3 clients, 2 rounds of 2 local steps, sequences of at most 48 tokens."""
    config = ExperimentConfig()
    config.model.name = "tiny-qwen3moe"
    config.model.max_length = 48
    config.data.dataset = dataset
    config.data.path = "sample"
    config.data.test_fraction = 0.25
    config.partition.num_clients = 3
    config.partition.alpha = 0.5
    config.partition.min_client_size = 4
    config.federated.rounds = 2
    config.train.local_steps = 2
    config.train.batch_size = 4
    config.train.lr = 1e-3
    config.strategy.stats_max_examples = 16
    config.run.progress = False
    for key, value in overrides.items():
        config.set(key.replace("__", "."), value)
    return config


# ------------------------------------------------------------------------ toy expert layouts
ROUTER_WEIGHT = ("moe.router.weight",)
ROUTER_WEIGHT_AND_BIAS = ("moe.router.weight", "moe.router.bias")


def toy_layout(
    *,
    per_expert: bool = False,
    router_params: tuple[str, ...] = ROUTER_WEIGHT_AND_BIAS,
    hidden_size: int = 2,
    expert_tensors: tuple[str, ...] = ("w", "b"),
) -> MoELayout:
    """One MoE layer ``moe``: 2 experts, top-1, a router of ``router_params``.

    Fused (default): expert ``e`` is rows ``[e, e+1)`` of one tensor ``moe.experts.w``
    (``(E, ...)``). ``per_expert``: expert ``e`` owns whole tensors ``moe.experts.{e}.<t>``,
    one per name in ``expert_tensors``.
    """
    if per_expert:
        experts = tuple(
            tuple(ExpertSlice(f"moe.experts.{e}.{t}") for t in expert_tensors) for e in range(2)
        )
    else:
        experts = ((ExpertSlice("moe.experts.w", 0, 1),), (ExpertSlice("moe.experts.w", 1, 2),))
    layer = MoELayerLayout(
        name="moe",
        num_experts=2,
        top_k=1,
        hidden_size=hidden_size,
        router_params=router_params,
        experts=experts,
    )
    return MoELayout(layers=(layer,))


FUSED_LAYOUT = toy_layout()
"""Two experts stored fused (``moe.experts.w``, ``(2, ...)``), router weight and bias."""
PER_EXPERT_LAYOUT = toy_layout(per_expert=True)
"""Two experts of one tensor pair each (``moe.experts.{e}.w``, ``.b``), router weight and bias."""
