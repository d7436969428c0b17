"""Per-family checks of the MoE view: DeepSeek routing, shared experts, Switch encoder-decoder,
and one federated FedAlign-MoE round on every tiny family."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fedalign.config import ModelConfig
from fedalign.experiments import run_experiment
from fedalign.models import (
    TINY_MODELS,
    MoEModel,
    RoutingCapture,
    load_moe_model,
    scan_moe,
    tiny_hf_config,
)
from tests.helpers import tiny_config

Tensor = torch.Tensor

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DEEPSEEK = ("tiny-deepseek-v2", "tiny-deepseek-v3")
SHARED_EXPERTS = {  # family -> the module name of its always-on shared expert(s)
    "tiny-qwen2moe": "shared_expert",
    "tiny-deepseek-v2": "shared_experts",
    "tiny-deepseek-v3": "shared_experts",
}


def _load(name: str, num_labels: int = 3) -> MoEModel:
    return load_moe_model(ModelConfig(name=name), num_labels=num_labels)


def _selections(chosen: list[Tensor]) -> Callable[[Any, Any, Any], None]:
    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        chosen.append(output[2])  # DeepSeek's gate: (router_logits, weights, indices (N, k))

    return hook


# ----------------------------------------------------------------------------------- DeepSeek
@pytest.mark.parametrize("name", DEEPSEEK)
def test_deepseek_layout_skips_dense_layers_and_reads_the_gate(name: str) -> None:
    """First layer dense (first_k_dense_replace=1); E = n_routed_experts, top-k =
    num_experts_per_tok; grouped routing configured (4 groups, 2 kept)."""
    config = tiny_hf_config(name)
    moe = _load(name)
    assert [layer.name for layer in moe.full_layout.layers] == [
        "model.layers.1.mlp",
        "model.layers.2.mlp",
    ]
    for layer in moe.full_layout.layers:
        assert layer.num_experts == config.n_routed_experts == 8
        assert layer.top_k == config.num_experts_per_tok == 2
        gate = moe.model.get_submodule(f"{layer.name}.gate")
        assert (gate.num_group, gate.topk_group) == (4, 2)
        # initialised, not the zeros it is built with
        assert float(gate.weight.detach().abs().sum()) > 0
    if name == "tiny-deepseek-v2":
        assert moe.model.get_submodule("model.layers.1.mlp.gate").topk_method == (
            "group_limited_greedy"
        )


def test_deepseek_v3_capture_is_the_raw_logits_before_bias_and_grouping(
    minilm_batch: dict[str, Tensor],
) -> None:
    """The tap gives hidden @ W.T; V3's e_score_correction_bias moves the choice, not the capture.

    The bias is a buffer: it is not a parameter, so it neither trains nor travels.
    """
    moe = _load("tiny-deepseek-v3")
    moe.model.eval()
    layer = moe.full_layout.layers[0]
    gate = moe.model.get_submodule(f"{layer.name}.gate")
    bias_name = f"{layer.name}.gate.e_score_correction_bias"
    assert bias_name in dict(moe.model.named_buffers())
    assert bias_name not in dict(moe.model.named_parameters())
    assert bias_name not in moe.trainable_names

    def run() -> tuple[Tensor, Tensor, Tensor]:
        chosen: list[Tensor] = []
        handle = gate.register_forward_hook(_selections(chosen))
        with torch.no_grad(), RoutingCapture(moe.taps) as capture:
            moe.classify(minilm_batch["input_ids"], minilm_batch["attention_mask"])
        handle.remove()
        logits, hidden = capture.pop()[layer.name]
        return logits, hidden, chosen[0]

    logits, hidden, chosen = run()
    assert logits.shape == (minilm_batch["attention_mask"].numel(), 8)
    assert torch.equal(logits, F.linear(hidden.float(), gate.weight.float()))
    favoured = int(torch.bincount(chosen.reshape(-1), minlength=8).argmin())
    assert not bool((chosen == favoured).any(-1).all())
    with torch.no_grad():
        gate.e_score_correction_bias[favoured] = 10.0
    biased_logits, _, biased_chosen = run()
    assert torch.equal(biased_logits, logits)  # captured before the bias
    assert bool((biased_chosen == favoured).any(-1).all())  # while every token now uses it


# ------------------------------------------------------------------------------ shared experts
@pytest.mark.parametrize("name", SHARED_EXPERTS)
def test_shared_experts_are_plain_parameters_not_routed_experts(name: str) -> None:
    """Shared experts (and Qwen2-MoE's shared-expert gate) train and travel with the block but
    are neither router rows nor expert slices: they are aggregated like non-MoE tensors."""
    moe = _load(name)
    module = SHARED_EXPERTS[name]
    shared = [n for n, _ in moe.model.named_parameters() if f".mlp.{module}" in n]
    per_layer = 4 if name == "tiny-qwen2moe" else 3  # gate/up/down (+ Qwen2's shared gate)
    assert len(shared) == per_layer * len(moe.full_layout.layers)
    moe_tensors = moe.full_layout.router_param_names() | moe.full_layout.expert_param_names()
    assert not set(shared) & moe_tensors
    assert set(shared) <= set(moe.trainable_names)
    for layer in moe.full_layout.layers:
        assert len(layer.experts) == layer.num_experts  # the shared expert is not an extra one


# ---------------------------------------------------------------------- Switch encoder-decoder
def test_switch_encoder_decoder_shows_encoder_and_decoder_moe_layers() -> None:
    """The full text-to-text model: the view lists the decoder's MoE layers after the encoder's;
    the capture records each side's tokens, a decoder expert round-trips alone, and the
    seq2seq loss reaches the decoder routers."""
    from transformers import SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    model = SwitchTransformersForConditionalGeneration(tiny_hf_config("tiny-switch"))
    layout, taps = scan_moe(model)
    names = [layer.name for layer in layout.layers]
    assert names == [
        "encoder.block.0.layer.1.mlp",
        "encoder.block.1.layer.1.mlp",
        "decoder.block.0.layer.2.mlp",
        "decoder.block.1.layer.2.mlp",
    ]
    assert all((layer.num_experts, layer.top_k) == (4, 1) for layer in layout.layers)

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    decoder = layout.layers[3]
    state = dict(params)
    decoder.write_expert_vector(state, 2, torch.zeros_like(decoder.expert_vector(state, 2)))
    touched = {s.param for s in decoder.experts[2]}
    assert touched and all(
        n.startswith("decoder.block.1.layer.2.mlp.experts.expert_2.") for n in touched
    )
    assert all(torch.equal(state[n], params[n]) for n in params.keys() - touched)
    assert all(not torch.equal(state[n], params[n]) for n in touched)

    model.train()
    input_ids = torch.randint(5, 1000, (2, 7))
    labels = torch.randint(5, 1000, (2, 3))
    with RoutingCapture(taps) as capture:
        loss = model(input_ids=input_ids, labels=labels).loss
    records = capture.pop()
    for layer in layout.layers:
        logits, hidden = records[layer.name]
        tokens = 14 if layer.name.startswith("encoder") else 6
        assert logits.shape == (tokens, 4) and hidden.shape == (tokens, 64)
    loss.backward()
    named = dict(model.named_parameters())
    for layer in layout.layers[2:]:
        grad = named[layer.router_params[0]].grad
        assert grad is not None and float(grad.abs().sum()) > 0, layer.name


# ------------------------------------------------------------------------- a federated round
@pytest.mark.parametrize("name", TINY_MODELS)
def test_one_fedalign_round_per_family(name: str, tmp_path: Path) -> None:
    """2 clients, 1 round of FedAlign-MoE: decisions for every MoE layer and expert; the global
    state holds every trainable tensor, finite, with routers (and shared experts) moved."""
    config = tiny_config(
        model__name=name,
        strategy__name="fedalign",
        partition__num_clients=2,
        partition__min_client_size=4,
        federated__rounds=1,
        data__max_train_examples=48,
        data__max_test_examples=16,
        train__local_steps=2,
        strategy__stats_max_examples=16,
    )
    summary = run_experiment(config, tmp_path, log=None)
    assert len(summary.accuracy_curve) == 1 and 0.0 <= summary.final_accuracy <= 1.0

    initial = load_moe_model(config.model, num_labels=8, seed=config.federated.seed)
    decisions = [
        json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()
    ]
    assert len(decisions) == 1
    layers = decisions[0]["layers"]
    assert list(layers) == [layer.name for layer in initial.layout.layers]
    for layer in initial.layout.layers:
        assert len(layers[layer.name]["experts"]) == layer.num_experts

    final = load_file(str(tmp_path / "final_state.safetensors"))
    assert set(final) == set(initial.trainable_names)
    assert all(bool(torch.isfinite(t).all()) for t in final.values())
    start = initial.trainable_state()
    moved = initial.layout.router_param_names()
    moved |= {n for n in final if any(f".{m}." in n for m in SHARED_EXPERTS.values())}
    for param in moved:
        assert not torch.equal(final[param], start[param]), param


# --------------------------------------------------------------------------- causal LMs
@pytest.mark.parametrize(
    "name", [n for n in TINY_MODELS if n not in ("tiny-switch", "tiny-upcycled")]
)
def test_causal_lm_has_the_classifier_s_moe_view(name: str) -> None:
    """The same config built as ``AutoModelForCausalLM`` gives the same MoE layers, top-k and
    expert slices under the same names, and its capture sees every token."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    causal = AutoModelForCausalLM.from_config(tiny_hf_config(name)).eval()
    layout, taps = scan_moe(causal)
    classifier = _load(name).full_layout
    assert layout == classifier
    ids = torch.randint(5, 1000, (2, 6))
    with torch.no_grad(), RoutingCapture(taps) as capture:
        causal(input_ids=ids)
    records = capture.pop()
    assert [tuple(records[layer.name][0].shape) for layer in layout.layers] == [
        (12, layer.num_experts) for layer in layout.layers
    ]
