"""Pure-data description of where the MoE parts live in a flat parameter dictionary.

A :class:`MoELayout` names, for every MoE layer, the router tensors (one row per expert
along dimension 0) and the slices that make up each expert. Strategies, the simulator and
the Flower apps only ever see flat ``{name: tensor}`` dictionaries plus this layout, so the
aggregation code never touches a model object.

Two storage styles are covered by :class:`ExpertSlice`:

* fused experts (transformers 5): ``experts.gate_up_proj`` has shape ``(E, 2I, H)`` and
  expert ``e`` is rows ``[e, e + 1)`` of dimension 0;
* one module per expert (Switch, our upcycled encoders): expert ``e`` owns whole tensors.

With LoRA on the experts (``model.lora-experts``) the base expert tensors are frozen and do
not travel; each layer's ``lora_experts[e]`` then lists expert ``e``'s
:class:`~fedalign.moe.lora.LoRAExpertSlice` objects, whose weight update ``s B_e A_e`` is
what the strategies compare and merge (:meth:`MoELayerLayout.lora_delta_vector`), and
:attr:`MoELayout.lora_modules` lists every LoRA pair of the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedalign.moe.lora import LoRAExpertSlice, LoRAFactors

Tensor = torch.Tensor


@dataclass(frozen=True)
class ExpertSlice:
    """The part of one parameter tensor that belongs to one expert.

    Parameters
    ----------
    param : str
        Name of the tensor in the flat parameter dictionary.
    start, stop : int or None, default None
        Rows ``[start, stop)`` along dimension 0. ``None`` for both means the whole tensor.
    """

    param: str
    start: int | None = None
    stop: int | None = None

    def read(self, state: Mapping[str, Tensor]) -> Tensor:
        tensor = state[self.param]
        if self.start is None:
            return tensor
        return tensor[self.start : self.stop]

    def write(self, state: dict[str, Tensor], value: Tensor) -> None:
        """Write ``value`` into ``state`` in place of this slice (copy-on-write of the tensor)."""
        if self.start is None:
            old = state[self.param]
            # keep the stored dtype and device, as the sliced branch below does
            state[self.param] = value.reshape(old.shape).to(old.device, old.dtype).clone()
            return
        tensor = state[self.param].clone()
        tensor[self.start : self.stop] = value.reshape(tensor[self.start : self.stop].shape)
        state[self.param] = tensor

    def numel(self, state: Mapping[str, Tensor]) -> int:
        return int(self.read(state).numel())


@dataclass(frozen=True)
class MoELayerLayout:
    """One MoE layer: its router rows and its experts' slices.

    Parameters
    ----------
    name : str
        Module path of the MoE block, e.g. ``"model.layers.1.mlp"``. Used as the key of
        routing statistics and decision records.
    num_experts : int
        Number of routed experts ``E``.
    top_k : int
        Experts selected per token.
    hidden_size : int
        Width ``H`` of the hidden states entering the layer.
    router_params : tuple of str
        Router tensors; each has one row per expert along dimension 0 (weight ``(E, H)``,
        optional bias ``(E,)``).
    experts : tuple of tuple of ExpertSlice
        ``experts[e]`` lists the slices that make up expert ``e``. May be empty for an
        expert when none of its parameters is trainable.
    lora_experts : tuple of tuple of LoRAExpertSlice, default ()
        Empty unless the experts carry LoRA adapters; then ``lora_experts[e]`` lists
        expert ``e``'s LoRA blocks (e.g. its ``gate_up_proj`` and ``down_proj`` factors).
    """

    name: str
    num_experts: int
    top_k: int
    hidden_size: int
    router_params: tuple[str, ...]
    experts: tuple[tuple[ExpertSlice, ...], ...]
    lora_experts: tuple[tuple[LoRAExpertSlice, ...], ...] = ()

    def expert_param_names(self) -> set[str]:
        return {s.param for slices in self.experts for s in slices}

    def lora_expert_param_names(self) -> set[str]:
        """Names of the LoRA factor tensors of this layer's experts."""
        return {name for slices in self.lora_experts for s in slices for name in s.names()}

    def has_lora_expert(self, expert: int) -> bool:
        """Whether expert ``expert`` is adapted by LoRA and has no trainable base slice."""
        return (
            bool(self.lora_experts)
            and bool(self.lora_experts[expert])
            and not (self.experts[expert])
        )

    def lora_delta_vector(self, state: Mapping[str, Tensor], expert: int) -> Tensor:
        """Expert ``expert``'s weight update ``s B_e A_e`` of every LoRA block, flattened and
        concatenated: shape ``(P_e,)`` with ``P_e = sum out * in`` (float32)."""
        parts = [s.delta(state).reshape(-1) for s in self.lora_experts[expert]]
        if not parts:
            return torch.zeros(0)
        return torch.cat(parts)

    def expert_vector(self, state: Mapping[str, Tensor], expert: int) -> Tensor:
        """Expert ``expert`` flattened into one vector, shape ``(P_e,)``."""
        parts = [s.read(state).reshape(-1) for s in self.experts[expert]]
        if not parts:
            return torch.zeros(0)
        return torch.cat(parts)

    def expert_matrix(self, state: Mapping[str, Tensor]) -> Tensor:
        """All experts stacked, shape ``(E, P_e)``."""
        return torch.stack([self.expert_vector(state, e) for e in range(self.num_experts)])

    def write_expert_vector(self, state: dict[str, Tensor], expert: int, vector: Tensor) -> None:
        """Inverse of :meth:`expert_vector`: scatter a ``(P_e,)`` vector back into ``state``."""
        sizes = [s.numel(state) for s in self.experts[expert]]
        # check before writing anything: a wrong length must leave ``state`` untouched
        if sum(sizes) != vector.numel():
            raise ValueError(
                f"expert vector has {vector.numel()} values, layer {self.name!r} expert "
                f"{expert} has {sum(sizes)}"
            )
        offset = 0
        for s, size in zip(self.experts[expert], sizes):
            s.write(state, vector[offset : offset + size])
            offset += size


