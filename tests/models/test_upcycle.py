"""Tests for fedalign.models.upcycle: sparse upcycling, top-k routing and the prefix split."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedalign.config import ModelConfig
from fedalign.models import (
    EncoderClassifier,
    MoEModel,
    UpcycledMoE,
    load_moe_model,
    minilm_path,
    tiny_hf_config,
)

Tensor = torch.Tensor

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _classifier(moe: MoEModel) -> EncoderClassifier:
    assert isinstance(moe.model, EncoderClassifier)
    return moe.model


def _dense_tiny_bert(seed: int) -> Any:
    """The dense BERT that ``tiny-upcycled`` starts from (same seed, same draws)."""
    from transformers import BertModel

    torch.manual_seed(seed)
    return BertModel(tiny_hf_config("tiny-upcycled"), add_pooling_layer=False).eval()


def _dense_minilm() -> Any:
    from transformers import BertModel

    return BertModel.from_pretrained(str(minilm_path()), add_pooling_layer=False).eval()


def _assert_matches_dense(moe: MoEModel, dense: Any, batch: dict[str, Tensor]) -> None:
    """Upcycled hidden states equal the dense model's, by both forward paths, pads included."""
    model = _classifier(moe)
    model.eval()
    num_layers = len(model._layers())
    with torch.no_grad():
        expected = dense(**batch).last_hidden_state
        through_hf = model.encoder(**batch).last_hidden_state
        saved = model.prefix_layers
        model.prefix_layers = num_layers  # the classifier's own layer loop over every layer
        try:
            through_prefix = model.prefix(batch["input_ids"], batch["attention_mask"])
        finally:
            model.prefix_layers = saved
    assert expected.shape == through_hf.shape == through_prefix.shape
    torch.testing.assert_close(through_hf, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(through_prefix, expected, rtol=0, atol=1e-5)
    # the router is not uniform, so equality comes from identical experts, not from symmetry
    router = moe.full_layout.layers[0].router_params[0]
    assert float(model.get_parameter(router).detach().abs().max()) > 0


def test_upcycled_minilm_reproduces_dense_hidden_states(minilm_batch: dict[str, Tensor]) -> None:
    """The real all-MiniLM-L6-v2, upcycled (E=8, top-2), equals the dense model at init."""
    moe = load_moe_model(ModelConfig(name="upcycled-minilm", expert_init="copy"), num_labels=4)
    assert [layer.name for layer in moe.full_layout.layers] == [
        "encoder.encoder.layer.4.intermediate",
        "encoder.encoder.layer.5.intermediate",
    ]
    _assert_matches_dense(moe, _dense_minilm(), minilm_batch)


@pytest.mark.parametrize("seed", [0, 3])
def test_tiny_upcycled_reproduces_dense_hidden_states(
    seed: int, minilm_batch: dict[str, Tensor]
) -> None:
    """tiny-upcycled equals the dense tiny BERT it was made from."""
    config = ModelConfig(name="tiny-upcycled", expert_init="copy")
    moe = load_moe_model(config, num_labels=3, seed=seed)
    dense = _dense_tiny_bert(seed)
    # check the reconstruction: every dense tensor outside the FFNs is the same
    params = dict(moe.model.named_parameters())
    shared = [n for n, _ in dense.named_parameters() if ".intermediate." not in n]
    shared = [n for n in shared if not (n.endswith((".output.dense.weight", ".output.dense.bias")))]
    for name in shared:
        assert torch.equal(params[f"encoder.{name}"], dict(dense.named_parameters())[name]), name
    _assert_matches_dense(moe, dense, minilm_batch)


@pytest.mark.parametrize("name", ["tiny-upcycled", "upcycled-minilm"])
def test_experts_start_identical_copies_of_the_dense_ffn(name: str) -> None:
    """Each expert is a copy of the dense FFN; the router is (E, H) without bias."""
    moe = load_moe_model(ModelConfig(name=name, expert_init="copy"), num_labels=3)
    dense = _dense_tiny_bert(0) if name == "tiny-upcycled" else _dense_minilm()
    hidden = int(dense.config.hidden_size)
    state = {n: p.detach() for n, p in moe.model.named_parameters()}
    for layer in moe.full_layout.layers:
        index = int(layer.name.split(".")[3])  # encoder.encoder.layer.<i>.intermediate
        dense_layer = dense.encoder.layer[index]
        ffn = torch.cat(
            [
                dense_layer.intermediate.dense.weight.reshape(-1),
                dense_layer.intermediate.dense.bias,
                dense_layer.output.dense.weight.reshape(-1),
                dense_layer.output.dense.bias,
            ]
        ).detach()
        assert layer.num_experts == 8 and layer.top_k == 2 and layer.hidden_size == hidden
        for e in range(layer.num_experts):
            assert torch.equal(layer.expert_vector(state, e), ffn)
        block = moe.model.get_submodule(layer.name)
        assert isinstance(block, UpcycledMoE)
        assert block.router.weight.shape == (8, hidden) and block.router.bias is None
        assert layer.router_params == (f"{layer.name}.router.weight",)
        # the FFN's second projection moved into the experts; BertOutput keeps its LayerNorm
        bert_output = moe.model.get_submodule(layer.name.replace("intermediate", "output"))
        assert isinstance(bert_output.dense, nn.Identity)
        # experts are copies, not shared modules
        assert block.experts[0].fc_in.weight is not block.experts[1].fc_in.weight


def test_router_init_std() -> None:
    """router_noise_std sets the router's init; 0 gives a zero router (uniform routing)."""
    zero = load_moe_model(
        ModelConfig(name="tiny-upcycled", router_noise_std=0.0, expert_init="copy"), 3
    )
    wide = load_moe_model(
        ModelConfig(name="tiny-upcycled", router_noise_std=0.5, expert_init="copy"), 3
    )
    for layer in zero.full_layout.layers:
        assert torch.count_nonzero(zero.model.get_submodule(layer.name).router.weight) == 0
    for layer in wide.full_layout.layers:
        std = float(wide.model.get_submodule(layer.name).router.weight.detach().std())
        assert 0.4 < std < 0.6


def _marked_moe(num_experts: int, top_k: int, hidden: int = 8) -> UpcycledMoE:
    """An UpcycledMoE whose expert ``e`` always outputs ``one_hot(e)`` (width ``hidden``)."""
    torch.manual_seed(0)
    fc_in, fc_out = nn.Linear(hidden, 16), nn.Linear(16, hidden)
    moe = UpcycledMoE(fc_in, nn.GELU(), fc_out, num_experts, top_k, router_init_std=1.0)
    with torch.no_grad():
        for e, expert in enumerate(moe.experts):
            expert.fc_out.weight.zero_()
            expert.fc_out.bias.zero_()
            expert.fc_out.bias[e] = 1.0
    return moe


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_routing_uses_exactly_k_experts_per_token(top_k: int) -> None:
    """Each token mixes exactly its k highest-scoring experts with renormalised softmax weights."""
    moe = _marked_moe(num_experts=4, top_k=top_k)
    hidden = torch.randn(2, 5, 8)
    output = moe(hidden)
    assert output.shape == hidden.shape
    flat = output.reshape(-1, 8)[:, :4]  # column e holds expert e's weight
    assert bool((torch.count_nonzero(flat, dim=-1) == top_k).all())
    logits = moe.router(hidden.reshape(-1, 8))
    top = logits.topk(top_k, dim=-1)
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top.indices, True)
    assert torch.equal(flat != 0, chosen)
    weights = F.softmax(top.values, dim=-1)  # softmax over the top k = renormalised probs
    torch.testing.assert_close(flat.gather(1, top.indices), weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat.sum(-1), torch.ones(10), rtol=1e-5, atol=1e-6)


