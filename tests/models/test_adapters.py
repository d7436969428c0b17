"""Tests for the generic MoE adapter: transformers families without an adapter, toy blocks, errors.

The generic adapter is tried only when no dedicated adapter recognises a module; it finds a
router ``(E, H)`` beside fused ``(E, ...)`` expert tensors or a list of ``E`` expert modules.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedalign.config import ModelConfig
from fedalign.models import (
    ADAPTERS,
    GENERIC,
    RoutingCapture,
    find_adapter,
    load_moe_model,
    match_generic,
    scan_moe,
    tiny_hf_config,
)
from fedalign.moe import ExpertSlice

Tensor = torch.Tensor

pytestmark = pytest.mark.usefixtures("torch_one_thread")

H, E, I = 16, 4, 8  # noqa: E741 - toy hidden width, experts, expert width


# ------------------------------------------------------------------------------- toy blocks
class ToyExpert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(H, I)
        self.fc_out = nn.Linear(I, H)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc_out(torch.relu(self.fc_in(x)))
        return out


class ListedMoE(nn.Module):
    """A hand-written top-k MoE: ``switch`` (router with bias) and a ModuleList ``ffns``."""

    def __init__(self, top_k: int = 2) -> None:
        super().__init__()
        self.top_k = top_k
        self.switch = nn.Linear(H, E)
        self.ffns = nn.ModuleList(ToyExpert() for _ in range(E))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, H)  # (N, H)
        weights, chosen = self.switch(flat).softmax(-1).topk(self.top_k, dim=-1)  # (N, k)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.ffns):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            out[rows] += weights[rows, slot, None] * expert(flat[rows])
        return out.reshape(x.shape)


class FusedConfig:
    num_experts_per_tok = 1


class FusedMoE(nn.Module):
    """Experts stored on the block itself as ``(E, H, I)`` / ``(E, I, H)``; top-k in ``config``."""

    def __init__(self) -> None:
        super().__init__()
        self.config = FusedConfig()
        self.router = nn.Linear(H, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, H, I) * 0.1)
        self.w_out = nn.Parameter(torch.randn(E, I, H) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, H)
        chosen = self.router(flat).argmax(-1)  # (N,)
        hidden = torch.relu(torch.einsum("nh,nhi->ni", flat, self.w_in[chosen]))
        return torch.einsum("ni,nih->nh", hidden, self.w_out[chosen]).reshape(x.shape)


class ToyModel(nn.Module):
    """A dense layer, then two MoE blocks with residuals."""

    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.dense = nn.Linear(H, H)
        self.blocks = nn.ModuleList([block(), block()])

    def forward(self, x: Tensor) -> Tensor:
        x = self.dense(x)
        for block in self.blocks:
            x = x + block(x)
        return x


# ------------------------------------------------------------------ transformers families
@pytest.mark.parametrize(
    ("name", "router", "tensors", "layers"),
    [
        ("tiny-granitemoe", "router", ("experts.gate_up_proj", "experts.down_proj"), 2),
        ("tiny-phimoe", "router", ("experts.gate_up_proj", "experts.down_proj"), 2),
        ("tiny-jetmoe", "router.layer", ("input_linear.weight", "output_linear.weight"), 4),
    ],
)
def test_generic_adapter_reads_families_without_an_adapter(
    name: str, router: str, tensors: tuple[str, ...], layers: int, minilm_batch: dict[str, Tensor]
) -> None:
    """GraniteMoE, PhiMoE, JetMoE: no dedicated adapter matches; the generic one finds them all.

    Layers, E, top-k (from the router or its gating module), router tensors, expert e = row e
    of the fused tensors, and captured logits = router(hidden) with one row per real token.
    """
    torch.manual_seed(0)
    moe = load_moe_model(ModelConfig(name=name), num_labels=3)
    dedicated = [a for a in ADAPTERS if a is not GENERIC]
    assert not any(a.is_moe_block(m) for a in dedicated for m in moe.model.modules())
    assert find_adapter(moe.model) is GENERIC
    hf_config = tiny_hf_config(name)
    params = dict(moe.model.named_parameters())
    assert len(moe.full_layout.layers) == layers
    for layer in moe.full_layout.layers:
        assert (layer.num_experts, layer.top_k, layer.hidden_size) == (
            hf_config.num_local_experts,
            hf_config.num_experts_per_tok,
            64,
        )
        assert layer.router_params == (f"{layer.name}.{router}.weight",)
        for e, slices in enumerate(layer.experts):
            assert [(s.param, s.start, s.stop) for s in slices] == [
                (f"{layer.name}.{t}", e, e + 1) for t in tensors
            ]
    moe.model.eval()
    mask = minilm_batch["attention_mask"]
    with torch.no_grad(), RoutingCapture(moe.taps) as capture:
        capture.set_token_mask(mask)
        moe.classify(minilm_batch["input_ids"], mask)
    records = capture.pop()
    assert list(records) == [layer.name for layer in moe.full_layout.layers]
    for layer in moe.full_layout.layers:
        logits, hidden = records[layer.name]
        assert logits.shape == (int(mask.sum()), layer.num_experts)
        weight = params[layer.router_params[0]]
        torch.testing.assert_close(logits, F.linear(hidden, weight), rtol=1e-5, atol=1e-6)


def test_generic_adapter_on_a_toy_block_with_listed_experts() -> None:
    """A hand-written MoE (router ``switch`` with bias, ModuleList ``ffns``): layout, round trip,
    capture, and expert e of the layout is the module router column e chooses."""
    torch.manual_seed(0)
    model = ToyModel(ListedMoE).eval()
    layout, taps = scan_moe(model)
    assert find_adapter(model) is GENERIC
    assert [layer.name for layer in layout.layers] == ["blocks.0", "blocks.1"]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for layer in layout.layers:
        assert (layer.num_experts, layer.top_k, layer.hidden_size) == (E, 2, H)
        assert layer.router_params == (f"{layer.name}.switch.weight", f"{layer.name}.switch.bias")
        for e, slices in enumerate(layer.experts):
            assert {s.param for s in slices} == {
                f"{layer.name}.ffns.{e}.{p}"
                for p in ("fc_in.weight", "fc_in.bias", "fc_out.weight", "fc_out.bias")
            }
            assert all(s.start is None for s in slices)
    assert "dense.weight" not in layout.router_param_names() | layout.expert_param_names()

    # round trip: read + write every expert is bitwise the identity
    state = dict(params)
    for layer in layout.layers:
        for e in range(E):
            layer.write_expert_vector(state, e, layer.expert_vector(state, e))
    assert all(torch.equal(state[n], params[n]) for n in params)

    # capture: logits (N, E) = switch(hidden), hidden = the block's input
    x = torch.randn(3, 5, H)
    with torch.no_grad(), RoutingCapture(taps) as capture:
        model(x)
    records = capture.pop()
    first = layout.layers[0]
    logits, hidden = records[first.name]
    assert logits.shape == (15, E) and hidden.shape == (15, H)
    torch.testing.assert_close(hidden, model.dense(x).reshape(-1, H).detach())
    torch.testing.assert_close(
        logits,
        F.linear(
            hidden, params[f"{first.name}.switch.weight"], params[f"{first.name}.switch.bias"]
        ),
    )

    # zeroing expert e changes exactly the tokens whose top-k holds e
    block = model.blocks[0]
    chosen = logits.topk(2, dim=-1).indices
    expert = int(torch.mode(chosen[:, 0]).values)
    routed = (chosen == expert).any(-1)
    assert 0 < int(routed.sum()) < len(routed)
    with torch.no_grad():
        before = block(hidden)
        state = dict(params)
        first.write_expert_vector(
            state, expert, torch.zeros_like(first.expert_vector(state, expert))
        )
        model.load_state_dict(state)
        after = block(hidden)
    changed = (after - before).abs().amax(-1)
    assert bool((changed[routed] > 1e-6).all())
    assert torch.equal(after[~routed], before[~routed])


def test_generic_adapter_on_a_toy_block_with_fused_experts() -> None:
    """Experts as 3-D parameters of the block itself; top-k read from the block's config."""
    torch.manual_seed(0)
    model = ToyModel(FusedMoE)
    layout, taps = scan_moe(model)
    layer = layout.layers[1]
    assert (layer.num_experts, layer.top_k, layer.hidden_size) == (E, 1, H)
    assert layer.router_params == ("blocks.1.router.weight",)
    assert layer.experts[2] == (
        ExpertSlice("blocks.1.w_in", 2, 3),
        ExpertSlice("blocks.1.w_out", 2, 3),
    )
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    new = torch.randn(H * I * 2)
    layer.write_expert_vector(state, 2, new)
    for name, value in model.named_parameters():
        if name in ("blocks.1.w_in", "blocks.1.w_out"):
            rows = [r for r in range(E) if r != 2]
            assert torch.equal(state[name][rows], value.detach()[rows])
            assert not torch.equal(state[name][2], value.detach()[2])
        else:
            assert torch.equal(state[name], value.detach()), name
    assert torch.equal(layer.expert_vector(state, 2), new)
    with torch.no_grad(), RoutingCapture(taps) as capture:
        model(torch.randn(2, 3, H))
    assert [tuple(r[0].shape) for r in capture.pop().values()] == [(6, E), (6, E)]


