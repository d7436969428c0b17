"""Tests for fedalign.models.loading: sources, from_pretrained folders, errors, trainable choice."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedalign.config import ConfigError, ModelConfig
from fedalign.models import (
    SUPPORTED_TYPES,
    TINY_MODELS,
    EncoderClassifier,
    MoEModel,
    build_classifier,
    load_moe_model,
    tiny_hf_config,
)
from fedalign.models.heads import PooledClassifier

Tensor = torch.Tensor

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ARCHITECTURES = {
    "tiny-qwen3moe": "qwen3_moe",
    "tiny-qwen2moe": "qwen2_moe",
    "tiny-mixtral": "mixtral",
    "tiny-switch": "switch_transformers",
    "tiny-upcycled": "bert",
    "tiny-deepseek-v2": "deepseek_v2",
    "tiny-deepseek-v3": "deepseek_v3",
    "tiny-olmoe": "olmoe",
    "tiny-granitemoe": "granitemoe",
    "tiny-phimoe": "phimoe",
    "tiny-jetmoe": "jetmoe",
}
# MoE layers per tiny model (JetMoE: a mixture of attention heads and of MLPs per layer)
MOE_LAYERS = {name: 2 for name in ARCHITECTURES} | {"tiny-jetmoe": 4}

# moe+head must train exactly these parameters (full match) and this many of them
_FUSED = r"model\.layers\.[01]\.mlp\.(gate\.weight|experts\.(gate_up_proj|down_proj))|score\.weight"
MOE_HEAD_PATTERNS = {
    "tiny-qwen3moe": (_FUSED, 2 * 3 + 1),
    # + per layer the shared expert's three projections and its gate
    "tiny-qwen2moe": (
        _FUSED + r"|model\.layers\.[01]\.mlp\.shared_expert(\.(gate|up|down)_proj|_gate)\.weight",
        2 * 3 + 1 + 2 * 4,
    ),
    "tiny-mixtral": (_FUSED, 2 * 3 + 1),
    "tiny-switch": (
        r"encoder\.encoder\.block\.[01]\.layer\.1\.mlp\."
        r"(router\.classifier\.weight|experts\.expert_[0-3]\.(wi|wo)\.weight)"
        r"|classifier\.(weight|bias)",
        2 * (1 + 4 * 2) + 2,
    ),
    # MoEfied (the default): experts' fc_out has no bias; the FFN's output bias is counted
    # once per layer (output_bias), trained with its block but not a routed expert
    "tiny-upcycled": (
        r"encoder\.encoder\.layer\.[23]\.intermediate\."
        r"(router\.weight|output_bias|experts\.[0-7]\.(fc_in\.(weight|bias)|fc_out\.weight))"
        r"|classifier\.(weight|bias)",
        2 * (1 + 1 + 8 * 3) + 2,
    ),
    # DeepSeek: layers 1 and 2 are MoE (layer 0 dense); + per layer the shared experts
    **{
        name: (
            r"model\.layers\.[12]\.mlp\.(gate\.weight|experts\.(gate_up_proj|down_proj)"
            r"|shared_experts\.(gate|up|down)_proj\.weight)|score\.weight",
            2 * 6 + 1,
        )
        for name in ("tiny-deepseek-v2", "tiny-deepseek-v3")
    },
    # OLMoE and GraniteMoE: base model + pooled head ``classifier`` (weight and bias)
    "tiny-olmoe": (
        r"model\.layers\.[01]\.mlp\.(gate\.weight|experts\.(gate_up_proj|down_proj))"
        r"|classifier\.(weight|bias)",
        2 * 3 + 2,
    ),
    "tiny-granitemoe": (
        r"model\.layers\.[01]\.block_sparse_moe\.(router\.weight|experts\.(gate_up_proj|down_proj))"
        r"|classifier\.(weight|bias)",
        2 * 3 + 2,
    ),
    "tiny-phimoe": (
        r"model\.layers\.[01]\.mlp\.(router\.weight|experts\.(gate_up_proj|down_proj))"
        r"|score\.weight",
        2 * 3 + 1,
    ),
    # + per block its output bias (trained with the block, not a routed expert)
    "tiny-jetmoe": (
        r"model\.layers\.[01]\.(mlp|self_attention\.experts)\."
        r"(router\.layer\.weight|(input|output)_linear\.weight|bias)|score\.weight",
        4 * 4 + 1,
    ),
}
# parameters inside MoE blocks that train but are not routed experts (shared experts, biases)
SHARED = {
    "tiny-qwen2moe": r".*\.shared_expert(\..*|_gate\.weight)",
    "tiny-upcycled": r".*\.output_bias",
    "tiny-deepseek-v2": r".*\.shared_experts\..*",
    "tiny-deepseek-v3": r".*\.shared_experts\..*",
    "tiny-jetmoe": r".*\.(mlp|experts)\.bias",
}

# peft 0.21 calls a transformers 5.23 method that warns it is deprecated
PEFT_WARNING = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"


def _load(name: str, num_labels: int = 3, **kwargs: Any) -> MoEModel:
    return load_moe_model(ModelConfig(name=name, **kwargs), num_labels=num_labels)


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _head_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.split(".")[0] in ("score", "classifier")}


# ---------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_classifies(name: str, minilm_batch: dict[str, Tensor]) -> None:
    """Every tiny model loads by name and gives finite logits ``(B, C)``."""
    moe = _load(name, num_labels=5)
    assert moe.architecture == ARCHITECTURES[name]
    assert moe.num_labels == 5
    moe.model.eval()
    with torch.no_grad():
        logits = moe.classify(minilm_batch["input_ids"], minilm_batch["attention_mask"])
    assert logits.shape == (4, 5)
    assert bool(torch.isfinite(logits).all())
    assert len(moe.taps) == len(moe.full_layout.layers) == MOE_LAYERS[name]


def _padded(examples: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D id tensors into ``(input_ids, attention_mask)``."""
    width = max(len(ids) for ids in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, ids in enumerate(examples):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return input_ids, mask


def _assert_padding_invariant(moe: MoEModel, pad_id: int) -> None:
    """Logits of a right-padded batch equal each example's logits computed alone."""
    texts = ("a small dog", "the committee approved the long report on river pollution", "tea")
    examples = [moe.tokenizer(t, return_tensors="pt")["input_ids"][0] for t in texts]
    input_ids, mask = _padded(examples, pad_id)
    assert bool((mask == 0).any())
    moe.model.eval()
    with torch.no_grad():
        batched = moe.classify(input_ids, mask)
        alone = torch.cat([moe.classify(ids[None], torch.ones(1, len(ids))) for ids in examples])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_padding_does_not_change_logits(name: str) -> None:
    """Every tiny classifier ignores right padding (pooling and attention use the mask/pad id)."""
    moe = _load(name)
    _assert_padding_invariant(moe, int(moe.tokenizer.pad_token_id))


def test_folder_with_no_pad_token_pads_like_the_data_pipeline(tmp_path: Path) -> None:
    """No pad token in config or tokenizer (as for Mixtral on the hub): the model pads with the
    id fedalign.data pads with (here unk), so batches > 1 classify, padding-invariant."""
    from transformers import AutoTokenizer, MixtralForCausalLM

    from fedalign.data import pad_token_id
    from fedalign.models import minilm_path

    config = tiny_hf_config("tiny-mixtral")
    config.pad_token_id = None
    MixtralForCausalLM(config).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)

    moe = _load(str(tmp_path))
    assert moe.tokenizer.pad_token_id is None
    pad_id = pad_token_id(moe.tokenizer)
    assert pad_id == moe.tokenizer.unk_token_id
    assert moe.model.config.pad_token_id == pad_id
    _assert_padding_invariant(moe, pad_id)