@dataclass(frozen=True)
class MoELayout:
    """All MoE layers of a model, in forward order."""

    layers: tuple[MoELayerLayout, ...]
    lora_modules: tuple[LoRAFactors, ...] = ()
    """Every LoRA pair among the parameters (experts, attention, router), empty without
    LoRA."""

    def router_param_names(self) -> set[str]:
        return {p for layer in self.layers for p in layer.router_params}

    def expert_param_names(self) -> set[str]:
        return {p for layer in self.layers for p in layer.expert_param_names()}

    def layer(self, name: str) -> MoELayerLayout:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no MoE layer named {name!r}; layers: {[x.name for x in self.layers]}")

    def restrict(self, names: Iterable[str]) -> MoELayout:
        """Keep only the tensors in ``names`` (e.g. the trainable ones that travel).

        A LoRA pair is kept when both its factors are in ``names``.
        """
        keep = set(names)

        def kept(factors: LoRAFactors) -> bool:
            return factors.lora_a in keep and factors.lora_b in keep

        layers = []
        for layer in self.layers:
            layers.append(
                MoELayerLayout(
                    name=layer.name,
                    num_experts=layer.num_experts,
                    top_k=layer.top_k,
                    hidden_size=layer.hidden_size,
                    router_params=tuple(p for p in layer.router_params if p in keep),
                    experts=tuple(
                        tuple(s for s in slices if s.param in keep) for slices in layer.experts
                    ),
                    lora_experts=tuple(
                        tuple(s for s in slices if kept(s.factors)) for slices in layer.lora_experts
                    ),
                )
            )
        return MoELayout(
            layers=tuple(layers),
            lora_modules=tuple(f for f in self.lora_modules if kept(f)),
        )

    def rename(
        self, names: Mapping[str, str], layer_names: Mapping[str, str] | None = None
    ) -> MoELayout:
        """The same layout with every tensor name ``n`` in ``names`` replaced by ``names[n]``
        and every layer name ``l`` in ``layer_names`` by ``layer_names[l]`` (e.g. after peft
        wrapped the model and prefixed its parameter and module names)."""
        layer_names = layer_names or {}

        def new(name: str) -> str:
            return names.get(name, name)

        return MoELayout(
            layers=tuple(
                dataclasses.replace(
                    layer,
                    name=layer_names.get(layer.name, layer.name),
                    router_params=tuple(new(p) for p in layer.router_params),
                    experts=tuple(
                        tuple(dataclasses.replace(s, param=new(s.param)) for s in slices)
                        for slices in layer.experts
                    ),
                )
                for layer in self.layers
            ),
            lora_modules=self.lora_modules,
        )

    def lora_expert_param_names(self) -> set[str]:
        """Names of the LoRA factor tensors of the routed experts (every layer)."""
        return {p for layer in self.layers for p in layer.lora_expert_param_names()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for run folders and Flower messages).

        LoRA entries (``"lora_modules"``; per layer ``"lora_experts"`` as ``[index into
        lora_modules, block]`` pairs) appear only when there are any.
        """
        modules = list(self.lora_modules)
        position = {factors: i for i, factors in enumerate(modules)}
        layers = []
        for layer in self.layers:
            entry: dict[str, Any] = {
                "name": layer.name,
                "num_experts": layer.num_experts,
                "top_k": layer.top_k,
                "hidden_size": layer.hidden_size,
                "router_params": list(layer.router_params),
                "experts": [
                    [[s.param, s.start, s.stop] for s in slices] for slices in layer.experts
                ],
            }
            if layer.lora_experts:
                for slices in layer.lora_experts:
                    for s in slices:
                        if s.factors not in position:
                            position[s.factors] = len(modules)
                            modules.append(s.factors)
                entry["lora_experts"] = [
                    [[position[s.factors], s.index] for s in slices]
                    for slices in layer.lora_experts
                ]
            layers.append(entry)
        data: dict[str, Any] = {"layers": layers}
        if modules:
            data["lora_modules"] = [m.to_dict() for m in modules]
        if len(modules) > len(self.lora_modules):
            data["lora_module_count"] = len(self.lora_modules)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoELayout:
        modules = [LoRAFactors.from_dict(m) for m in data.get("lora_modules", [])]
        # entries past "lora_module_count" are pairs only the experts reference
        listed = int(data.get("lora_module_count", len(modules)))
        return cls(
            layers=tuple(
                MoELayerLayout(
                    name=layer["name"],
                    num_experts=int(layer["num_experts"]),
                    top_k=int(layer["top_k"]),
                    hidden_size=int(layer["hidden_size"]),
                    router_params=tuple(layer["router_params"]),
                    experts=tuple(
                        tuple(ExpertSlice(p, start, stop) for p, start, stop in slices)
                        for slices in layer["experts"]
                    ),
                    lora_experts=tuple(
                        tuple(LoRAExpertSlice(modules[int(i)], int(b)) for i, b in slices)
                        for slices in layer.get("lora_experts", [])
                    ),
                )
                for layer in data["layers"]
            ),
            lora_modules=tuple(modules[:listed]),
        )
