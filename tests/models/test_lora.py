"""LoRA on experts and routers (fedalign.models.lora): wrapping, the view, 4-bit loading."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedalign.config import ConfigError, ExperimentConfig, ModelConfig
from fedalign.models import MoEModel, load_moe_model, tiny_hf_config
from fedalign.models.capture import RoutingCapture
from fedalign.models.lora import expert_targets, quantization_kwargs
from fedalign.moe import ExpertSlice, MoELayerLayout, MoELayout

Tensor = torch.Tensor


def _load(name: str = "tiny-qwen3moe", **kwargs: Any) -> MoEModel:
    options: dict[str, Any] = {"trainable": "lora", "lora_rank": 2, "lora_experts": True}
    options["lora_targets"] = ["q_proj", "v_proj"] if "qwen" in name else []
    options.update(kwargs)
    return load_moe_model(ModelConfig(name=name, **options), num_labels=3)


def test_fused_experts_get_one_adapter_per_expert() -> None:
    moe = _load()
    params = dict(moe.model.named_parameters())
    trainable = set(moe.trainable_names)
    assert {n for n, p in params.items() if p.requires_grad} == trainable
    # frozen base experts; routers (lora-router = full) and the head train
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n in trainable)
    assert moe.layout.router_param_names() <= trainable
    assert any(n.startswith("base_model.model.score.") for n in trainable)
    for layer, full in zip(moe.layout.layers, moe.full_layout.layers, strict=True):
        assert layer.experts == ((),) * layer.num_experts  # base slices do not travel
        for expert in range(layer.num_experts):
            assert layer.has_lora_expert(expert)
            blocks = layer.lora_experts[expert]
            assert [b.factors.base.rsplit(".", 1)[1] for b in blocks] == [
                "gate_up_proj",
                "down_proj",
            ]
            state = moe.trainable_state()
            for block, base in zip(blocks, full.experts[expert], strict=True):
                assert block.index == expert and block.factors.rank == 2
                assert block.factors.scaling == pytest.approx(16 / 2)
                base_tensor = base.read(params)[0]  # (out, in) of this expert
                assert block.delta(state).shape == base_tensor.shape
                assert {block.factors.lora_a, block.factors.lora_b} <= trainable
    # attention pairs and expert pairs: 2 layers x (q, v, gate_up, down)
    assert len(moe.layout.lora_modules) == 8
    assert MoELayout.from_dict(moe.layout.to_dict()) == moe.layout


def test_lora_expert_delta_is_what_peft_forward_adds() -> None:
    """The wrapped experts' output equals the bare experts' with W0[e] + s B_e A_e."""
    moe = _load(lora_rank=3)
    layer = moe.layout.layers[0]
    with torch.no_grad():  # make every B non-zero (peft starts B at 0)
        for name, param in moe.model.named_parameters():
            if ".lora_" in name:
                param.normal_(0, 0.1)
    wrapped = moe.model.get_submodule(layer.name + ".experts")
    bare = copy.deepcopy(wrapped.get_base_layer())
    state = moe.trainable_state()
    with torch.no_grad():
        for expert in range(layer.num_experts):
            for block in layer.lora_experts[expert]:
                tensor = getattr(bare, block.factors.base.rsplit(".", 1)[1])
                tensor[expert] += block.delta(state)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, layer.hidden_size, generator=g)
    top_k_index = torch.randint(0, layer.num_experts, (7, 2), generator=g)
    top_k_weights = torch.rand(7, 2, generator=g)
    with torch.no_grad():
        expected = bare(hidden, top_k_index, top_k_weights)
        got = wrapped(hidden, top_k_index, top_k_weights)
        plain = wrapped.get_base_layer()(hidden, top_k_index, top_k_weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapters do change the output


@pytest.mark.parametrize("name", ["tiny-upcycled", "tiny-switch"])
def test_per_module_experts_get_their_own_adapters(name: str) -> None:
    moe = _load(name, lora_targets=["query"] if name == "tiny-upcycled" else ["q"])
    params = dict(moe.model.named_parameters())
    state = moe.trainable_state()
    for layer, full in zip(moe.layout.layers, moe.full_layout.layers, strict=True):
        for expert in range(layer.num_experts):
            blocks = layer.lora_experts[expert]
            weights = [s for s in full.experts[expert] if s.param.endswith(".weight")]
            assert len(blocks) == len(weights) == 2
            for block, base in zip(blocks, weights, strict=True):
                assert block.index == 0 and block.factors.num_experts == 1
                assert block.delta(state).shape == base.read(params).shape


@pytest.mark.parametrize("router", ["lora", "frozen"])
def test_lora_router_modes(router: str) -> None:
    moe = _load(lora_router=router)
    trainable = set(moe.trainable_names)
    assert moe.layout.router_param_names() == set()  # no full router travels
    router_lora = {n for n in trainable if ".mlp.gate.lora_" in n}
    assert bool(router_lora) == (router == "lora")
    assert len(moe.taps) == 2
    if router == "frozen":
        return
    # the routing taps see the adapted router's logits: x (W + s B A)^T
    layer = moe.layout.layers[0]
    gate = moe.model.get_submodule(layer.name + ".gate")
    with torch.no_grad():
        gate.lora_B["default"].weight.normal_(0, 1.0)
    batch = moe.tokenizer(["a cat", "the dog runs"], return_tensors="pt", padding=True)
    with torch.no_grad(), RoutingCapture(moe.taps, detach=True) as capture:
        moe.classify(batch["input_ids"], batch["attention_mask"])
    logits, hidden = capture.pop()[layer.name]  # (N, E), (N, H)
    factors = next(f for f in moe.layout.lora_modules if ".mlp.gate." in f.lora_a)
    weight = gate.get_base_layer().weight + factors.delta(moe.trainable_state())
    torch.testing.assert_close(logits, hidden @ weight.T, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, hidden @ gate.get_base_layer().weight.T, atol=1e-3)


def test_expert_targets_needs_linear_or_fused_experts() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    layout = MoELayout(layers=(MoELayerLayout("moe", 1, 1, 3, (), ((ExpertSlice("scale"),),)),))
    with pytest.raises(ConfigError, match=r"model\.lora-experts"):
        expert_targets(Odd(), layout)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.lora-router", "half", r"model\.lora-router.*'full', 'lora', 'frozen'"),
        ("model.lora-aggregation", "svd", r"model\.lora-aggregation.*'product-svd'"),
        ("model.quantize", "8bit", r"model\.quantize.*'4bit'"),
        ("model.lora-rank", "0", r"model\.lora-rank must be >= 1"),
    ],
)
def test_bad_values_name_the_key(key: str, value: str, message: str) -> None:
    config = ExperimentConfig()
    config.model.trainable = "lora"
    config.set(key, value)
    with pytest.raises(ConfigError, match=message):
        config.validate()


@pytest.mark.parametrize(
    "key",
    [
        "model.lora-experts=true",
        "model.lora-router=lora",
        "model.quantize=4bit",
        "model.lora-aggregation=product-svd",
    ],
)
def test_lora_keys_need_trainable_lora(key: str) -> None:
    config = ExperimentConfig()
    config.apply_overrides([key])
    with pytest.raises(ConfigError, match=r"needs model\.trainable = 'lora'"):
        config.validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_4bit_without_cuda_says_why() -> None:
    config = ModelConfig(trainable="lora", quantize="4bit")
    with pytest.raises(ConfigError, match="CUDA"):
        quantization_kwargs(config)
    assert quantization_kwargs(ModelConfig()) == {}
    with pytest.raises(ConfigError, match=r"model\.quantize"):
        _load(quantize="4bit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and bitsandbytes")
def test_4bit_base_with_lora_experts(tmp_path: Path) -> None:
    """A saved tiny Qwen3-MoE loads in 4 bit; LoRA experts train on the GPU."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForSequenceClassification

    hf_config = tiny_hf_config("tiny-qwen3moe")
    hf_config.num_labels = 3
    AutoModelForSequenceClassification.from_config(hf_config).save_pretrained(tmp_path)
    moe = _load(str(tmp_path), quantize="4bit", lora_targets=["q_proj", "v_proj"])
    quantized = [n for n, m in moe.model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert quantized  # attention projections are 4-bit
    batch = moe.tokenizer(["a cat", "the dog runs"], return_tensors="pt", padding=True)
    model = moe.model
    device = next(p for p in model.parameters() if p.requires_grad).device
    logits = moe.classify(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    logits.float().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".experts." in n and p.requires_grad]
    assert grads and all(g is not None for g in grads)