def test_tiny_models_are_seeded() -> None:
    """The same seed gives bitwise the same model; another seed does not."""
    first = _params(load_moe_model(ModelConfig(name="tiny-qwen3moe"), 3, seed=7).model)
    second = _params(load_moe_model(ModelConfig(name="tiny-qwen3moe"), 3, seed=7).model)
    other = _params(load_moe_model(ModelConfig(name="tiny-qwen3moe"), 3, seed=8).model)
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


@pytest.mark.parametrize("name", [n for n in TINY_MODELS if n != "tiny-upcycled"])
def test_saved_folder_loads_back_with_same_weights(
    name: str, tmp_path: Path, minilm_batch: dict[str, Tensor]
) -> None:
    """``save_pretrained`` + tokenizer, then ``load_moe_model(folder)`` (from_pretrained path).

    The MoE parts (routers and experts, in fact every saved tensor) come back bitwise equal,
    the layout is the same, and the HF classifiers give the same logits.
    """
    model, tokenizer, model_type = build_classifier(ModelConfig(name=name), 3, seed=0)
    wrapped = isinstance(model, (EncoderClassifier, PooledClassifier))  # pooled head added by us
    inner = model.encoder if isinstance(model, EncoderClassifier) else model
    inner = model.model if isinstance(model, PooledClassifier) else inner
    inner.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()

    original = _load(name)
    loaded = _load(str(tmp_path))
    assert loaded.architecture == model_type == ARCHITECTURES[name]
    assert loaded.full_layout == original.full_layout
    assert loaded.trainable_names == original.trainable_names

    before, after = _params(model), _params(loaded.model)
    moe_names = loaded.full_layout.router_param_names() | loaded.full_layout.expert_param_names()
    assert moe_names and moe_names <= after.keys()
    for param in moe_names:
        assert torch.equal(before[param], after[param]), param
    fresh_head = _head_names(loaded.model) if wrapped else set()
    for param in before.keys() - fresh_head:
        assert torch.equal(before[param], after[param]), param
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()

    if not wrapped:
        model.eval()
        loaded.model.eval()
        with torch.no_grad():
            expected = model(**minilm_batch).logits
            got = loaded.classify(minilm_batch["input_ids"], minilm_batch["attention_mask"])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_saved_classifier_loads_for_another_number_of_classes(
    tmp_path: Path, minilm_batch: dict[str, Tensor]
) -> None:
    """A saved 3-class classifier reused for 5 classes: fresh (seeded) head, same MoE weights."""
    model, tokenizer, _ = build_classifier(ModelConfig(name="tiny-qwen3moe"), 3, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    moe = _load(str(tmp_path), num_labels=5)
    again = _load(str(tmp_path), num_labels=5)
    before, after = _params(model), _params(moe.model)
    assert after["score.weight"].shape == (5, 64)
    assert torch.equal(after["score.weight"], _params(again.model)["score.weight"])
    for param in before.keys() - {"score.weight"}:
        assert torch.equal(before[param], after[param]), param
    with torch.no_grad():
        logits = moe.classify(minilm_batch["input_ids"], minilm_batch["attention_mask"])
    assert logits.shape == (4, 5)


def test_causal_lm_folder_loads_as_classifier(tmp_path: Path) -> None:
    """A causal-LM checkpoint (what the hub holds) loads with its MoE weights and a new head."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    causal = Qwen3MoeForCausalLM(tiny_hf_config("tiny-qwen3moe"))
    causal.save_pretrained(tmp_path)
    moe = _load(str(tmp_path), num_labels=4)
    assert moe.architecture == "qwen3_moe"
    before, after = _params(causal), _params(moe.model)
    assert set(after) - set(before) == {"score.weight"}
    assert after["score.weight"].shape == (4, 64)
    moe_names = moe.full_layout.router_param_names() | moe.full_layout.expert_param_names()
    assert len(moe_names) == 6
    for param in after.keys() - {"score.weight"}:
        assert torch.equal(before[param], after[param]), param


def test_switch_seq2seq_folder_loads_its_encoder(tmp_path: Path) -> None:
    """A full Switch encoder-decoder checkpoint (what the hub holds) gives its encoder, bitwise."""
    from transformers import SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    full = SwitchTransformersForConditionalGeneration(tiny_hf_config("tiny-switch"))
    full.save_pretrained(tmp_path)
    moe = _load(str(tmp_path))
    assert moe.architecture == "switch_transformers"
    assert len(moe.full_layout.layers) == 2  # the encoder's MoE layers only
    saved = _params(full)
    encoder = {n: p for n, p in _params(moe.model).items() if n.startswith("encoder.")}
    assert len(encoder) > 20
    for param, value in encoder.items():
        assert torch.equal(value, saved[param.removeprefix("encoder.")]), param


def test_saved_dense_bert_folder_is_upcycled(
    tmp_path: Path, minilm_tokenizer: Any, minilm_batch: dict[str, Tensor]
) -> None:
    """A dense BERT folder loads upcycled: experts copy its FFN, hidden states are unchanged."""
    from transformers import BertModel

    torch.manual_seed(0)
    dense = BertModel(tiny_hf_config("tiny-upcycled"), add_pooling_layer=False).eval()
    dense.save_pretrained(tmp_path)
    minilm_tokenizer.save_pretrained(tmp_path)

    moe = _load(str(tmp_path), num_experts=4, top_k=2, upcycle_layers=3, expert_init="copy")
    assert moe.architecture == "bert"
    assert [layer.name for layer in moe.full_layout.layers] == [
        f"encoder.encoder.layer.{i}.intermediate" for i in (1, 2, 3)
    ]
    assert all(layer.num_experts == 4 and layer.top_k == 2 for layer in moe.full_layout.layers)
    params = _params(moe.model)
    for i in (1, 2, 3):
        ffn_in = dense.encoder.layer[i].intermediate.dense.weight
        ffn_out = dense.encoder.layer[i].output.dense.weight
        for e in range(4):
            expert = f"encoder.encoder.layer.{i}.intermediate.experts.{e}"
            assert torch.equal(params[f"{expert}.fc_in.weight"], ffn_in)
            assert torch.equal(params[f"{expert}.fc_out.weight"], ffn_out)
    assert isinstance(moe.model, EncoderClassifier)
    moe.model.eval()
    with torch.no_grad():
        expected = dense(**minilm_batch).last_hidden_state
        got = moe.model.encoder(**minilm_batch).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_folder_without_tokenizer_uses_minilm_tokenizer(
    tmp_path: Path, minilm_tokenizer: Any
) -> None:
    """A model folder with no tokenizer files gets the MiniLM tokenizer."""
    model, _, _ = build_classifier(ModelConfig(name="tiny-mixtral"), 3, seed=0)
    model.save_pretrained(tmp_path)
    moe = _load(str(tmp_path))
    assert moe.tokenizer.get_vocab() == minilm_tokenizer.get_vocab()


# ----------------------------------------------------------------------------------- errors
def test_unsupported_model_type_lists_supported_types(tmp_path: Path) -> None:
    """A loadable folder of an unsupported type (tiny Llama) names the type and the choices."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    LlamaModel(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as info:
        _load(str(tmp_path))
    message = str(info.value)
    assert "model.name" in message and "'llama'" in message
    for model_type in SUPPORTED_TYPES:
        assert f"'{model_type}'" in message, model_type


@pytest.mark.parametrize("name", ["tiny-xyz", "MISSING", "not-an-org/not-a-model"])
def test_unknown_name_or_missing_path_names_the_field(name: str, tmp_path: Path) -> None:
    """Unknown tiny name, missing folder, unreachable hub id: ConfigError naming model.name."""
    if name == "MISSING":
        name = str(tmp_path / "no-such-folder")
    with pytest.raises(ConfigError, match=r"model\.name") as info:
        _load(name)
    assert repr(name) in str(info.value)
    assert "tiny-qwen3moe" in str(info.value)  # the accepted names are listed


def test_folder_without_config_is_a_config_error(tmp_path: Path) -> None:
    """An existing folder that holds no model is a ConfigError on model.name."""
    with pytest.raises(ConfigError, match=r"model\.name"):
        _load(str(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "tiny-upcycled", "num_experts": 4, "top_k": 5}, r"model\.top-k"),
        ({"name": "upcycled-minilm", "num_experts": 2, "top_k": 3}, r"model\.top-k"),
        ({"name": "tiny-upcycled", "upcycle_layers": 5}, r"model\.upcycle-layers"),
        ({"name": "tiny-upcycled", "upcycle_layers": 0}, r"model\.upcycle-layers"),
        ({"name": "tiny-qwen3moe", "trainable": "frozen"}, r"model\.trainable"),
        (
            {"name": "tiny-qwen3moe", "trainable": "lora", "lora_targets": ["no_such"]},
            r"model\.lora-targets",
        ),
    ],
)
def test_bad_model_values_raise_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    """Out-of-range upcycling, trainable and LoRA values raise ConfigError naming the key."""
    with pytest.raises(ConfigError, match=field):
        _load(**kwargs)


