"""One expert or one router of an MoE layer applied alone, for any supported family.

The server's public-probe semantics (``strategy.semantic-privacy = public-probe``,
docs/privacy.md) route probe tokens with a client's router and pass the tokens routed to
expert ``e`` through that client's expert ``e``. The MoE blocks' own ``forward`` mixes all
experts, so this module knows how to call one of them:

* our upcycled encoders (:class:`~fedalign.models.block.UpcycledMoE`): ``experts[e]``;
* transformers 5 fused experts (Qwen3-MoE, Qwen2-MoE, Mixtral, ...): row ``e`` of
  ``gate_up_proj`` ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)``, ``act(gate) * up``;
* Switch Transformers: ``experts["expert_<e>"]``.

Shapes: ``N`` tokens, ``H`` hidden width, ``E`` experts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedalign.models.block import UpcycledMoE
from fedalign.models.capture import RouterTap

Tensor = torch.Tensor


def router_logits(tap: RouterTap, hidden: Tensor) -> Tensor:
    """The router of ``tap`` applied to ``hidden`` ``(N, H)``: logits ``(N, E)``."""
    output = tap.module(hidden)
    logits = tap.logits_from_output(output)
    return logits.reshape(hidden.shape[0], -1)


def expert_forward(block: nn.Module, expert: int, hidden: Tensor) -> Tensor:
    """Expert ``expert`` of the MoE ``block`` applied to ``hidden`` ``(N, H)``: ``(N, H)``.

    The raw expert output, without the router's gate weight.

    Raises
    ------
    TypeError
        For a block of a family this module does not know.
    """
    if isinstance(block, UpcycledMoE):
        out: Tensor = block.experts[expert](hidden)
        return out
    experts: Any = getattr(block, "experts", None)
    if experts is not None and isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter):
        gate, up = nn.functional.linear(hidden, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])
    if isinstance(experts, nn.ModuleDict) and f"expert_{expert}" in experts:
        out = experts[f"expert_{expert}"](hidden)
        return out
    raise TypeError(f"cannot apply one expert of a {type(block).__name__} block")
