"""Tests for the MoE view of real models: adapters' layouts, expert round trips and capture."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fedalign.config import ModelConfig
from fedalign.models import TINY_MODELS, EncoderClassifier, MoEModel, RoutingCapture, load_moe_model
from fedalign.moe import ExpertSlice, MoELayout

Tensor = torch.Tensor

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# name -> (MoE layers, experts per layer, top-k, hidden size H); routers are (E, H)
EXPECTED_LAYOUT = {
    "tiny-qwen3moe": (2, 4, 2, 64),
    "tiny-qwen2moe": (2, 4, 2, 64),
    "tiny-mixtral": (2, 4, 2, 64),
    "tiny-switch": (2, 4, 1, 64),
    "tiny-upcycled": (2, 8, 2, 64),
    "tiny-deepseek-v2": (2, 8, 2, 64),  # layer 0 is dense (first_k_dense_replace=1)
    "tiny-deepseek-v3": (2, 8, 2, 64),
    "tiny-olmoe": (2, 4, 2, 64),
    "tiny-granitemoe": (2, 4, 2, 64),
    "tiny-phimoe": (2, 4, 2, 64),
    "tiny-jetmoe": (4, 4, 2, 64),  # per layer: mixture of attention heads, then of MLPs
}
# fused experts: name -> (E, expert width I, router module, expert tensors (E, 2I, H), (E, H, I))
FUSED = {
    "tiny-qwen3moe": (4, 32, "gate", "experts.gate_up_proj", "experts.down_proj"),
    "tiny-qwen2moe": (4, 32, "gate", "experts.gate_up_proj", "experts.down_proj"),
    "tiny-mixtral": (4, 64, "gate", "experts.gate_up_proj", "experts.down_proj"),
    "tiny-deepseek-v2": (8, 32, "gate", "experts.gate_up_proj", "experts.down_proj"),
    "tiny-deepseek-v3": (8, 32, "gate", "experts.gate_up_proj", "experts.down_proj"),
    "tiny-olmoe": (4, 32, "gate", "experts.gate_up_proj", "experts.down_proj"),
    "tiny-granitemoe": (4, 32, "router", "experts.gate_up_proj", "experts.down_proj"),
    "tiny-phimoe": (4, 32, "router", "experts.gate_up_proj", "experts.down_proj"),
    "tiny-jetmoe": (4, 32, "router.layer", "input_linear.weight", "output_linear.weight"),
}


def _load(name: str, **kwargs: Any) -> MoEModel:
    return load_moe_model(ModelConfig(name=name, **kwargs), num_labels=3)


def _state(moe: MoEModel) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in moe.model.named_parameters()}


def _assert_params_equal(moe: MoEModel, state: dict[str, Tensor]) -> None:
    params = dict(moe.model.named_parameters())
    assert params.keys() == state.keys()
    for name, value in params.items():
        assert torch.equal(value, state[name]), name


# ----------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("name", TINY_MODELS)
def test_layout_has_the_architecture_s_layers_and_experts(name: str) -> None:
    """Layer count, E, top-k, H per architecture; router tensors are (E, H), experts on dim 0."""
    layers, experts, top_k, hidden = EXPECTED_LAYOUT[name]
    moe = _load(name)
    layout = moe.full_layout
    assert len(layout.layers) == layers
    assert [tap.layer for tap in moe.taps] == [layer.name for layer in layout.layers]
    params = dict(moe.model.named_parameters())
    seen: set[str] = set()
    for layer in layout.layers:
        assert (layer.num_experts, layer.top_k, layer.hidden_size) == (experts, top_k, hidden)
        assert len(layer.experts) == experts
        assert len(layer.router_params) == 1
        assert params[layer.router_params[0]].shape == (experts, hidden)
        assert all(slices for slices in layer.experts)
        names = layer.expert_param_names() | set(layer.router_params)
        assert not names & seen  # layers do not share tensors
        seen |= names


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("tiny-qwen3moe", {"trainable": "all"}),
        ("tiny-qwen3moe", {"trainable": "lora", "lora_targets": ["q_proj", "v_proj"]}),
        ("tiny-qwen3moe", {"trainable": "lora", "lora_targets": ["q_proj", "gate"]}),
        ("tiny-upcycled", {"trainable": "lora", "lora_targets": ["query", "router"]}),
        ("tiny-switch", {"trainable": "lora", "lora_targets": ["q", "v"]}),
        # the generic adapter with LoRA on a router nested in its gating module
        ("tiny-jetmoe", {"trainable": "lora", "lora_targets": ["kv_proj", "layer"]}),
        ("tiny-deepseek-v3", {"trainable": "all"}),
    ],
)
def test_layout_names_exist_in_the_model(
    name: str, kwargs: dict[str, Any], minilm_batch: dict[str, Tensor]
) -> None:
    """Every tensor the layouts name exists (also with LoRA on the router); layout ⊆ trainable."""
    moe = _load(name, **kwargs)
    params = dict(moe.model.named_parameters())
    full = moe.full_layout
    assert full.router_param_names() and full.router_param_names() <= params.keys()
    assert full.expert_param_names() and full.expert_param_names() <= params.keys()
    travelling = moe.layout.router_param_names() | moe.layout.expert_param_names()
    assert travelling <= set(moe.trainable_names)
    for layer in full.layers:
        assert params[layer.router_params[0]].shape == (layer.num_experts, layer.hidden_size)
        assert layer.top_k == EXPECTED_LAYOUT[name][2]
    moe.model.eval()
    with torch.no_grad(), RoutingCapture(moe.taps) as capture:
        capture.set_token_mask(minilm_batch["attention_mask"])
        moe.classify(minilm_batch["input_ids"], minilm_batch["attention_mask"])
    records = capture.pop()
    assert [records[layer.name][0].shape[1] for layer in full.layers] == [
        layer.num_experts for layer in full.layers
    ]


@pytest.mark.parametrize("name", FUSED)
def test_fused_experts_are_rows_of_the_stacked_tensors(name: str) -> None:
    """transformers-5 fused experts: expert e is row e of gate_up_proj (E, 2I, H) and down_proj."""
    experts, intermediate, router, up_name, down_name = FUSED[name]
    moe = _load(name)
    params = dict(moe.model.named_parameters())
    # JetMoE's attention experts (MoA) map H to the key-value width, not to 2I
    mlp_layers = [layer for layer in moe.full_layout.layers if "attention" not in layer.name]
    assert len(mlp_layers) == 2
    for layer in mlp_layers:
        gate_up, down = f"{layer.name}.{up_name}", f"{layer.name}.{down_name}"
        assert params[gate_up].shape == (experts, 2 * intermediate, 64)
        assert params[down].shape == (experts, 64, intermediate)
        assert layer.router_params == (f"{layer.name}.{router}.weight",)
        for e in range(experts):
            assert set(layer.experts[e]) == {
                ExpertSlice(gate_up, e, e + 1),
                ExpertSlice(down, e, e + 1),
            }
            vector = layer.expert_vector(params, e)
            expected = torch.cat([params[s.param][e].reshape(-1) for s in layer.experts[e]])
            assert torch.equal(vector, expected)
            assert vector.numel() == 2 * intermediate * 64 + 64 * intermediate


@pytest.mark.parametrize(
    ("name", "module_of"),
    [
        ("tiny-switch", lambda layer, e: f"{layer}.experts.expert_{e}."),
        ("tiny-upcycled", lambda layer, e: f"{layer}.experts.{e}."),
    ],
)
def test_modular_experts_own_whole_tensors(name: str, module_of: Callable[[str, int], str]) -> None:
    """Switch and upcycled: expert e is every tensor of its own module, whole."""
    moe = _load(name)
    params = dict(moe.model.named_parameters())
    for layer in moe.full_layout.layers:
        for e, slices in enumerate(layer.experts):
            prefix = module_of(layer.name, e)
            own = {n for n in params if n.startswith(prefix)}
            assert own and {s.param for s in slices} == own
            assert all(s.start is None and s.stop is None for s in slices)


def _selection_hook(chosen: list[Tensor]) -> Callable[[Any, Any, Any], None]:
    """Records the experts a router returns, when it returns (logits, weights, indices (N, k))."""

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        if isinstance(output, tuple) and len(output) == 3 and not output[2].is_floating_point():
            chosen.append(output[2].reshape(-1, output[2].shape[-1]))

    return hook


@pytest.mark.parametrize("name", TINY_MODELS)
def test_layout_expert_e_is_the_expert_router_column_e_selects(name: str) -> None:
    """Zeroing the layout's expert e changes a block's output for exactly the tokens routed to e.

    This ties the view to the computation: slice e (row e of fused tensors, module e
    otherwise) is the expert that router row / logit column e chooses. The experts a token
    uses are the ones the router returns where it returns them (DeepSeek's grouped,
    biased choice need not be the top-k of the logits), else the top-k of the logits.
    """
    moe = _load(name)
    moe.model.eval()
    layer = moe.full_layout.layers[0]
    block = moe.model.get_submodule(layer.name)
    tap = next(t for t in moe.taps if t.layer == layer.name)
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, layer.hidden_size)
    returned: list[Tensor] = []
    handle = tap.module.register_forward_hook(_selection_hook(returned))
    with torch.no_grad(), RoutingCapture([tap]) as capture:
        before = block(hidden).reshape(-1, layer.hidden_size)
    handle.remove()
    logits, _ = capture.pop()[layer.name]
    chosen = returned[0] if returned else logits.topk(layer.top_k, dim=-1).indices  # (N, k)
    assert chosen.shape == (24, layer.top_k)
    expert = int(torch.mode(chosen[:, 0]).values)  # an expert that some tokens use
    routed = (chosen == expert).any(dim=-1)
    assert 0 < int(routed.sum()) < len(routed)

    state = _state(moe)
    layer.write_expert_vector(state, expert, torch.zeros_like(layer.expert_vector(state, expert)))
    moe.load_trainable_state({n: state[n] for n in moe.trainable_names})
    with torch.no_grad():
        after = block(hidden).reshape(-1, layer.hidden_size)
    changed = (after - before).abs().amax(dim=-1)
    assert bool((changed[routed] > 1e-4).all())
    torch.testing.assert_close(after[~routed], before[~routed], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_layout_dict_round_trip_and_restrict(name: str) -> None:
    """A real layout survives to_dict/JSON/from_dict; restrict keeps only the given names."""
    layout = _load(name).full_layout
    assert MoELayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    routers_only = layout.restrict(layout.router_param_names())
    assert routers_only.router_param_names() == layout.router_param_names()
    assert routers_only.expert_param_names() == set()
    assert [len(layer.experts) for layer in routers_only.layers] == [
        layer.num_experts for layer in layout.layers
    ]
    first = layout.layers[0]
    one_expert = layout.restrict(s.param for s in first.experts[1])
    assert one_expert.router_param_names() == set()
    assert one_expert.expert_param_names() == {s.param for s in first.experts[1]}


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", TINY_MODELS)
def test_expert_vector_round_trip_is_bitwise(name: str) -> None:
    """Reading then writing every expert leaves the state, and the reloaded model, bitwise equal."""
    moe = _load(name)
    state = _state(moe)
    reference = _state(moe)
    for layer in moe.layout.layers:
        for e in range(layer.num_experts):
            layer.write_expert_vector(state, e, layer.expert_vector(state, e))
    for param, value in reference.items():
        assert torch.equal(state[param], value), param
    moe.model.load_state_dict(state, strict=False)
    _assert_params_equal(moe, reference)
    moe.load_trainable_state({n: state[n] for n in moe.trainable_names})
    _assert_params_equal(moe, reference)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_writing_one_expert_changes_only_that_expert(name: str) -> None:
    """A new vector for expert 1 of layer 1 changes exactly its slices, in the state and model."""
    moe = _load(name)
    layer = moe.layout.layers[1]
    reference = _state(moe)
    state = _state(moe)
    new = torch.randn(layer.expert_vector(state, 1).shape)
    layer.write_expert_vector(state, 1, new)
    assert torch.equal(layer.expert_vector(state, 1), new)

    moe.load_trainable_state({n: state[n] for n in moe.trainable_names})
    params = {n: p.detach() for n, p in moe.model.named_parameters()}
    assert torch.equal(layer.expert_vector(params, 1), new)
    for e in range(layer.num_experts):
        if e != 1:
            assert torch.equal(layer.expert_vector(params, e), layer.expert_vector(reference, e))
    touched = {s.param for s in layer.experts[1]}
    for param in params.keys() - touched:
        assert torch.equal(params[param], reference[param]), param
    for other in moe.layout.layers[:1]:
        for e in range(other.num_experts):
            assert torch.equal(other.expert_vector(params, e), other.expert_vector(reference, e))


def test_writing_into_a_state_dict_does_not_touch_the_model() -> None:
    """state_dict() tensors share storage with the model: writes must copy, not mutate."""
    moe = _load("tiny-qwen3moe")
    reference = _state(moe)
    shared = dict(moe.model.state_dict())
    layer = moe.layout.layers[0]
    layer.write_expert_vector(shared, 2, torch.zeros_like(layer.expert_vector(shared, 2)))
    _assert_params_equal(moe, reference)


# ---------------------------------------------------------------------------------- capture
@pytest.mark.parametrize("name", TINY_MODELS)
def test_capture_records_real_tokens_per_layer(name: str, minilm_batch: dict[str, Tensor]) -> None:
    """Per layer: logits (N, E) and hidden (N, H), N = attention_mask.sum(), logits = router(h)."""
    moe = _load(name)
    moe.model.eval()
    ids, mask = minilm_batch["input_ids"], minilm_batch["attention_mask"]
    num_tokens = int(mask.sum())
    assert num_tokens < mask.numel()
    with torch.no_grad(), RoutingCapture(moe.taps) as capture:
        capture.set_token_mask(mask)
        moe.classify(ids, mask)
        records = capture.pop()
        assert capture.pop() == {}  # pop empties
    params = dict(moe.model.named_parameters())
    assert list(records) == [layer.name for layer in moe.full_layout.layers]
    for layer in moe.full_layout.layers:
        logits, hidden = records[layer.name]
        assert logits.shape == (num_tokens, layer.num_experts)
        assert hidden.shape == (num_tokens, layer.hidden_size)
        assert not logits.requires_grad
        router = params[layer.router_params[0]]
        torch.testing.assert_close(logits, F.linear(hidden, router), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        moe.classify(ids, mask)  # after the with block the hooks are gone
    assert capture.pop() == {}


def test_qwen3moe_capture_logits_are_the_gate_projection(minilm_batch: dict[str, Tensor]) -> None:
    """qwen3moe: captured logits are exactly F.linear(hidden, gate.weight), not probabilities."""
    moe = _load("tiny-qwen3moe")
    moe.model.eval()
    with torch.no_grad(), RoutingCapture(moe.taps, detach=True) as capture:
        capture.set_token_mask(minilm_batch["attention_mask"])
        moe.classify(minilm_batch["input_ids"], minilm_batch["attention_mask"])
    for layer_name, (logits, hidden) in capture.pop().items():
        gate = moe.model.get_submodule(f"{layer_name}.gate")
        assert torch.equal(logits, F.linear(hidden, gate.weight))
        assert not torch.allclose(logits.sum(-1), torch.ones(len(logits)))


@pytest.mark.parametrize("name", ["tiny-qwen3moe", "tiny-switch"])
def test_token_mask_keeps_exactly_the_unpadded_rows(
    name: str, minilm_batch: dict[str, Tensor]
) -> None:
    """Without a mask every (b, t) position is recorded; the mask keeps its real rows in order."""
    moe = _load(name)
    moe.model.eval()
    ids, mask = minilm_batch["input_ids"], minilm_batch["attention_mask"]
    with torch.no_grad(), RoutingCapture(moe.taps) as capture:
        moe.classify(ids, mask)
        everything = capture.pop()
        capture.set_token_mask(mask)
        moe.classify(ids, mask)
        kept = capture.pop()
    keep = mask.reshape(-1).bool()
    for layer_name, (logits, hidden) in everything.items():
        assert logits.shape[0] == hidden.shape[0] == mask.numel()
        assert torch.equal(kept[layer_name][0], logits[keep])
        assert torch.equal(kept[layer_name][1], hidden[keep])


def test_upcycled_capture_hidden_is_the_ffn_input_after_the_prefix(
    minilm_batch: dict[str, Tensor],
) -> None:
    """tiny-upcycled: the first MoE layer's hidden is that layer's attention output on the prefix.

    The router sits at the FFN input, so what enters it is the prefix (the frozen layers
    below) passed through the MoE layer's own self-attention sublayer.
    """
    moe = _load("tiny-upcycled")
    model = moe.model
    assert isinstance(model, EncoderClassifier) and model.prefix_layers == 2
    model.eval()
    ids, mask = minilm_batch["input_ids"], minilm_batch["attention_mask"]
    keep = mask.reshape(-1).bool()
    first = moe.full_layout.layers[0].name
    with torch.no_grad(), RoutingCapture(moe.taps) as capture:
        capture.set_token_mask(mask)
        prefix = moe.prefix(ids, mask)
        moe.classify_from_prefix(prefix, mask)
        _, hidden = capture.pop()[first]
        attention, _ = model._layers()[2].attention(prefix, model._mask(prefix, mask))
    expected = attention.reshape(-1, attention.shape[-1])[keep]
    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(hidden, prefix.reshape(-1, 64)[keep])


@pytest.mark.parametrize("name", ["tiny-qwen3moe", "tiny-upcycled"])
def test_captured_logits_carry_gradients_to_the_router(
    name: str, minilm_batch: dict[str, Tensor]
) -> None:
    """detach=False: a loss on captured logits alone gives every router a nonzero gradient."""
    moe = _load(name)
    moe.model.train()
    with RoutingCapture(moe.taps, detach=False) as capture:
        capture.set_token_mask(minilm_batch["attention_mask"])
        moe.classify(minilm_batch["input_ids"], minilm_batch["attention_mask"])
    records = capture.pop()
    loss = sum(torch.logsumexp(logits, dim=-1).mean() for logits, _ in records.values())
    assert isinstance(loss, Tensor) and loss.requires_grad
    loss.backward()
    params = dict(moe.model.named_parameters())
    for router in moe.full_layout.router_param_names():
        grad = params[router].grad
        assert grad is not None and float(grad.abs().sum()) > 0, router
    # the head got no gradient: the loss only saw the routers' outputs
    head = "score.weight" if name == "tiny-qwen3moe" else "classifier.weight"
    assert params[head].grad is None


def test_upcycled_minilm_capture(minilm_batch: dict[str, Tensor]) -> None:
    """The real model: 2 MoE layers of 8 experts, hidden width 384, one row per real token."""
    moe = _load("upcycled-minilm")
    moe.model.eval()
    with torch.no_grad(), RoutingCapture(moe.taps, detach=True) as capture:
        capture.set_token_mask(minilm_batch["attention_mask"])
        moe.classify(minilm_batch["input_ids"], minilm_batch["attention_mask"])
    records = capture.pop()
    num_tokens = int(minilm_batch["attention_mask"].sum())
    assert [tuple(r[0].shape) for r in records.values()] == [(num_tokens, 8)] * 2
    assert [tuple(r[1].shape) for r in records.values()] == [(num_tokens, 384)] * 2
