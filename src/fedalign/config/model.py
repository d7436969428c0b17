"""``[model]``: which model, how it becomes an MoE and which of its parameters train."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from fedalign.config.checks import at_least_one, in_unit_interval, one_of
from fedalign.errors import ConfigError

TRAINABLE_CHOICES = ("all", "moe+head", "lora")
LORA_ROUTER_CHOICES = ("full", "lora", "frozen")
"""``model.lora-router``: how the routers train when ``model.trainable = "lora"``."""
LORA_AGGREGATIONS = ("factors", "product-svd")
"""``model.lora-aggregation``: FedIT factor means, or the exact product mean re-factorised."""
QUANTIZE_CHOICES = ("none", "4bit")
"""``model.quantize``: base weights as loaded, or 4-bit NF4 (bitsandbytes, CUDA only)."""
EXPERT_INITS = ("moefication", "copy", "drop-upcycling")
GATINGS = ("auto", "renormalize", "scaled", "straight-through")
HEADS = ("auto", "classification", "causal-lm")
"""``model.head``: ``auto`` is ``causal-lm`` for multiple-choice data, else ``classification``."""


@dataclass
class ModelConfig:
    """Which model, how it becomes an MoE and which of its parameters train.

    Parameters
    ----------
    name : str, default "upcycled-minilm"
        ``upcycled-minilm`` (the embedded all-MiniLM-L6-v2, its top FFNs turned into MoE
        layers per ``expert_init``), a tiny
        test configuration (``fedalign.models.TINY_MODELS``: ``tiny-qwen3moe``,
        ``tiny-deepseek-v2``, ``tiny-granitemoe``, ...), a Hugging Face model id or a local
        folder.
    num_experts : int, default 8
        Experts per upcycled layer (upcycled encoders only).
    top_k : int, default 2
        Experts selected per token (upcycled encoders only; hub models keep their own).
    upcycle_layers : int, default 2
        How many of the encoder's top FFN layers become MoE layers (upcycled only).
    trainable : str, default "moe+head"
        ``all``, ``moe+head`` (MoE layers and classifier; everything else frozen) or
        ``lora`` (LoRA adapters on ``lora_targets`` plus routers and classifier).
    lora_rank : int, default 8
    lora_alpha : int, default 16
    lora_targets : list of str, default ["query", "value"]
        Modules (e.g. attention projections) that get LoRA adapters.
    lora_experts : bool, default False
        With ``trainable = "lora"``: LoRA on the routed experts too, one rank-``lora_rank``
        adapter per expert (peft ``target_parameters`` on fused ``(E, ., .)`` expert tensors,
        rank stacked per expert; ``target_modules`` on per-expert linear layers). The
        strategies then compare and merge each expert's update ``s B_e A_e``.
    lora_router : str, default "full"
        With ``trainable = "lora"``: ``full`` (routers train fully), ``lora`` (routers get
        LoRA adapters; FedAlign-MoE's row-wise router step then does not apply) or
        ``frozen``.
    lora_aggregation : str, default "factors"
        How the server aggregates LoRA pairs: ``factors`` (weighted means of ``A`` and of
        ``B``, FedIT; inexact) or ``product-svd`` (the weighted mean of the products
        ``B A``, exact, re-factorised to rank ``lora_rank`` by truncated SVD).
    quantize : str, default "none"
        ``4bit``: load the base weights in 4-bit NF4 (bitsandbytes; needs CUDA and
        ``trainable = "lora"``; hub or folder models only).
    max_length : int, default 64
        Tokens per example after truncation.
    load_balance_coef : float, default 0.0
        Coefficient of the Switch-style load-balancing loss computed on router logits.
    router_noise_std : float, default 0.02
        Std of the normal initialisation of the fresh router of upcycled layers (0 gives a
        zero router: uniform routing probabilities).
    cache_prefix : bool, default True
        For upcycled encoders whose lower layers are frozen, run the frozen prefix once per
        example and reuse its outputs every round (same numbers, far less compute).
    expert_init : str, default "moefication"
        How a dense encoder's FFN becomes experts (upcycled encoders only):
        ``moefication`` (split the FFN's neurons into ``num_experts`` balanced groups, each
        expert ``1/num_experts`` of the FFN, router fitted on sample text), ``copy`` (every
        expert a full copy, fresh router; sparse upcycling) or ``drop-upcycling`` (copies
        with a fraction ``drop_fraction`` of each copy's neurons re-initialised).
    drop_fraction : float, default 0.5
        Fraction of each copy's intermediate neurons re-initialised by ``drop-upcycling``.
    gating : str, default "auto"
        Weights of the selected experts' outputs: ``renormalize`` (top-k probabilities
        renormalised to sum to one), ``scaled`` (the same times ``top_k``),
        ``straight-through`` (exactly one in value, the probability's gradient) or ``auto``
        (``straight-through`` for ``moefication``, ``renormalize`` otherwise).
    head : str, default "auto"
        ``classification`` (a sequence-classification head; text-classification data),
        ``causal-lm`` (the model's language-modelling head; multiple-choice data, scored by
        the log-likelihood of each choice) or ``auto`` (``causal-lm`` when ``data.dataset``
        is multiple-choice, else ``classification``).
    tokenizer : str, default ""
        A tokenizer folder or Hugging Face hub id to use instead of the model's own (empty:
        the model folder's or hub id's own tokenizer; the embedded all-MiniLM-L6-v2
        tokenizer for tiny configurations and folders saved without one). Its vocabulary
        must fit the model's input embedding.
    """

    name: str = "upcycled-minilm"
    num_experts: int = 8
    top_k: int = 2
    upcycle_layers: int = 2
    trainable: str = "moe+head"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    lora_experts: bool = False
    lora_router: str = "full"
    lora_aggregation: str = "factors"
    quantize: str = "none"
    max_length: int = 64
    load_balance_coef: float = 0.0
    router_noise_std: float = 0.02
    cache_prefix: bool = True
    expert_init: str = "moefication"
    drop_fraction: float = 0.5
    gating: str = "auto"
    head: str = "auto"
    tokenizer: str = ""

    def resolved_gating(self) -> str:
        """The gating ``auto`` stands for with this ``expert_init``."""
        if self.gating != "auto":
            return self.gating
        return "straight-through" if self.expert_init == "moefication" else "renormalize"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first ``model.*`` key out of range."""
        one_of("model.trainable", self.trainable, TRAINABLE_CHOICES)
        one_of("model.expert-init", self.expert_init, EXPERT_INITS)
        one_of("model.gating", self.gating, GATINGS)
        one_of("model.head", self.head, HEADS)
        self._validate_lora()
        in_unit_interval("model.drop-fraction", self.drop_fraction, "[0, 1]")
        at_least_one("model.num-experts", self.num_experts)
        at_least_one("model.top-k", self.top_k)
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"model.top-k ({self.top_k}) must be <= model.num-experts ({self.num_experts})"
            )
        at_least_one("model.max-length", self.max_length)
        at_least_one("model.upcycle-layers", self.upcycle_layers)

    def _validate_lora(self) -> None:
        """The LoRA keys: in range, and left at their defaults unless ``trainable = "lora"``."""
        one_of("model.lora-router", self.lora_router, LORA_ROUTER_CHOICES)
        one_of("model.lora-aggregation", self.lora_aggregation, LORA_AGGREGATIONS)
        one_of("model.quantize", self.quantize, QUANTIZE_CHOICES)
        at_least_one("model.lora-rank", self.lora_rank)
        if self.trainable == "lora":
            return
        defaults = {item.name: item.default for item in fields(self)}
        for name in _LORA_ONLY:
            value = getattr(self, name)
            if value != defaults[name]:
                raise ConfigError(
                    f"model.{name.replace('_', '-')} = {value!r} needs model.trainable = 'lora' "
                    f"(got {self.trainable!r})"
                )


_LORA_ONLY = ("lora_experts", "lora_router", "lora_aggregation", "quantize")
"""Keys of :class:`ModelConfig` that take effect only with ``trainable = "lora"``."""