def test_fewer_than_two_labels_is_rejected() -> None:
    """A classifier needs at least two classes."""
    with pytest.raises(ConfigError, match="at least 2 classes"):
        _load("tiny-qwen3moe", num_labels=1)


# -------------------------------------------------------------------------- trainable choice
@pytest.mark.parametrize("name", TINY_MODELS)
def test_moe_plus_head_trains_exactly_routers_experts_and_head(name: str) -> None:
    """moe+head: routers, experts and the head train, nothing else; the layout covers them."""
    moe = _load(name)
    pattern, count = MOE_HEAD_PATTERNS[name]
    grads = [n for n, p in moe.model.named_parameters() if p.requires_grad]
    assert moe.trainable_names == grads
    assert len(grads) == count
    for param in grads:
        assert re.fullmatch(pattern, param), param
    layout_names = moe.layout.router_param_names() | moe.layout.expert_param_names()
    head = _head_names(moe.model)
    # the always-on shared expert trains with its block but is not a routed expert
    shared = set(grads) - layout_names - head
    assert bool(shared) == (name in SHARED)
    assert all(re.fullmatch(SHARED[name], n) for n in shared)
    assert head and set(grads) == layout_names | head | shared
    assert not shared & layout_names
    assert moe.layout == moe.full_layout  # every MoE tensor trains here