# ----------------------------------------------------------------------------------- errors
def test_dense_model_error_says_what_was_looked_for_and_found() -> None:
    """A dense BERT: ValueError naming the adapters, the shape looked for and what is there."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    with pytest.raises(ValueError) as info:
        scan_moe(BertModel(config))
    message = str(info.value)
    assert "no MoE layer recognised in BertModel" in message
    assert "['upcycled', 'fused-experts', 'switch']" in message
    assert "2-D weight (E, H)" in message and "nn.ModuleList" in message
    assert "encoder.layer.0.attention.self.query (16, 16)" in message  # found: router-shaped
    assert "parameters with 3 or more dimensions: none" in message
    assert "encoder.layer (2 modules)" in message


def test_missing_top_k_names_the_attributes_looked_for() -> None:
    """Router and experts but no top-k anywhere: ValueError listing the keys and owners."""
    model = ToyModel(ListedMoE)
    for block in model.blocks:
        del block.top_k
    with pytest.raises(ValueError, match="no top-k") as info:
        scan_moe(model)
    assert "'num_experts_per_tok'" in str(info.value) and "'blocks.0'" in str(info.value)


def test_top_k_out_of_range_is_rejected() -> None:
    model = ToyModel(ListedMoE)
    model.blocks[0].top_k = E + 1
    with pytest.raises(ValueError, match=r"top_k=5, outside \[1, 4\]"):
        scan_moe(model)


def test_ambiguous_block_is_an_error_not_a_guess() -> None:
    """Two lists of E experts beside one router: the adapter refuses to pick one."""
    block = ListedMoE()
    block.more = nn.ModuleList(ToyExpert() for _ in range(E))
    with pytest.raises(ValueError, match="more than one way"):
        match_generic(block)


@pytest.mark.parametrize(
    "name", ["tiny-qwen3moe", "tiny-deepseek-v2", "tiny-olmoe", "tiny-switch", "tiny-upcycled"]
)
def test_dedicated_adapters_win_over_the_generic_one(name: str) -> None:
    """Families with a dedicated adapter keep it (the generic one is only the fallback)."""
    moe: Any = load_moe_model(ModelConfig(name=name), num_labels=3)
    adapter = find_adapter(moe.model)
    assert adapter is not None and adapter is not GENERIC
    assert adapter.name == {"tiny-switch": "switch", "tiny-upcycled": "upcycled"}.get(
        name, "fused-experts"
    )
