"""The MoE layer of upcycled encoders: FFN experts behind a top-k linear router.

:class:`UpcycledMoE` is what sparse upcycling (:mod:`fedalign.models.upcycle`),
MoEfication and Drop-Upcycling (:mod:`fedalign.models.moefy`) build; :func:`gate_weights`
is how its selected experts' outputs are weighted (``model.gating``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class UpcycledExpert(nn.Module):
    """One FFN expert: ``fc_out(act(fc_in(x)))``."""

    def __init__(self, fc_in: nn.Linear, activation: nn.Module, fc_out: nn.Linear) -> None:
        super().__init__()
        self.fc_in = fc_in
        self.activation = activation
        self.fc_out = fc_out

    def forward(self, hidden: Tensor) -> Tensor:
        return self.fc_out(self.activation(self.fc_in(hidden)))


GATINGS = ("renormalize", "scaled", "straight-through")


def gate_weights(top_probs: Tensor, gating: str) -> Tensor:
    """Weights of the selected experts' outputs from their softmax probabilities.

    Parameters
    ----------
    top_probs : Tensor
        ``(N, k)`` softmax probabilities of the ``k`` selected experts (float32).
    gating : str
        ``renormalize``: ``p / sum(p)`` (weights sum to one: exact for identical copies);
        ``scaled``: ``k * p / sum(p)`` (one on average: the sum of sub-FFNs keeps its scale);
        ``straight-through``: the value is exactly one (the layer is the plain sum of the
        selected sub-FFNs, so top-k = E is the dense FFN), the gradient is that of ``p``.

    Returns
    -------
    Tensor
        ``(N, k)`` weights.
    """
    if gating == "renormalize":
        return top_probs / top_probs.sum(dim=-1, keepdim=True)
    if gating == "scaled":
        return top_probs.shape[-1] * top_probs / top_probs.sum(dim=-1, keepdim=True)
    if gating == "straight-through":
        # (p - p) is exactly 0, so the value is exactly 1; d/dp = 1
        return (top_probs - top_probs.detach()) + 1.0
    raise ValueError(f"gating must be one of {list(GATINGS)} (got {gating!r})")


class UpcycledMoE(nn.Module):
    """Top-k routed mixture of FFN experts with a linear router (``router``, no bias).

    The default constructor copies one dense FFN into every expert (sparse upcycling);
    :meth:`from_experts` builds the layer from given, possibly smaller, experts
    (MoEfication, Drop-Upcycling).

    Parameters
    ----------
    fc_in, fc_out : nn.Linear
        The dense FFN's two projections (copied into every expert).
    activation : nn.Module
        The FFN's activation.
    num_experts : int
    top_k : int
    router_init_std : float, default 0.02
        Std of the router's normal initialisation; 0 gives a zero router (uniform routing).
    gating : str, default "renormalize"
        How selected experts' outputs are weighted (:func:`gate_weights`).
    """

    def __init__(
        self,
        fc_in: nn.Linear,
        activation: nn.Module,
        fc_out: nn.Linear,
        num_experts: int,
        top_k: int,
        router_init_std: float = 0.02,
        gating: str = "renormalize",
    ) -> None:
        super().__init__()
        experts = [
            UpcycledExpert(copy.deepcopy(fc_in), copy.deepcopy(activation), copy.deepcopy(fc_out))
            for _ in range(num_experts)
        ]
        self._setup(experts, fc_in.in_features, top_k, router_init_std, gating)

    @classmethod
    def from_experts(
        cls,
        experts: list[UpcycledExpert],
        top_k: int,
        gating: str,
        router_weight: Tensor | None = None,
        output_bias: Tensor | None = None,
        router_init_std: float = 0.02,
    ) -> UpcycledMoE:
        """An MoE layer over ``experts`` (used as given, not copied).

        Parameters
        ----------
        experts : list of UpcycledExpert
        top_k : int
        gating : str
        router_weight : Tensor or None, default None
            ``(E, H)`` initial router; ``None`` draws it with ``router_init_std``.
        output_bias : Tensor or None, default None
            ``(H,)`` bias added once to the layer's output (a split FFN's second bias).
        router_init_std : float, default 0.02
        """
        moe = cls.__new__(cls)
        nn.Module.__init__(moe)
        moe._setup(experts, experts[0].fc_in.in_features, top_k, router_init_std, gating)
        if router_weight is not None:
            with torch.no_grad():
                moe.router.weight.copy_(router_weight)
        if output_bias is not None:
            moe.output_bias = nn.Parameter(output_bias.detach().clone())
        return moe

    def _setup(
        self,
        experts: list[UpcycledExpert],
        hidden_size: int,
        top_k: int,
        router_init_std: float,
        gating: str,
    ) -> None:
        num_experts = len(experts)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}] (got {top_k})")
        if gating not in GATINGS:
            raise ValueError(f"gating must be one of {list(GATINGS)} (got {gating!r})")
        self.num_experts = num_experts
        self.top_k = top_k
        self.gating = gating
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        if router_init_std > 0:
            nn.init.normal_(self.router.weight, std=router_init_std)
        else:
            nn.init.zeros_(self.router.weight)
        self.experts = nn.ModuleList(experts)
        self.output_bias: nn.Parameter | None = None
        # set by EncoderClassifier for the duration of a forward pass: (B*T,) bool
        self.token_mask: Tensor | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])  # (N, H)
        logits = self.router(flat)  # (N, E)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_probs, top_index = probs.topk(self.top_k, dim=-1)  # (N, k)
        top_weights = gate_weights(top_probs, self.gating).to(flat.dtype)
        output = torch.zeros_like(flat)
        selected = top_index
        if self.token_mask is not None and self.token_mask.numel() == flat.shape[0]:
            # padding tokens skip the experts: attention never reads them and pooling
            # ignores them, so real tokens get the same numbers for half the work
            selected = top_index.masked_fill(~self.token_mask[:, None], -1)
        for expert_index, expert in enumerate(self.experts):
            rows, slot = torch.where(selected == expert_index)
            if rows.numel() == 0:
                continue
            routed = expert(flat[rows]) * top_weights[rows, slot, None]  # (n_e, H)
            output.index_add_(0, rows, routed)
        if self.output_bias is not None:
            output = output + self.output_bias
        return output.reshape(shape)