@pytest.mark.parametrize("name", ["tiny-qwen3moe", "tiny-switch", "tiny-upcycled"])
def test_all_trains_everything(name: str) -> None:
    """trainable=all: every parameter trains, in named_parameters order; no prefix cache."""
    moe = _load(name, trainable="all")
    assert moe.trainable_names == [n for n, _ in moe.model.named_parameters()]
    assert all(p.requires_grad for p in moe.model.parameters())
    assert moe.layout == moe.full_layout
    assert not moe.supports_prefix_cache


@pytest.mark.filterwarnings(PEFT_WARNING)
@pytest.mark.parametrize(
    ("name", "targets"),
    [("tiny-qwen3moe", ["q_proj", "v_proj"]), ("tiny-upcycled", ["query", "value"])],
)
def test_lora_trains_adapters_routers_and_head(
    name: str, targets: list[str], minilm_batch: dict[str, Tensor]
) -> None:
    """trainable=lora: peft wraps; lora_ tensors, routers and head train; experts stay frozen."""
    from peft import PeftModel

    moe = _load(name, trainable="lora", lora_targets=targets, lora_rank=4)
    assert isinstance(moe.model, PeftModel)
    named = dict(moe.model.named_parameters())
    routers = moe.full_layout.router_param_names()
    experts = moe.full_layout.expert_param_names()
    heads = {n for n in named if re.search(r"\.(score|classifier)\.(weight|bias)$", n)}
    heads -= routers  # (Switch routers are called "classifier" too)
    loras = {n for n in named if ".lora_" in n}
    assert len(routers) == 2 and experts and heads
    # two tensors (A, B) per target module and layer
    layers = 2 if name == "tiny-qwen3moe" else 4
    assert len(loras) == 2 * len(targets) * layers
    assert all(any(f".{t}.lora_" in n for t in targets) for n in loras)
    assert set(moe.trainable_names) == loras | routers | heads
    assert not any(named[n].requires_grad for n in experts)
    assert moe.layout.router_param_names() == routers
    assert moe.layout.expert_param_names() == set()  # frozen experts do not travel
    assert len(moe.taps) == 2

    moe.model.eval()
    with torch.no_grad():
        logits = moe.classify(minilm_batch["input_ids"], minilm_batch["attention_mask"])
    assert logits.shape == (4, 3)