def test_top_k_outside_range_is_rejected() -> None:
    """top_k must be in [1, E]."""
    for top_k in (0, 5):
        with pytest.raises(ValueError, match="top_k"):
            UpcycledMoE(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4), num_experts=4, top_k=top_k)


@pytest.mark.parametrize(("upcycle_layers", "first_moe"), [(1, 3), (2, 2), (4, 0)])
def test_prefix_layers_is_the_first_moe_layer(upcycle_layers: int, first_moe: int) -> None:
    """moe+head: the frozen layers below the first MoE layer form the cacheable prefix."""
    moe = load_moe_model(ModelConfig(name="tiny-upcycled", upcycle_layers=upcycle_layers), 3)
    model = _classifier(moe)
    assert model.prefix_layers == first_moe
    assert moe.supports_prefix_cache == (first_moe > 0)
    assert moe.full_layout.layers[0].name == f"encoder.encoder.layer.{first_moe}.intermediate"
    assert not any(p.requires_grad for p in model.encoder.embeddings.parameters())
    for layer in model._layers()[:first_moe]:
        assert not any(p.requires_grad for p in layer.parameters())
    assert any(p.requires_grad for p in model._layers()[first_moe].parameters())


def test_forward_from_prefix_equals_forward(minilm_batch: dict[str, Tensor]) -> None:
    """In eval mode, classify_from_prefix(prefix(x)) equals the unsplit forward pass."""
    moe = load_moe_model(ModelConfig(name="tiny-upcycled"), 3)
    model = _classifier(moe)
    model.eval()
    ids, mask = minilm_batch["input_ids"], minilm_batch["attention_mask"]
    with torch.no_grad():
        cached = moe.prefix(ids, mask)
        split = moe.classify_from_prefix(cached, mask)
        through_forward = moe.classify(ids, mask)
        model.prefix_layers = 0  # the plain pass: embeddings and all layers in one go
        unsplit = moe.classify(ids, mask)
    assert cached.shape == (*ids.shape, 64)
    torch.testing.assert_close(split, unsplit, rtol=0, atol=1e-6)
    torch.testing.assert_close(through_forward, unsplit, rtol=0, atol=1e-6)


def test_prefix_runs_without_dropout_and_restores_training_mode(
    minilm_batch: dict[str, Tensor],
) -> None:
    """prefix() in train mode gives the eval-mode numbers and leaves the modules in train mode."""
    moe = load_moe_model(ModelConfig(name="tiny-upcycled"), 3)
    model = _classifier(moe)
    ids, mask = minilm_batch["input_ids"], minilm_batch["attention_mask"]
    model.eval()
    with torch.no_grad():
        expected = moe.prefix(ids, mask)
    model.train()
    with torch.no_grad():
        first, second = moe.prefix(ids, mask), moe.prefix(ids, mask)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert all(m.training for m in model.modules())
