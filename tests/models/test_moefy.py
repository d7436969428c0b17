"""Tests for fedalign.models.moefy: MoEfication, Drop-Upcycling and the gating choices."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedalign.config import ConfigError, ExperimentConfig, ModelConfig
from fedalign.models import (
    EncoderClassifier,
    MoEModel,
    RoutingCapture,
    UpcycledMoE,
    load_moe_model,
    tiny_hf_config,
)
from fedalign.models.block import gate_weights
from fedalign.models.classifier import sample_text
from fedalign.models.moefy import (
    balanced_assign,
    balanced_kmeans,
    ffn_inputs,
    group_activation_mass,
    moefy_ffn,
)

Tensor = torch.Tensor

pytestmark = pytest.mark.usefixtures("torch_one_thread")

INITS = ("moefication", "copy", "drop-upcycling")


def _blocks(moe: MoEModel) -> list[UpcycledMoE]:
    return [moe.model.get_submodule(layer.name) for layer in moe.full_layout.layers]


def _dense_tiny_bert(seed: int) -> Any:
    from transformers import BertModel

    torch.manual_seed(seed)
    return BertModel(tiny_hf_config("tiny-upcycled"), add_pooling_layer=False).eval()


# ------------------------------------------------------------------------------ clustering
def test_balanced_assign_fills_every_cluster_exactly() -> None:
    distances = torch.rand(48, 6, generator=torch.Generator().manual_seed(0))
    labels = balanced_assign(distances)
    assert torch.equal(torch.bincount(labels, minlength=6), torch.full((6,), 8))
    with pytest.raises(ValueError, match="equal clusters"):
        balanced_assign(torch.rand(10, 3))


def test_balanced_kmeans_finds_well_separated_equal_clusters() -> None:
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 5, generator=generator) * 10
    truth = torch.arange(4).repeat_interleave(16)
    points = centres[truth] + 0.1 * torch.randn(64, 5, generator=generator)
    labels = balanced_kmeans(points[torch.randperm(64, generator=generator)], 4)
    assert torch.equal(torch.bincount(labels), torch.full((4,), 16))
    labels = balanced_kmeans(points, 4)
    # the same partition up to renaming the clusters
    for cluster in range(4):
        assert labels[truth == cluster].unique().numel() == 1


@pytest.mark.parametrize("name", ["tiny-upcycled", "upcycled-minilm"])
def test_moefication_groups_are_balanced_and_cover_every_neuron_once(name: str) -> None:
    """Expert e = its group's fc_in rows (and bias) and fc_out columns; groups of I/E."""
    moe = load_moe_model(ModelConfig(name=name), num_labels=3)
    for block in _blocks(moe):
        assert block.output_bias is not None and block.output_bias.shape == (
            block.router.in_features,
        )
        widths = [expert.fc_in.out_features for expert in block.experts]
        assert len(set(widths)) == 1
        for expert in block.experts:
            assert expert.fc_out.bias is None  # the FFN's output bias is counted once
    # against the dense FFN: every row of W1 appears in exactly one expert
    from transformers import BertModel

    from fedalign.models import minilm_path

    if name == "tiny-upcycled":
        dense = _dense_tiny_bert(0)
    else:
        dense = BertModel.from_pretrained(str(minilm_path()), add_pooling_layer=False)
    for layer, block in zip(moe.full_layout.layers, _blocks(moe)):
        index = int(layer.name.split(".")[3])
        w1 = dense.encoder.layer[index].intermediate.dense.weight.detach()
        rows = torch.cat([e.fc_in.weight.detach() for e in block.experts])  # (I, H)
        assert rows.shape == w1.shape
        match = (rows[:, None, :] == w1[None, :, :]).all(-1)  # (I, I)
        assert bool((match.sum(0) == 1).all()) and bool((match.sum(1) == 1).all())


