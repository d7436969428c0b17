"""Computed GPU memory per client for the commands in docs/gpu-and-llm.md (no GPU needed).

Each model is built from its published configuration on PyTorch's ``meta`` device (shapes
only, no weights, no download), the trainable parameters are selected as fedalign selects
them, and the memory of one client's local training is *computed*:

* weights: trainable parameters in float32, frozen ones in float32 (or bfloat16 with
  ``run.frozen-dtype = "bf16"``);
* gradients (float32) and AdamW's two moments (float32) of the trainable parameters, plus
  the trainer's float32 copy of the round's global trainable parameters (the reference of
  FedProx-style terms);
* activations kept for the backward pass, estimated with the per-layer formula of
  Korthikanti et al. (2022, "Reducing Activation Recomputation in Large Transformer
  Models"), ``s * b * h * (34 + 5 * a * s / h)`` bytes in 16-bit (twice that in float32),
  over every layer, plus the float32 logits of the positions that are scored.

It is an estimate (allocator slack, CUDA context (about 0.5 GiB) and kernels' workspaces
come on top), not a measurement. Usage: ``python scripts/estimate_memory.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers as hf

GIB = 2**30


@dataclass
class Setting:
    label: str
    parameters: int
    trainable: int
    layers: int
    hidden: int
    heads: int
    batch: int
    seq: int
    scored_positions: int
    vocab_or_classes: int


def _count(model: torch.nn.Module, trainable: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for n, p in model.named_parameters() if trainable(n, p))
    return total, train


def switch_base_16() -> Setting:
    """google/switch-base-16's encoder with a 4-class pooled head (AG News), moe+head."""
    config = hf.SwitchTransformersConfig(
        vocab_size=32128,
        d_model=768,
        d_ff=3072,
        d_kv=64,
        num_heads=12,
        num_layers=12,
        num_decoder_layers=12,
        num_experts=16,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
    )
    with torch.device("meta"):
        encoder = hf.SwitchTransformersEncoderModel(config)
    head = 768 * 4 + 4
    total, train = _count(encoder, lambda n, p: ".mlp.router." in n or ".mlp.experts." in n)
    return Setting(
        "Switch-base-16 encoder, AG News, moe+head, batch 16 x 128 tokens",
        total + head,
        train + head,
        12,
        768,
        12,
        16,
        128,
        16,
        4,
    )


def deepseek_v2_lite(trainable: str) -> Setting:
    """deepseek-ai/DeepSeek-V2-Lite as a causal LM on MMLU (cloze, 4 choices)."""
    config = hf.DeepseekV2Config(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_shared_experts=2,
        n_routed_experts=64,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
    )
    with torch.device("meta"):
        model = hf.AutoModelForCausalLM.from_config(config)
    if trainable == "moe+head":
        total, train = _count(model, lambda n, p: ".mlp.experts." in n or ".mlp.gate." in n)
        total_train = train
    else:
        # LoRA rank 8 on q_proj and o_proj of every layer, plus the routers
        total, routers = _count(model, lambda n, p: ".mlp.gate." in n)
        rank = 8
        lora = 27 * rank * ((2048 + 3072) + (2048 + 2048))
        total, total_train = total + lora, routers + lora
    return Setting(
        f"DeepSeek-V2-Lite causal LM, MMLU, {trainable}, batch 4 x 512 tokens",
        total,
        total_train,
        27,
        2048,
        16,
        4,
        512,
        32,
        102400,
    )


def check_moe_options(quick: bool = False) -> dict[str, Any]:
    """The random-weight MoE of ``scripts/gpu_check.sh`` (a ``Qwen3MoeConfig``'s options).

    Qwen3-30B-A3B's layer shape (hidden 2048, 32 query and 4 key-value heads of 128, experts
    of width 768, 8 of them per token, its 151,936-token vocabulary) with 64 experts per
    layer instead of 128 and 6 layers instead of 48: 2.24 B parameters, 1.81 B of them in
    experts. ``quick``: a small model of the same family for the CPU dry run.
    """
    if quick:
        shape = {
            "vocab_size": 30522,
            "hidden_size": 128,
            "moe_intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
        }
    else:
        shape = {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "moe_intermediate_size": 768,
            "num_hidden_layers": 6,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 64,
            "num_experts_per_tok": 8,
        }
    return {**shape, "intermediate_size": 3 * shape["hidden_size"], "pad_token_id": 0}


CHECK_LABELS = 8
"""Classes of the GPU check's synthetic classification task."""


def check_batch(quick: bool = False) -> tuple[int, int]:
    """``(batch, tokens per sequence)`` of the GPU check's client round."""
    return (2, 64) if quick else (8, 512)


def qwen3_moe_check(quick: bool = False) -> Setting:
    """The GPU check's MoE (:func:`check_moe_options`) as a sequence classifier, moe+head
    (routers, experts and the class head train), one batch of :func:`check_batch`."""
    options = check_moe_options(quick)
    config = hf.Qwen3MoeConfig(**options, num_labels=CHECK_LABELS)
    with torch.device("meta"):
        model = hf.AutoModelForSequenceClassification.from_config(config)
    total, train = _count(
        model,
        lambda n, p: ".mlp.experts." in n or ".mlp.gate." in n or n.startswith("score."),
    )
    batch, seq = check_batch(quick)
    return Setting(
        f"GPU check: Qwen3-MoE-shaped classifier, {options['num_hidden_layers']} layers x "
        f"{options['num_experts']} experts, moe+head, batch {batch} x {seq} tokens",
        total,
        train,
        options["num_hidden_layers"],
        options["hidden_size"],
        options["num_attention_heads"],
        batch,
        seq,
        1,
        CHECK_LABELS,
    )


def memory(setting: Setting, frozen_bytes: int, activation_bytes: int) -> dict[str, float]:
    frozen = setting.parameters - setting.trainable
    weights = setting.trainable * 4 + frozen * frozen_bytes
    optimiser = setting.trainable * (4 + 8 + 4)  # gradients, AdamW moments, reference copy
    s, b, h, a = setting.seq, setting.batch, setting.hidden, setting.heads
    per_layer = s * b * h * (34 + 5 * a * s / h) * activation_bytes / 2
    activations = setting.layers * per_layer
    logits = b * setting.scored_positions * setting.vocab_or_classes * 4 * 2
    total = weights + optimiser + activations + logits
    return {
        "weights": weights / GIB,
        "grad+adam+ref": optimiser / GIB,
        "activations": (activations + logits) / GIB,
        "total": total / GIB,
    }


def main() -> None:
    rows = [
        (switch_base_16(), "fp32", 4, 4),
        (switch_base_16(), "bf16", 4, 2),
        (deepseek_v2_lite("lora"), "bf16", 4, 2),
        (deepseek_v2_lite("lora"), "bf16 + frozen bf16", 2, 2),
        (deepseek_v2_lite("moe+head"), "bf16", 4, 2),
        (qwen3_moe_check(), "bf16", 4, 2),
    ]
    print(
        "| setting | precision | parameters | trainable | weights GiB | grad+AdamW+ref GiB "
        "| activations GiB | total GiB (computed) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for setting, precision, frozen_bytes, activation_bytes in rows:
        m = memory(setting, frozen_bytes, activation_bytes)
        print(
            f"| {setting.label} | {precision} | {setting.parameters / 1e9:.3f} B "
            f"| {setting.trainable / 1e6:.1f} M | {m['weights']:.1f} | {m['grad+adam+ref']:.1f} "
            f"| {m['activations']:.1f} | {m['total']:.1f} |"
        )


if __name__ == "__main__":
    main()
