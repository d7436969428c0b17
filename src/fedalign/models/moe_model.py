"""The loaded model: a classifier or causal LM plus its MoE view (:class:`MoEModel`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedalign.models.capture import RouterTap
from fedalign.models.device import autocast
from fedalign.models.upcycle import EncoderClassifier
from fedalign.moe.layout import MoELayout

Tensor = torch.Tensor


@dataclass
class MoEModel:
    """A classifier plus everything the federated code needs to know about its MoE parts.

    Parameters
    ----------
    model : nn.Module
        ``forward(input_ids, attention_mask)`` gives logits ``(B, C)`` or an output with
        ``.logits``; use :meth:`classify`.
    tokenizer : Any
        The model's tokenizer.
    layout : MoELayout
        MoE layers restricted to the trainable parameters (what travels).
    full_layout : MoELayout
        MoE layers over every parameter.
    taps : list of RouterTap
        Router hooks, one per MoE layer.
    architecture : str
    num_labels : int
    trainable_names : list of str
        Names of the parameters that train and travel, in a fixed order.
    head : str, default "classification"
        ``classification`` (logits ``(B, C)``) or ``causal-lm`` (next-token logits).
    device : torch.device, default cpu
        Where the model's parameters live (batches are moved there).
    autocast_dtype : torch.dtype or None, default None
        Autocast dtype of forward passes (None: float32).
    """

    model: nn.Module
    tokenizer: Any
    layout: MoELayout
    full_layout: MoELayout
    taps: list[RouterTap]
    architecture: str
    num_labels: int
    trainable_names: list[str] = field(default_factory=list)
    head: str = "classification"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_dtype: torch.dtype | None = None

    def autocast(self) -> Any:
        """The context forward passes run in (``run.precision``; nothing for float32)."""
        return autocast(self.device, self.autocast_dtype)

    def token_logits(self, input_ids: Tensor, attention_mask: Tensor, first: int = 0) -> Tensor:
        """Next-token logits ``(B, T - first, V)`` of a causal LM at positions ``first..T-1``.

        Positions before ``first`` are not projected onto the vocabulary
        (``logits_to_keep``), which saves most of the memory of a long context.
        """
        kwargs: dict[str, Any] = {}
        if first > 0:
            kwargs["logits_to_keep"] = torch.arange(
                first, input_ids.shape[1], device=input_ids.device
            )
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits: Tensor = output.logits
        return logits

    def classify(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``(B, C)``."""
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return output if isinstance(output, Tensor) else output.logits

    @property
    def supports_prefix_cache(self) -> bool:
        return isinstance(self.model, EncoderClassifier) and self.model.prefix_layers > 0

    def prefix(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        assert isinstance(self.model, EncoderClassifier)
        return self.model.prefix(input_ids, attention_mask)

    def classify_from_prefix(self, prefix_hidden: Tensor, attention_mask: Tensor) -> Tensor:
        assert isinstance(self.model, EncoderClassifier)
        return self.model.forward_from_prefix(prefix_hidden, attention_mask)

    def trainable_state(self) -> dict[str, Tensor]:
        """Copies of the trainable parameters (CPU tensors), keyed by name."""
        params = dict(self.model.named_parameters())
        # on the CPU whatever the device: what travels and is aggregated is device-agnostic
        return {name: params[name].detach().clone().cpu() for name in self.trainable_names}

    def load_trainable_state(self, state: Mapping[str, Tensor]) -> None:
        """Write ``state`` (a subset of the trainable names is fine) into the model."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                if name not in params:
                    raise KeyError(f"unknown parameter {name!r}")
                params[name].copy_(value)