# -------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", ["tiny-upcycled", "upcycled-minilm"])
def test_moefication_with_every_expert_active_is_the_dense_ffn(
    name: str, minilm_batch: dict[str, Tensor]
) -> None:
    """top-k = E with straight-through gates (value one): hidden states equal the dense model."""
    from transformers import BertModel

    from fedalign.models import minilm_path

    moe = load_moe_model(ModelConfig(name=name, top_k=8), num_labels=3)
    if name == "tiny-upcycled":
        dense = _dense_tiny_bert(0)
    else:
        dense = BertModel.from_pretrained(str(minilm_path()), add_pooling_layer=False).eval()
    model = moe.model
    assert isinstance(model, EncoderClassifier)
    model.eval()
    with torch.no_grad():
        expected = dense(**minilm_batch).last_hidden_state
        got = model.encoder(**minilm_batch).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_moefied_ffn_sums_its_experts_exactly() -> None:
    """One FFN, every expert selected: output = fc_out(act(fc_in(x))) with one bias."""
    torch.manual_seed(0)
    fc_in, fc_out = nn.Linear(16, 32), nn.Linear(32, 16)
    sample = torch.randn(200, 16)
    moe, labels = moefy_ffn(fc_in, nn.GELU(), fc_out, 4, 4, "straight-through", sample)
    assert torch.equal(torch.bincount(labels), torch.full((4,), 8))
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), fc_out(F.gelu(fc_in(x))), rtol=0, atol=1e-5)


def test_gate_weights() -> None:
    probs = torch.tensor([[0.5, 0.25], [0.1, 0.1]])
    torch.testing.assert_close(gate_weights(probs, "renormalize").sum(-1), torch.ones(2))
    torch.testing.assert_close(gate_weights(probs, "scaled").sum(-1), torch.full((2,), 2.0))
    probs = probs.clone().requires_grad_(True)
    straight = gate_weights(probs, "straight-through")
    assert torch.equal(straight, torch.ones(2, 2))
    straight.sum().backward()
    assert probs.grad is not None and torch.equal(probs.grad, torch.ones(2, 2))
    with pytest.raises(ValueError, match="gating"):
        gate_weights(probs, "other")


# ---------------------------------------------------------------------------------- router
def test_router_init_predicts_the_most_active_groups() -> None:
    """On held-out glosses, the fitted router's top-2 holds the true top-2 groups far above
    chance (2/8 = 0.25): at least 0.6 of them on all-MiniLM-L6-v2's MoE layers."""
    moe = load_moe_model(ModelConfig(name="upcycled-minilm"), num_labels=3)
    from transformers import BertModel

    from fedalign.models import minilm_path

    dense = BertModel.from_pretrained(str(minilm_path()), add_pooling_layer=False).eval()
    ids, mask = sample_text(moe.tokenizer, 48, count=512)
    ids, mask = ids[1::2], mask[1::2]  # glosses between the ones the router was fitted on
    indices = [int(layer.name.split(".")[3]) for layer in moe.full_layout.layers]
    hidden = ffn_inputs(dense, indices, ids, mask)
    for index, block in zip(indices, _blocks(moe)):
        x = hidden[index]  # (N, H)
        with torch.no_grad():
            activations = torch.cat([e.activation(e.fc_in(x)) for e in block.experts], dim=1)
            labels = torch.arange(8).repeat_interleave(block.experts[0].fc_in.out_features)
            mass = group_activation_mass(activations, labels, 8)  # (N, E)
            true_top = mass.topk(2, dim=1).indices
            routed = block.router(x).topk(2, dim=1).indices
        hit = (routed[:, :, None] == true_top[:, None, :]).any(-1).float().mean()
        assert float(hit) >= 0.6, (index, float(hit))


@pytest.mark.parametrize("init", INITS)
def test_task_loss_reaches_the_router(init: str, minilm_batch: dict[str, Tensor]) -> None:
    """MoEfication gives the router a real task gradient; copies give next to none."""
    moe = load_moe_model(ModelConfig(name="tiny-upcycled", expert_init=init), num_labels=3)
    moe.model.eval()
    logits = moe.classify(minilm_batch["input_ids"], minilm_batch["attention_mask"])
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    routers = [b.router.weight for b in _blocks(moe)]
    grads = torch.autograd.grad(loss, routers)
    norm = float(torch.stack([g.norm() for g in grads]).norm())
    if init == "copy":
        assert norm < 1e-5  # identical experts: the output ignores the router
    else:
        assert norm > 1e-4


