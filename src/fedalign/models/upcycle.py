"""Dense BERT-style encoder into an MoE classifier: upcycling and the classifier.

The MoE layer itself (:class:`~fedalign.models.block.UpcycledMoE`) lives in
:mod:`fedalign.models.block`; the expert initialisations other than copying (MoEfication,
Drop-Upcycling) live in :mod:`fedalign.models.moefy`; :func:`upcycle_encoder` dispatches on
``expert_init``.

With ``copy``, each chosen FFN (``intermediate.dense`` -> activation -> ``output.dense``)
is copied into ``E`` experts and a fresh router with top-k routing is added
(Komatsuzaki et al. 2023, "Sparse Upcycling"). Because the top-k weights are renormalised
to sum to one and every expert starts identical, the upcycled model reproduces the dense
model's hidden states at initialisation. The residual connection, dropout and LayerNorm of
``BertOutput`` stay shared (``output.dense`` becomes the identity and its weights move into
the experts).

:class:`EncoderClassifier` adds mean pooling and a linear head, and splits the forward pass
at the first trainable layer so the simulator can cache the frozen prefix's outputs; the
layers after the prefix run their per-token work on real tokens only
(:func:`packed_bert_layer`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedalign.models import moefy
from fedalign.models.block import UpcycledExpert, UpcycledMoE
from fedalign.models.heads import mean_pool

Tensor = torch.Tensor


def upcycle_bert_layer(
    layer: Any,
    num_experts: int,
    top_k: int,
    router_init_std: float,
    expert_init: str = "copy",
    gating: str = "renormalize",
    drop_fraction: float = 0.5,
    sample_hidden: Tensor | None = None,
    seed: int = 0,
) -> None:
    """Replace a ``BertLayer``'s FFN by an :class:`UpcycledMoE` in place.

    Parameters
    ----------
    layer : BertLayer
    num_experts, top_k : int
    router_init_std : float
        Std of a freshly drawn router (``copy`` and ``drop-upcycling``).
    expert_init : str, default "copy"
        ``copy``, ``drop-upcycling`` or ``moefication`` (see :mod:`fedalign.models.moefy`).
    gating : str, default "renormalize"
        See :func:`gate_weights`.
    drop_fraction : float, default 0.5
        Fraction of each copy's neurons re-initialised by ``drop-upcycling``.
    sample_hidden : Tensor or None, default None
        ``(N, H)`` hidden states entering this FFN on sample text (``moefication``).
    seed : int, default 0
    """
    intermediate = layer.intermediate
    output = layer.output
    moe: UpcycledMoE
    if expert_init == "moefication":
        moe, _labels = moefy.moefy_ffn(
            intermediate.dense,
            intermediate.intermediate_act_fn,
            output.dense,
            num_experts,
            top_k,
            gating,
            sample_hidden,
            seed=seed,
        )
    elif expert_init in ("copy", "drop-upcycling"):
        moe = UpcycledMoE(
            fc_in=intermediate.dense,
            activation=intermediate.intermediate_act_fn,
            fc_out=output.dense,
            num_experts=num_experts,
            top_k=top_k,
            router_init_std=router_init_std,
            gating=gating,
        )
        if expert_init == "drop-upcycling":
            # the global generator, seeded by the model builder
            for expert in moe.experts:
                assert isinstance(expert, UpcycledExpert)
                moefy.drop_upcycle_expert(expert, drop_fraction)
    else:
        raise ValueError(
            f"expert_init must be one of {list(moefy.EXPERT_INITS)} (got {expert_init!r})"
        )
    layer.intermediate = moe
    output.dense = nn.Identity()


def _packable(layer: Any) -> bool:
    attention = getattr(layer, "attention", None)
    return (
        attention is not None
        and hasattr(attention, "self")
        and hasattr(attention.self, "query")
        and not getattr(layer, "is_decoder", False)
        and getattr(layer, "chunk_size_feed_forward", 0) == 0
    )


def packed_bert_layer(layer: Any, hidden: Tensor, mask: Tensor | None, index: Tensor) -> Tensor:
    """``BertLayer.forward`` with every per-token operation on the real tokens only.

    The linear maps, LayerNorms and the FFN / MoE run on the ``n`` rows ``index`` of the
    flattened ``(B*T, H)`` hidden states; the attention product and every dropout run on
    the padded ``(B, T, ...)`` shapes, so they draw the same random numbers as the plain
    layer. Real tokens get the plain layer's numbers; padded rows come out as zeros (the
    attention mask hides them from real tokens and pooling ignores them).

    Parameters
    ----------
    layer : BertLayer
    hidden : Tensor
        ``(B, T, H)``.
    mask : Tensor or None
        The attention mask the plain layer gets.
    index : Tensor
        ``(n,)`` rows of the real tokens in ``hidden.reshape(B*T, H)``.
    """
    from transformers.models.bert.modeling_bert import (
        ALL_ATTENTION_FUNCTIONS,
        eager_attention_forward,
    )

    batch, length, _width = hidden.shape
    rows = batch * length

    def spread(values: Tensor) -> Tensor:  # (n, D) -> (B, T, D), zeros at padding
        full = values.new_zeros(rows, values.shape[-1]).index_copy(0, index, values)
        return full.reshape(batch, length, -1)

    def gather(values: Tensor) -> Tensor:  # (B, T, D) -> (n, D)
        return values.reshape(rows, -1).index_select(0, index)

    attention = layer.attention
    self_attention = attention.self
    real = gather(hidden)  # (n, H)
    heads = (batch, length, -1, self_attention.attention_head_size)
    query = spread(self_attention.query(real)).view(heads).transpose(1, 2)  # (B, h, T, d)
    key = spread(self_attention.key(real)).view(heads).transpose(1, 2)
    value = spread(self_attention.value(real)).view(heads).transpose(1, 2)
    interface: Any = ALL_ATTENTION_FUNCTIONS.get_interface(
        self_attention.config._attn_implementation, eager_attention_forward
    )
    context, _ = interface(
        self_attention,
        query,
        key,
        value,
        mask,
        dropout=0.0 if not self_attention.training else self_attention.dropout.p,
        scaling=self_attention.scaling,
    )
    context = gather(context.reshape(batch, length, -1))  # (n, H)
    self_output = attention.output
    projected = gather(self_output.dropout(spread(self_output.dense(context))))
    attended = self_output.LayerNorm(projected + real)  # (n, H)
    ffn = layer.output.dense(layer.intermediate(attended))  # (n, H)
    ffn = gather(layer.output.dropout(spread(ffn)))
    return spread(layer.output.LayerNorm(ffn + attended))  # (B, T, H)


class EncoderClassifier(nn.Module):
    """Mean-pooled linear classification head on a BERT-style or Switch encoder.

    ``forward(input_ids, attention_mask)`` returns logits ``(B, C)``. For BERT-style
    encoders, :meth:`prefix` and :meth:`forward_from_prefix` split the pass after
    ``prefix_layers`` encoder layers; the prefix always runs without dropout so that caching
    it gives the same numbers as recomputing it.

    Parameters
    ----------
    encoder : nn.Module
        ``BertModel`` (possibly upcycled) or ``SwitchTransformersEncoderModel``.
    hidden_size : int
    num_labels : int
    dropout : float, default 0.1
    """

    def __init__(
        self, encoder: nn.Module, hidden_size: int, num_labels: int, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.encoder: Any = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)
        self.prefix_layers = 0
        # run the layers after the prefix on real tokens only (see packed_bert_layer)
        self.pack_tokens = True

    # --- pooling and head -------------------------------------------------
    def _head(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        pooled = mean_pool(hidden, attention_mask)  # (B, H)
        return self.classifier(self.dropout(pooled))  # (B, C)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if not self._is_bert():
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
            return self._head(hidden.last_hidden_state, attention_mask)
        if self.prefix_layers > 0:
            return self.forward_from_prefix(self.prefix(input_ids, attention_mask), attention_mask)
        embedded = self.encoder.embeddings(input_ids=input_ids)
        return self._run_layers(embedded, attention_mask, 0)

    # --- prefix split (BERT-style only) -----------------------------------
    def _is_bert(self) -> bool:
        return hasattr(self.encoder, "embeddings") and hasattr(self.encoder, "encoder")

    def _layers(self) -> nn.ModuleList:
        layers: nn.ModuleList = self.encoder.encoder.layer
        return layers

    def _mask(self, embedded: Tensor, attention_mask: Tensor) -> Tensor | None:
        masks = self.encoder._create_attention_masks(  # pinned transformers 5.23 API
            attention_mask=attention_mask,
            encoder_attention_mask=None,
            embedding_output=embedded,
            encoder_hidden_states=None,
            past_key_values=None,
        )
        mask: Tensor | None = masks[0]
        return mask

    def _run_layers(self, hidden: Tensor, attention_mask: Tensor, start: int) -> Tensor:
        mask = self._mask(hidden, attention_mask)
        moe_layers = [m for m in self.modules() if isinstance(m, UpcycledMoE)]
        for moe in moe_layers:
            moe.token_mask = attention_mask.reshape(-1).bool()
        keep = attention_mask.reshape(-1).bool()  # (B*T,)
        packed = self.pack_tokens and not bool(keep.all())
        index = torch.nonzero(keep).reshape(-1)  # (n,) real-token rows
        try:
            for layer in self._layers()[start:]:
                if packed and _packable(layer):
                    hidden = packed_bert_layer(layer, hidden, mask, index)
                else:
                    hidden = layer(hidden, mask)
        finally:
            for moe in moe_layers:
                moe.token_mask = None
        return self._head(hidden, attention_mask)

    def prefix(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Hidden states after the first ``prefix_layers`` layers, ``(B, T, H)``, no dropout."""
        modules = [self.encoder.embeddings, *self._layers()[: self.prefix_layers]]
        was_training = [m.training for m in modules]
        for module in modules:
            module.eval()
        try:
            hidden = self.encoder.embeddings(input_ids=input_ids)
            mask = self._mask(hidden, attention_mask)
            for layer in self._layers()[: self.prefix_layers]:
                hidden = layer(hidden, mask)
        finally:
            for module, flag in zip(modules, was_training):
                module.train(flag)
        return hidden

    def forward_from_prefix(self, prefix_hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``(B, C)`` from the cached output of :meth:`prefix`."""
        return self._run_layers(prefix_hidden, attention_mask, self.prefix_layers)


def upcycle_encoder(
    encoder: Any,
    num_experts: int,
    top_k: int,
    upcycle_layers: int,
    router_init_std: float = 0.02,
    expert_init: str = "copy",
    gating: str = "renormalize",
    drop_fraction: float = 0.5,
    sample: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
) -> list[int]:
    """Turn the top ``upcycle_layers`` FFNs of a ``BertModel`` into MoE layers in place.

    Parameters
    ----------
    encoder : BertModel
    num_experts, top_k, upcycle_layers : int
    router_init_std : float, default 0.02
    expert_init : str, default "copy"
        ``copy``, ``drop-upcycling`` or ``moefication``.
    gating : str, default "renormalize"
    drop_fraction : float, default 0.5
    sample : (input_ids, attention_mask) or None, default None
        Sample text, ``(B, T)`` each, for MoEfication's clustering and router fit (taken from
        the dense encoder before any layer changes).
    seed : int, default 0

    Returns
    -------
    list of int
        The converted layer indices.
    """
    layers = encoder.encoder.layer
    if not 1 <= upcycle_layers <= len(layers):
        raise ValueError(
            f"model.upcycle-layers must be in [1, {len(layers)}] for this encoder "
            f"(got {upcycle_layers})"
        )
    indices = list(range(len(layers) - upcycle_layers, len(layers)))
    hidden: dict[int, Tensor] = {}
    if expert_init == "moefication" and sample is not None:
        hidden = moefy.ffn_inputs(encoder, indices, *sample)
    for index in indices:
        upcycle_bert_layer(
            layers[index],
            num_experts,
            top_k,
            router_init_std,
            expert_init=expert_init,
            gating=gating,
            drop_fraction=drop_fraction,
            sample_hidden=hidden.get(index),
            seed=seed + index,
        )
    return indices
