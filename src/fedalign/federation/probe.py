"""Public-probe semantics: FedAlign-MoE's semantic vectors measured on the server.

With ``strategy.semantic-privacy = public-probe`` no client hidden state leaves a client:
each sends ``mean_hidden`` as an empty ``(E, 0)`` tensor. The server holds a probe set
(``PreparedData.probe``: held-out examples that are neither any client's nor the global
test set's) and, each round, for every MoE layer:

1. runs the *global* model (the round's starting parameters) over the probe set and keeps
   the hidden states entering the layer, ``h`` of shape ``(N, H)`` (``N`` probe tokens);
2. for each client ``i``, routes ``h`` with client ``i``'s uploaded router (top-k of its
   logits, the layer's ``k``) and applies client ``i``'s uploaded expert ``e`` to the tokens
   routed to ``e``;
3. takes the mean expert output per ``(i, e)`` as the semantic vector ``v_i(e)`` ``(H,)``
   (zero when no probe token reaches ``e``).

``v_i(e)`` replaces ``mu_i(e)`` in the results handed to the strategy, so step D (the
similarities ``S_ij(e)``, ``semantic-centre``, the consensus and threshold) runs unchanged.
Which clients count as active for ``e`` still comes from their own ``token_count``.

Shapes: ``N`` probe tokens, ``E`` experts, ``H`` hidden width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedalign.client import ModelInputs, PreparedData, forward_logits
from fedalign.config import ExperimentConfig
from fedalign.errors import ConfigError
from fedalign.models import MoEModel, RoutingCapture
from fedalign.models.experts import expert_forward, router_logits
from fedalign.protocol import ClientResult

Tensor = torch.Tensor

PROBE_BATCH = 64
"""Probe examples per forward pass of the global model."""


class SemanticProbe:
    """Semantic vectors of clients' experts on the server's probe set.

    Parameters
    ----------
    model : MoEModel
        The server's model (its trainable parameters are overwritten while measuring and
        reset to the round's global ones afterwards).
    probe : ModelInputs
        The probe examples (prefix-cached like the other rows when the model allows it).
    batch_size : int, default PROBE_BATCH
    """

    def __init__(self, model: MoEModel, probe: ModelInputs, batch_size: int = PROBE_BATCH):
        self.model = model
        self.probe = probe
        self.batch_size = batch_size
        self.last_tokens: dict[str, int] = {}

    @torch.no_grad()
    def hidden_inputs(self, global_parameters: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per layer, the hidden states ``(N, H)`` entering it under the global model."""
        self.model.load_trainable_state(global_parameters)
        self.model.model.eval()
        pieces: dict[str, list[Tensor]] = {}
        with RoutingCapture(self.model.taps, detach=True) as capture:
            for start in range(0, len(self.probe), self.batch_size):
                rows = torch.arange(start, min(start + self.batch_size, len(self.probe)))
                batch = self.probe.select(rows)
                capture.set_token_mask(batch.attention_mask)
                forward_logits(self.model, batch)
                for layer, (_logits, hidden) in capture.pop().items():
                    pieces.setdefault(layer, []).append(hidden.float())
        return {layer: torch.cat(parts) for layer, parts in pieces.items()}

    @torch.no_grad()
    def client_vectors(
        self, hidden: Mapping[str, Tensor], parameters: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """One client's ``v(e)`` per layer, ``(E, H)``, from its uploaded ``parameters``."""
        self.model.load_trainable_state(parameters)
        taps = {tap.layer: tap for tap in self.model.taps}
        vectors: dict[str, Tensor] = {}
        for layer in self.model.full_layout.layers:
            if layer.name not in hidden:
                continue
            tokens = hidden[layer.name]  # (N, H)
            block = self.model.model.get_submodule(layer.name)
            logits = router_logits(taps[layer.name], tokens)  # (N, E)
            chosen = logits.float().topk(layer.top_k, dim=-1).indices  # (N, k)
            out = torch.zeros(layer.num_experts, tokens.shape[-1])  # (E, H)
            for expert in range(layer.num_experts):
                routed = (chosen == expert).any(dim=-1)  # (N,)
                if routed.any():
                    out[expert] = expert_forward(block, expert, tokens[routed]).float().mean(0)
            vectors[layer.name] = out
        return vectors

    def __call__(
        self, global_parameters: Mapping[str, Tensor], results: Sequence[ClientResult]
    ) -> list[ClientResult]:
        """``results`` with every layer's ``mean_hidden`` replaced by the probe vectors."""
        hidden = self.hidden_inputs(global_parameters)
        self.last_tokens = {layer: int(h.shape[0]) for layer, h in hidden.items()}
        replaced = []
        try:
            for result in results:
                vectors = self.client_vectors(hidden, result.parameters)
                statistics = {
                    name: dataclasses.replace(stats, mean_hidden=vectors[name])
                    if name in vectors
                    else stats
                    for name, stats in result.routing_statistics.items()
                }
                replaced.append(dataclasses.replace(result, routing_statistics=statistics))
        finally:
            self.model.load_trainable_state(global_parameters)
        return replaced

    def record(self) -> dict[str, Any]:
        """The decisions record's ``semantic_privacy`` entry for the last measurement."""
        return {
            "mode": "public-probe",
            "probe_examples": len(self.probe),
            "probe_tokens": dict(self.last_tokens),
        }


def semantic_probe_for(
    config: ExperimentConfig, model: MoEModel, data: PreparedData
) -> SemanticProbe | None:
    """A :class:`SemanticProbe` for ``public-probe`` runs, else None.

    Raises
    ------
    ConfigError
        ``public-probe`` with data prepared without a probe set.
    """
    if config.strategy.semantic_privacy != "public-probe":
        return None
    if data.probe is None:
        raise ConfigError(
            "strategy.semantic-privacy = 'public-probe' needs the server's probe set, but the "
            "prepared data has none (prepare it with this config: fedalign.client.prepare)"
        )
    return SemanticProbe(model, data.probe)
