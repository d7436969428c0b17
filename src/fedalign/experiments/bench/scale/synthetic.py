"""Synthetic rounds of the server-step measurement: no model is trained.

:func:`synthetic_round` builds an :class:`MoELayout` of ``num_layers`` MoE layers x
``num_experts`` experts (two matrices per expert, ``(I, H)`` and ``(H, I)``, one tensor
each, as an upcycled FFN has), random client parameters and random but valid
:class:`LayerRoutingStatistics`.

Client inputs: client ``i``'s tensors are those of client ``i mod pool`` (the same tensor
objects), so building 200 clients of MiniLM-sized experts (60 GB as separate copies) takes
``pool`` clients' memory.

Shapes: ``C`` clients, ``E`` experts, ``H`` hidden width, ``I`` expert FFN width.
"""

from __future__ import annotations

import torch

from fedalign.moe.layout import ExpertSlice, MoELayerLayout, MoELayout
from fedalign.protocol import ClientResult, LayerRoutingStatistics

Tensor = torch.Tensor


EXPERT_SIZES: dict[str, tuple[int, int]] = {
    "full": (384, 1536),  # all-MiniLM-L6-v2's whole FFN per expert: 1,179,648 values
    "eighth": (384, 192),  # 1/8 of it, as an 8-expert MoEfied FFN: 147,456 values
}
"""Expert shapes ``(H, I)`` by name."""


# ------------------------------------------------------------------- synthetic rounds
def synthetic_layout(
    num_layers: int = 4, num_experts: int = 16, hidden: int = 384, top_k: int = 2
) -> MoELayout:
    """``num_layers`` MoE layers, each with a router ``(E, H)`` and per-expert ``w1``, ``w2``."""
    layers = []
    for index in range(num_layers):
        prefix = f"layers.{index}.moe"
        layers.append(
            MoELayerLayout(
                name=prefix,
                num_experts=num_experts,
                top_k=top_k,
                hidden_size=hidden,
                router_params=(f"{prefix}.router.weight",),
                experts=tuple(
                    (
                        ExpertSlice(f"{prefix}.experts.{e}.w1"),
                        ExpertSlice(f"{prefix}.experts.{e}.w2"),
                    )
                    for e in range(num_experts)
                ),
            )
        )
    return MoELayout(layers=tuple(layers))


def synthetic_parameters(
    layout: MoELayout, intermediate: int, generator: torch.Generator, scale: float = 0.02
) -> dict[str, Tensor]:
    """Random float32 parameters for every router and expert tensor of ``layout``."""
    parameters: dict[str, Tensor] = {}
    for layer in layout.layers:
        hidden = layer.hidden_size
        for name in layer.router_params:
            parameters[name] = torch.randn(layer.num_experts, hidden, generator=generator) * scale
        for slices in layer.experts:
            w1, w2 = slices
            parameters[w1.param] = torch.randn(intermediate, hidden, generator=generator).mul_(
                scale
            )
            parameters[w2.param] = torch.randn(hidden, intermediate, generator=generator).mul_(
                scale
            )
    return parameters


def synthetic_statistics(
    layer: MoELayerLayout, generator: torch.Generator, num_tokens: int = 512
) -> LayerRoutingStatistics:
    """Random but valid statistics of one layer: a softmax mean, top-k usage, margins, means.

    About one expert in eight gets no token (``count = 0``, zero mean and margin), so
    inactive clients occur as they do under label skew.
    """
    num_experts, hidden = layer.num_experts, layer.hidden_size
    routing = torch.softmax(torch.randn(num_experts, generator=generator), dim=0)  # (E,)
    routed = torch.rand(num_experts, generator=generator) > 0.125  # (E,)
    share = torch.rand(num_experts, generator=generator) * routed  # (E,)
    share = share / share.sum().clamp(min=1e-12) * layer.top_k  # sums to k: usage u_i(e)
    usage = share.clamp(max=1.0)
    token_count = (usage * num_tokens).round()
    active = token_count > 0
    return LayerRoutingStatistics(
        routing_distribution=routing,
        usage=usage * active,
        margin=torch.rand(num_experts, generator=generator) * 0.5 * active,
        mean_hidden=torch.randn(num_experts, hidden, generator=generator) * active[:, None],
        token_count=token_count,
        num_tokens=num_tokens,
    )


def synthetic_round(
    num_clients: int,
    expert_size: str = "full",
    *,
    num_layers: int = 4,
    num_experts: int = 16,
    pool: int = 8,
    update_scale: float = 0.01,
    seed: int = 0,
) -> tuple[MoELayout, dict[str, Tensor], list[ClientResult]]:
    """A round of ``num_clients`` synthetic results on the :data:`EXPERT_SIZES` shapes.

    Returns
    -------
    layout, global_parameters, results
        Client ``i`` holds ``global + update_scale * noise`` of pool member ``i mod pool``
        (the same tensors for every client of a member), ``num_examples`` in [50, 500) and
        its own :func:`synthetic_statistics` for every layer.
    """
    hidden, intermediate = EXPERT_SIZES[expert_size]
    generator = torch.Generator().manual_seed(seed)
    layout = synthetic_layout(num_layers, num_experts, hidden)
    global_parameters = synthetic_parameters(layout, intermediate, generator)
    members = []
    for _ in range(min(pool, num_clients)):
        member = {}
        for name, tensor in global_parameters.items():
            noise = torch.randn(tensor.shape, generator=generator).mul_(update_scale)
            member[name] = noise.add_(tensor)
        members.append(member)
    results = []
    for cid in range(num_clients):
        statistics = {layer.name: synthetic_statistics(layer, generator) for layer in layout.layers}
        examples = int(torch.randint(50, 500, (1,), generator=generator))
        results.append(ClientResult(cid, examples, members[cid % len(members)], statistics))
    return layout, global_parameters, results