@pytest.mark.filterwarnings(PEFT_WARNING)
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("tiny-qwen3moe", {"trainable": "moe+head"}),
        ("tiny-switch", {"trainable": "moe+head"}),
        ("tiny-qwen3moe", {"trainable": "lora", "lora_targets": ["q_proj", "v_proj"]}),
        ("tiny-upcycled", {"trainable": "lora", "lora_targets": ["query", "value"]}),
    ],
)
def test_trainable_state_round_trip(
    name: str, kwargs: dict[str, Any], minilm_batch: dict[str, Tensor]
) -> None:
    """trainable_state() copies exactly the trainable tensors; load_trainable_state writes them.

    Only those tensors change, the output changes with them, and reloading the first state
    restores the model bitwise.
    """
    moe = _load(name, **kwargs)
    moe.model.eval()
    state = moe.trainable_state()
    assert list(state) == moe.trainable_names
    before = {n: p.detach().clone() for n, p in moe.model.named_parameters()}
    with torch.no_grad():
        logits_before = moe.classify(minilm_batch["input_ids"], minilm_batch["attention_mask"])

    # the returned tensors are copies, not views of the parameters
    for tensor in state.values():
        tensor.add_(1.0)
    assert all(torch.equal(p, before[n]) for n, p in moe.model.named_parameters())

    moe.load_trainable_state(state)
    now = dict(moe.model.named_parameters())
    for param, value in now.items():
        expected = state[param] if param in state else before[param]
        assert torch.equal(value, expected), param
    assert all(torch.equal(moe.trainable_state()[n], state[n]) for n in state)
    with torch.no_grad():
        logits_after = moe.classify(minilm_batch["input_ids"], minilm_batch["attention_mask"])
    assert not torch.allclose(logits_after, logits_before)

    moe.load_trainable_state({n: before[n] for n in moe.trainable_names})
    assert all(torch.equal(p, before[n]) for n, p in moe.model.named_parameters())
    with pytest.raises(KeyError, match="unknown parameter"):
        moe.load_trainable_state({"no.such.weight": torch.zeros(1)})


