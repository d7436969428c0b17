"""LoRA factors as weight updates: the MoE view of LoRA experts and the product algebra.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) adapts
a frozen weight ``W0`` (``(out, in)``) by ``W = W0 + s * B A`` with ``B`` ``(out, r)``,
``A`` ``(r, in)`` and ``s = lora_alpha / r``. Federated LoRA has to average *updates*, and
the mean of products is not the product of means:

``mean_i(B_i A_i) != mean_i(B_i) mean_i(A_i)``

(FedIT, Zhang et al. 2024, "Towards Building the Federated GPT", averages the factors;
FedEx-LoRA / FLoRA-style exact aggregation averages the products). This module holds

* :class:`LoRAFactors`: where one peft LoRA pair lives in a flat parameter dictionary.
  For fused experts (peft ``target_parameters`` on a ``(E, out, in)`` tensor, a
  ``ParamWrapper``) the rank is stacked per expert: ``lora_A.weight`` is ``(E r, in)``
  with expert ``e`` in rows ``[e r, (e + 1) r)``, and ``lora_B.weight`` is ``(out, E r)``
  with expert ``e`` in the *interleaved* columns ``e, e + E, e + 2E, ...`` (peft reshapes
  it to ``(out, r, E)``; ``ParamWrapper.get_delta_weight``);
* :class:`LoRAExpertSlice`: expert ``e``'s factors of one such pair and its weight update
  ``delta_e = s * B_e A_e``, shaped like the base expert tensor ``W0[e]`` — the quantity
  FedAlign-MoE's direction consensus and merge weights are computed on;
* the pure math: :func:`lora_delta`, :func:`product_mean`, :func:`factor_mean`,
  :func:`refactorise` (truncated SVD, singular values split square-root-wise) and
  :func:`relative_error`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor

DEAD_DIRECTION_TOLERANCE = 1e-12
"""Singular values at most this fraction of the largest are treated as zero by
:func:`refactorise` (see its Notes)."""


# ------------------------------------------------------------------------- pure math
def lora_delta(b: Tensor, a: Tensor, scaling: float) -> Tensor:
    """The weight update of one LoRA pair, ``s * B A`` (Hu et al. 2021, eq. 3).

    Parameters
    ----------
    b : Tensor, shape (out, r)
    a : Tensor, shape (r, in)
    scaling : float
        ``s = lora_alpha / r`` (peft's ``scaling``).

    Returns
    -------
    Tensor, shape (out, in), float32
    """
    return (b.float() @ a.float()).mul_(scaling)


def product_mean(bs: Sequence[Tensor], as_: Sequence[Tensor], weights: Tensor) -> Tensor:
    """The exact weighted mean of the products, ``sum_i w_i B_i A_i``, shape ``(out, in)``.

    Parameters
    ----------
    bs : sequence of Tensor, each (out, r)
    as_ : sequence of Tensor, each (r, in)
    weights : Tensor, shape (C,)
        Client weights (normally summing to 1).

    Notes
    -----
    Without the scaling ``s``: the mean update is ``s`` times this. Equal to
    ``[B_1 w_1 | ... | B_C w_C] [A_1; ...; A_C]``, one product of rank at most ``C r``.
    """
    if not bs or len(bs) != len(as_) or len(bs) != weights.numel():
        raise ValueError(
            f"need one B, one A and one weight per client (got {len(bs)}, {len(as_)}, "
            f"{weights.numel()})"
        )
    stacked_b = torch.cat(
        [b.float() * float(w) for b, w in zip(bs, weights.tolist(), strict=True)], dim=1
    )  # (out, C r)
    stacked_a = torch.cat([a.float() for a in as_], dim=0)  # (C r, in)
    return stacked_b @ stacked_a


def factor_mean(
    bs: Sequence[Tensor], as_: Sequence[Tensor], weights: Tensor
) -> tuple[Tensor, Tensor]:
    """FedIT's aggregation: ``(sum_i w_i B_i, sum_i w_i A_i)``, shapes ``(out, r)``, ``(r, in)``.

    Its product ``mean(B) mean(A)`` differs from :func:`product_mean` by the cross terms
    ``sum_{i != j} w_i w_j B_i A_j - sum_i w_i (1 - w_i) B_i A_i``; it is exact when every
    client shares one ``A`` (or one ``B``).
    """
    w = weights.float()
    b = torch.stack([x.float() for x in bs])  # (C, out, r)
    a = torch.stack([x.float() for x in as_])  # (C, r, in)
    return torch.einsum("c,cor->or", w, b), torch.einsum("c,cri->ri", w, a)


def refactorise(product: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``r`` factors ``B A`` of ``product`` (Eckart-Young), singular values split.

    ``product = U S V^T`` (thin SVD); ``B = U_r S_r^{1/2}`` ``(out, r)`` and
    ``A = S_r^{1/2} V_r^T`` ``(r, in)``, so ``B A`` is the truncated SVD of ``product``:
    exact when ``rank(product) <= r``, otherwise the best rank-``r`` approximation in the
    Frobenius norm.

    Parameters
    ----------
    product : Tensor, shape (out, in)
    rank : int
        ``r`` >= 1.

    Returns
    -------
    b : Tensor, shape (out, r), float32
    a : Tensor, shape (r, in), float32

    Notes
    -----
    A direction whose singular value is 0 (at most :data:`DEAD_DIRECTION_TOLERANCE` times
    the largest, or all of them for a zero product) gets ``B``'s column 0 and ``A``'s row
    the unit vector ``V_r[:, j]``: the product is unchanged, but the direction is not dead
    (with both factors 0 it would get no gradient, as ``dL/dB = g A^T`` and
    ``dL/dA = B^T g``). When ``min(out, in) < r`` the missing directions are zero rows of
    ``A`` and zero columns of ``B``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1 (got {rank})")
    u, s, vh = torch.linalg.svd(product.double(), full_matrices=False)  # (o, k), (k,), (k, i)
    k = min(rank, s.numel())
    u, s, vh = u[:, :k], s[:k], vh[:k]
    root = s.sqrt()
    b = u * root  # (out, k)
    a = root[:, None] * vh  # (k, in)
    largest = float(s[0]) if s.numel() else 0.0
    dead = (
        s <= DEAD_DIRECTION_TOLERANCE * largest
        if largest > 0
        else torch.ones_like(s, dtype=torch.bool)
    )
    if bool(dead.any()):
        b[:, dead] = 0.0
        a[dead] = vh[dead]
    if k < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    return b.float(), a.float()


def relative_error(exact: Tensor, approximation: Tensor) -> float:
    """``||exact - approximation||_F / ||exact||_F`` (0 when both are 0, inf when only
    ``exact`` is)."""
    norm = float(torch.linalg.vector_norm(exact.double()))
    gap = float(torch.linalg.vector_norm(exact.double() - approximation.double()))
    if norm == 0.0:
        return 0.0 if gap == 0.0 else float("inf")
    return gap / norm


# -------------------------------------------------------------------------- the view
@dataclass(frozen=True)
class LoRAFactors:
    """One peft LoRA pair in a flat parameter dictionary.

    Parameters
    ----------
    lora_a, lora_b : str
        Names of ``lora_A.<adapter>.weight`` ``(num_experts * r, in)`` and
        ``lora_B.<adapter>.weight`` ``(out, num_experts * r)``.
    rank : int
        ``r`` per expert.
    scaling : float
        ``s`` (``lora_alpha / r``; ``lora_alpha / sqrt(r)`` with rsLoRA).
    num_experts : int, default 1
        ``E`` for a fused ``(E, ., .)`` tensor (peft ``ParamWrapper``); 1 for an ordinary
        LoRA layer (one ``nn.Linear`` or a 2-D parameter).
    transposed : bool, default False
        The base tensor is stored ``(E, in, out)`` (an experts module with
        ``is_transposed``): expert ``e``'s update is then ``(s B_e A_e)^T``.
    base : str, default ""
        Name of the adapted (frozen) base tensor, for records and messages.
    """

    lora_a: str
    lora_b: str
    rank: int
    scaling: float
    num_experts: int = 1
    transposed: bool = False
    base: str = ""

    def a(self, state: Mapping[str, Tensor], index: int = 0) -> Tensor:
        """``A_index``, shape ``(r, in)`` (a view)."""
        return state[self.lora_a][index * self.rank : (index + 1) * self.rank]

    def b(self, state: Mapping[str, Tensor], index: int = 0) -> Tensor:
        """``B_index``, shape ``(out, r)`` (a strided view: columns ``index::E``)."""
        return state[self.lora_b][:, index :: self.num_experts]

    def delta(self, state: Mapping[str, Tensor], index: int = 0) -> Tensor:
        """``s B A`` of block ``index``, shaped like the base tensor's block (float32)."""
        product = lora_delta(self.b(state, index), self.a(state, index), self.scaling)
        return product.T if self.transposed else product

    def write(self, state: Mapping[str, Tensor], index: int, b: Tensor, a: Tensor) -> None:
        """Copy ``b`` ``(out, r)`` and ``a`` ``(r, in)`` into block ``index`` of ``state``'s
        tensors, in place (for dictionaries whose tensors the caller owns)."""
        target_b, target_a = self.b(state, index), self.a(state, index)
        if tuple(b.shape) != tuple(target_b.shape) or tuple(a.shape) != tuple(target_a.shape):
            raise ValueError(
                f"LoRA factors of {self.base or self.lora_a!r} block {index} have shapes "
                f"{tuple(target_b.shape)} and {tuple(target_a.shape)}; got {tuple(b.shape)} "
                f"and {tuple(a.shape)}"
            )
        target_b.copy_(b)
        target_a.copy_(a)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lora_a": self.lora_a,
            "lora_b": self.lora_b,
            "rank": self.rank,
            "scaling": self.scaling,
            "num_experts": self.num_experts,
            "transposed": self.transposed,
            "base": self.base,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoRAFactors:
        return cls(
            lora_a=str(data["lora_a"]),
            lora_b=str(data["lora_b"]),
            rank=int(data["rank"]),
            scaling=float(data["scaling"]),
            num_experts=int(data.get("num_experts", 1)),
            transposed=bool(data.get("transposed", False)),
            base=str(data.get("base", "")),
        )


@dataclass(frozen=True)
class LoRAExpertSlice:
    """Expert ``index``'s part of one LoRA pair: its factors and its weight update.

    Parameters
    ----------
    factors : LoRAFactors
    index : int, default 0
        The block of ``factors`` (the expert's row of a fused tensor; 0 for a per-expert
        LoRA layer).
    """

    factors: LoRAFactors
    index: int = 0

    def delta(self, state: Mapping[str, Tensor]) -> Tensor:
        """``delta_e = s B_e A_e``, shape of the base expert tensor (e.g. ``(2I, H)``)."""
        return self.factors.delta(state, self.index)

    def numel(self, state: Mapping[str, Tensor]) -> int:
        """Values of the update: ``out * in`` (not of the factors)."""
        return int(self.factors.b(state, self.index).shape[0]) * int(
            self.factors.a(state, self.index).shape[1]
        )

    def names(self) -> tuple[str, str]:
        return self.factors.lora_a, self.factors.lora_b