# ------------------------------------------------------------------ every init keeps working
@pytest.mark.parametrize("init", INITS)
def test_every_init_has_a_layout_capture_prefix_and_padding_skip(
    init: str, minilm_batch: dict[str, Tensor]
) -> None:
    moe = load_moe_model(ModelConfig(name="tiny-upcycled", expert_init=init), num_labels=3)
    model = moe.model
    assert isinstance(model, EncoderClassifier) and model.prefix_layers == 2
    params = dict(model.named_parameters())
    for layer, block in zip(moe.full_layout.layers, _blocks(moe)):
        assert layer.num_experts == 8 and layer.top_k == 2
        for e in range(8):
            names = {s.param for s in layer.experts[e]}
            assert names and names <= params.keys()
            assert all(f".experts.{e}." in n for n in names)
        expected = 16 if init == "moefication" else 128
        assert block.experts[0].fc_in.out_features == expected
    ids, mask = minilm_batch["input_ids"], minilm_batch["attention_mask"]
    model.eval()
    with torch.no_grad(), RoutingCapture(moe.taps, detach=True) as capture:
        capture.set_token_mask(mask)
        split = moe.classify_from_prefix(moe.prefix(ids, mask), mask)
        records = capture.pop()
        saved = model.prefix_layers
        model.prefix_layers = 0
        whole = moe.classify(ids, mask)
        model.prefix_layers = saved
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)
    assert all(r[0].shape == (int(mask.sum()), 8) for r in records.values())
    # padding skips the experts without changing the real tokens' logits
    with torch.no_grad():
        padded_ids = F.pad(ids, (0, 5))
        padded_mask = F.pad(mask, (0, 5))
        torch.testing.assert_close(moe.classify(padded_ids, padded_mask), whole, atol=1e-5, rtol=0)


def test_drop_upcycling_reinitialises_the_asked_fraction_per_expert() -> None:
    config = ModelConfig(name="tiny-upcycled", expert_init="drop-upcycling", drop_fraction=0.25)
    moe = load_moe_model(config, num_labels=3)
    dense = _dense_tiny_bert(0)
    for layer, block in zip(moe.full_layout.layers, _blocks(moe)):
        index = int(layer.name.split(".")[3])
        w1 = dense.encoder.layer[index].intermediate.dense.weight
        changed = []
        for expert in block.experts:
            rows = (expert.fc_in.weight != w1).any(dim=1)
            assert int(rows.sum()) == 32  # 0.25 of 128 neurons
            changed.append(rows)
        assert not torch.equal(changed[0], changed[1])  # a different subset per expert


def test_expert_init_is_validated_naming_the_key() -> None:
    config = ExperimentConfig()
    config.model.expert_init = "clone"
    with pytest.raises(ConfigError, match=r"model\.expert-init.*moefication.*copy.*drop-upcycling"):
        config.validate()
    config = ExperimentConfig()
    config.model.gating = "softmax"
    with pytest.raises(ConfigError, match=r"model\.gating"):
        config.validate()
    config = ExperimentConfig()
    config.model.drop_fraction = 1.5
    with pytest.raises(ConfigError, match=r"model\.drop-fraction"):
        config.validate()


def test_moefication_needs_a_divisible_width() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        load_moe_model(ModelConfig(name="tiny-upcycled", num_experts=3, top_k=2), num_labels=3)


@pytest.mark.parametrize("init", ["moefication", "copy"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_packed_layers_give_the_plain_layers_numbers(
    init: str, train_mode: bool, minilm_batch: dict[str, Tensor]
) -> None:
    """Real tokens only after the prefix: same logits and gradients, dropout draws included."""
    moe = load_moe_model(ModelConfig(name="tiny-upcycled", expert_init=init), num_labels=3)
    model = moe.model
    assert isinstance(model, EncoderClassifier) and model.pack_tokens
    ids, mask = minilm_batch["input_ids"], minilm_batch["attention_mask"]
    model.train(train_mode)
    results = []
    for pack in (True, False):
        model.pack_tokens = pack
        model.zero_grad()
        torch.manual_seed(5)
        logits = moe.classify(ids, mask)
        logits.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((logits.detach(), grads))
    (packed, packed_grads), (plain, plain_grads) = results
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-6)
    assert len(packed_grads) == len(plain_grads) > 0
    for a, b in zip(packed_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