# ------------------------------------------------------------- tokenizer and vocabulary
def _small_vocabulary_folder(folder: Path, vocab_size: int) -> Path:
    """An OLMoE folder saved from a config (random weights, no tokenizer), as users save
    models for tests."""
    from transformers import OlmoeForCausalLM

    config = tiny_hf_config("tiny-olmoe")
    config.vocab_size = vocab_size
    OlmoeForCausalLM(config).save_pretrained(folder)
    return folder


def _word_level_tokenizer(folder: Path, size: int) -> Path:
    """A word-level tokenizer of ``size`` ids built offline (``tokenizers``), saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", *(f"w{i}" for i in range(size - 2))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(folder)
    return folder


def test_tokenizer_larger_than_the_embedding_is_refused_with_both_sizes(tmp_path: Path) -> None:
    folder = _small_vocabulary_folder(tmp_path / "model", 1000)
    with pytest.raises(ConfigError) as caught:
        _load(str(folder))
    message = str(caught.value)
    assert "1000 rows" in message and "30522 ids" in message
    assert "model.tokenizer" in message and "the model folder has none" in message


def test_model_tokenizer_that_fits_runs(tmp_path: Path) -> None:
    folder = _small_vocabulary_folder(tmp_path / "model", 1000)
    tokenizer = _word_level_tokenizer(tmp_path / "tokenizer", 1000)
    moe = _load(str(folder), tokenizer=str(tokenizer))
    assert len(moe.tokenizer) == 1000
    encoded = moe.tokenizer(["w1 w2 w999", "w3"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = moe.classify(encoded["input_ids"], encoded["attention_mask"])
    assert logits.shape == (2, 3)


def test_model_tokenizer_that_does_not_load_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.tokenizer .* does not load"):
        _load("tiny-qwen3moe", tokenizer=str(tmp_path / "missing"))


def test_cli_says_one_line_and_exits_2_for_a_misfit_vocabulary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedalign.cli import main
    from tests.helpers import TINY_CLI

    folder = _small_vocabulary_folder(tmp_path / "model", 1000)
    args = [*TINY_CLI, "--model", str(folder), "--out", str(tmp_path / "run")]
    capsys.readouterr()  # saving the folder printed progress bars
    assert main(["run", *args]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "1000 rows" in error and "30522 ids" in error
    assert "Traceback" not in error


def test_wrap_moe_model_gives_what_load_moe_model_gives() -> None:
    """A model built by the caller (the GPU check's random model of a given size) gets the
    same MoE view, trainable choice and placement as one that load_moe_model builds."""
    from fedalign.models import wrap_moe_model

    config = ModelConfig(name="tiny-qwen3moe")
    loaded = load_moe_model(config, num_labels=3, seed=0)
    bare, tokenizer, model_type = build_classifier(config, 3, 0)
    wrapped = wrap_moe_model(bare, tokenizer, model_type, config, 3, device="cpu")
    assert wrapped.trainable_names == loaded.trainable_names
    assert wrapped.layout == loaded.layout and wrapped.architecture == loaded.architecture
    assert [t.layer for t in wrapped.taps] == [t.layer for t in loaded.taps]
    config.trainable = "everything"
    with pytest.raises(ConfigError, match=r"model\.trainable"):
        wrap_moe_model(bare, tokenizer, model_type, config, 3)
