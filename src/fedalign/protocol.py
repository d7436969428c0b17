"""The messages both sides of a federation speak, and nothing else.

A server (the in-process simulator or the Flower ServerApp) sends each selected client
:class:`TrainInstructions`; the client answers with a :class:`ClientResult`. Both are plain
data (tensors, numbers, strings), so the Flower message codec can carry any of them without
knowing which algorithm filled them in, and client code never imports the server side.

* :class:`LossTermSpec` names a client loss term (``proximal``, ``routing-alignment``,
  ...) and carries its coefficient, scalar options and per-layer tensors. The client looks
  the name up in its loss-term registry (:mod:`fedalign.client.losses`); a new algorithm's
  client term is one class there, not a new field here.
* :class:`LayerRoutingStatistics` is what a client reports about one MoE layer.
* :class:`CompressedTensor` is one tensor of a compressed upload (``federated.upload-compression``;
  the functions that make and read them are in :mod:`fedalign.compression`).

Shapes: ``E`` experts, ``H`` hidden width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor
Scalar = bool | int | float | str


@dataclass
class LayerRoutingStatistics:
    """What a client reports about one MoE layer after local training.

    All tensors are float32 on CPU.

    Parameters
    ----------
    routing_distribution : Tensor, shape (E,)
        Mean over tokens of the softmax routing probabilities ``pbar_i(e)``.
    usage : Tensor, shape (E,)
        Fraction of tokens that have ``e`` among their top-k ``u_i(e)``.
    margin : Tensor, shape (E,)
        Mean over tokens routed to ``e`` of ``p(x, e) - p(x, e_(k+1))``; 0 where no token.
    mean_hidden : Tensor, shape (E, H)
        Mean hidden state entering the layer over tokens routed to ``e``; 0 where none.
    token_count : Tensor, shape (E,)
        Tokens routed to ``e`` (top-k membership).
    num_tokens : int
        Tokens seen in the statistics pass.
    """

    routing_distribution: Tensor
    usage: Tensor
    margin: Tensor
    mean_hidden: Tensor
    token_count: Tensor
    num_tokens: int

    def to_tensors(self) -> dict[str, Tensor]:
        return {
            "routing_distribution": self.routing_distribution,
            "usage": self.usage,
            "margin": self.margin,
            "mean_hidden": self.mean_hidden,
            "token_count": self.token_count,
            "num_tokens": torch.tensor(self.num_tokens),
        }

    @classmethod
    def from_tensors(cls, data: Mapping[str, Tensor]) -> LayerRoutingStatistics:
        return cls(
            routing_distribution=data["routing_distribution"],
            usage=data["usage"],
            margin=data["margin"],
            mean_hidden=data["mean_hidden"],
            token_count=data["token_count"],
            num_tokens=int(data["num_tokens"]),
        )


RoutingStatistics = dict[str, LayerRoutingStatistics]
"""Per-layer statistics keyed by :attr:`~fedalign.moe.layout.MoELayerLayout.name`."""


@dataclass
class LossTermSpec:
    """One term the server asks a client to add to its loss: ``coefficient * term``.

    Parameters
    ----------
    name : str
        The term's name in the client's loss-term registry (e.g. ``"proximal"``,
        ``"routing-alignment"``).
    coefficient : float
        Multiplies the term's value in the loss.
    options : dict of str to scalar, default empty
        The term's scalar options (e.g. ``{"form": "batch-kl"}``).
    tensors : dict of str to dict of str to Tensor, default empty
        Named groups of per-layer tensors (e.g. ``{"target": {layer: p_g}, "alpha":
        {layer: alpha}}``).
    """

    name: str
    coefficient: float
    options: dict[str, Scalar] = field(default_factory=dict)
    tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)


@dataclass
class TrainInstructions:
    """What the server asks one client to do in one round.

    Parameters
    ----------
    loss_terms : list of LossTermSpec, default empty
        Terms added to the task loss, in this order.
    collect_statistics : bool, default False
        Whether the client uploads :class:`LayerRoutingStatistics` after training.
    start_parameters : dict of str to Tensor or None, default None
        Personalised values that replace the global ones for these keys before training.
    """

    loss_terms: list[LossTermSpec] = field(default_factory=list)
    collect_statistics: bool = False
    start_parameters: dict[str, Tensor] | None = None

    def term(self, name: str) -> LossTermSpec | None:
        """The loss term called ``name``, if the instructions ask for it."""
        return next((spec for spec in self.loss_terms if spec.name == name), None)


@dataclass
class CompressedTensor:
    """One tensor of a compressed upload: the parts that travel, and how to read them.

    Parameters
    ----------
    method : str
        ``"bf16"``, ``"int8"``, ``"int4"``, ``"int3"``, ``"int2"`` or ``"topk"`` (see
        :mod:`fedalign.compression`).
    shape : tuple of int
        Shape of the tensor it stands for.
    parts : dict of str to Tensor
        What travels: ``bf16``: ``values`` (bfloat16, the shape); ``int8``: ``values``
        (int8, ``(R, C)`` with ``C`` the last dimension) and ``scale`` (float32, ``(R,)``);
        ``int4`` / ``int3`` / ``int2``: ``values`` (uint8, the codes packed, ``ceil(R C b /
        8)`` bytes) and ``scale`` (bfloat16, ``(R,)``);
        ``topk``: ``indices`` (int32, ``(k,)``, into the flattened tensor) and ``values``
        (float32, ``(k,)``).
    """

    method: str
    shape: tuple[int, ...]
    parts: dict[str, Tensor]


@dataclass
class ClientResult:
    """One client's reply after local training.

    Parameters
    ----------
    client_id : int
        Index of the client in the partition.
    num_examples : int
        Local training examples ``n_i``.
    parameters : dict of str to Tensor
        The client's trainable parameters after local training (full values, not deltas).
    routing_statistics : dict of str to LayerRoutingStatistics, default empty
        Per MoE layer (computed for every strategy, for the divergence diagnostics).
    metrics : dict of str to float, default empty
        Training loss and the like, for records only.
    update : dict of str to CompressedTensor or None, default None
        A compressed upload (``federated.upload-compression`` other than ``none``): the
        client's parameters minus the round's global parameters, compressed. ``parameters``
        is then empty until the server restores it
        (:func:`fedalign.compression.restore_parameters`, in ``ServerState.screen``).
    """

    client_id: int
    num_examples: int
    parameters: dict[str, Tensor]
    routing_statistics: RoutingStatistics = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    update: dict[str, CompressedTensor] | None = None


def tensor_bytes(tensors: Any) -> int:
    """Bytes of every tensor inside nested dicts / lists / dataclass-like objects."""
    if isinstance(tensors, Tensor):
        return int(tensors.numel() * tensors.element_size())
    if isinstance(tensors, Mapping):
        return sum(tensor_bytes(v) for v in tensors.values())
    if isinstance(tensors, list | tuple):
        return sum(tensor_bytes(v) for v in tensors)
    if hasattr(tensors, "__dataclass_fields__"):
        return sum(tensor_bytes(getattr(tensors, f)) for f in tensors.__dataclass_fields__)
    return 0
