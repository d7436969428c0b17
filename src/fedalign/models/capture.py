"""Capture router logits and the hidden states entering each MoE layer during a forward pass.

Hugging Face's sequence-classification heads drop router logits, so we never rely on a
model's outputs: a forward hook on every router module records its input (the hidden
states entering the MoE layer) and its logits. Padding tokens are removed with the
attention mask given to :meth:`RoutingCapture.set_token_mask`.

Captured tensors keep their autograd graph unless ``detach=True``, so the routing
regulariser and the load-balancing loss can be computed from them during training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Tensor = torch.Tensor


def _pinnable(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a CPU tensor worth pinning (a GPU will read it)."""
    return tensor.device.type == "cpu" and torch.cuda.is_available()


@dataclass(frozen=True)
class RouterTap:
    """Where to listen for one MoE layer's routing.

    Parameters
    ----------
    layer : str
        The layer's name in the :class:`~fedalign.moe.MoELayout`.
    module : nn.Module
        The router module; its first positional input is the hidden states entering the
        layer, shape ``(B, T, H)`` or ``(B*T, H)``.
    logits_from_output : callable
        Picks the router logits (``(..., E)``) out of the router module's output.
    """

    layer: str
    module: nn.Module
    logits_from_output: Callable[[Any], Tensor]


class RoutingCapture:
    """Context manager recording ``(logits, hidden)`` per MoE layer.

    Parameters
    ----------
    taps : sequence of RouterTap
        One per MoE layer.
    detach : bool, default False
        Detach captured tensors (statistics passes); keep the graph otherwise.
    """

    def __init__(self, taps: Sequence[RouterTap], detach: bool = False) -> None:
        self.taps = list(taps)
        self.detach = detach
        self._handles: list[RemovableHandle] = []
        self._token_index: Tensor | None = None
        self._token_count = 0
        self._index_on: dict[torch.device, Tensor] = {}
        self._records: dict[str, list[tuple[Tensor, Tensor]]] = {t.layer: [] for t in self.taps}

    def set_token_mask(self, attention_mask: Tensor | None) -> None:
        """Keep only tokens where ``attention_mask`` (``(B, T)``) is nonzero.

        The kept positions are found here, once per batch: from a CPU mask without reading
        the GPU (the hooks then gather them on the GPU without waiting for it).
        """
        if attention_mask is None:
            self._token_index, self._index_on = None, {}
            return
        index = attention_mask.reshape(-1).nonzero().squeeze(1)  # (N_tokens,)
        self._token_index = index.pin_memory() if _pinnable(index) else index
        self._token_count = int(attention_mask.numel())
        self._index_on = {index.device: self._token_index}

    def _kept(self, device: torch.device) -> Tensor:
        """The kept positions on ``device`` (moved once per batch)."""
        if device not in self._index_on:
            assert self._token_index is not None
            self._index_on[device] = self._token_index.to(device, non_blocking=True)
        return self._index_on[device]

    def _hook(self, tap: RouterTap) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(_module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            hidden = inputs[0]
            logits = tap.logits_from_output(output)
            hidden = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
            logits = logits.reshape(-1, logits.shape[-1])  # (B*T, E)
            if self._token_index is not None and self._token_count == hidden.shape[0]:
                kept = self._kept(hidden.device)
                hidden = hidden.index_select(0, kept)  # (N_tokens, H)
                logits = logits.index_select(0, kept)  # (N_tokens, E)
            if self.detach:
                hidden, logits = hidden.detach(), logits.detach()
            self._records[tap.layer].append((logits, hidden))

        return hook

    def __enter__(self) -> RoutingCapture:
        for tap in self.taps:
            self._handles.append(tap.module.register_forward_hook(self._hook(tap)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def pop(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Everything captured since the last pop: per layer ``(logits (N, E), hidden (N, H))``."""
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for layer, records in self._records.items():
            if records:
                out[layer] = (
                    torch.cat([r[0] for r in records]),
                    torch.cat([r[1] for r in records]),
                )
            self._records[layer] = []
        return out
