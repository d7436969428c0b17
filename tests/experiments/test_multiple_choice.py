"""End to end: a causal MoE LM federated with FedAlign-MoE on MMLU- and HellaSwag-format data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fedalign.cli import main
from fedalign.client import evaluate, prepare, run_client_round, train_local
from fedalign.config import ConfigError
from fedalign.experiments.run import run_experiment
from fedalign.models import CAUSAL_TINY_MODELS
from fedalign.protocol import TrainInstructions
from fedalign.records import read_jsonl
from tests.helpers import tiny_choice_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("dataset", ["mmlu", "hellaswag"])
def test_fedalign_on_a_causal_moe_lm(dataset: str, tmp_path: Path) -> None:
    config = tiny_choice_config(dataset, strategy__name="fedalign")
    summary = run_experiment(config, tmp_path / "run", log=None)
    lines = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert math.isfinite(line["train_loss"]) and math.isfinite(line["global_loss"])
        assert 0.0 <= line["global_accuracy"] <= 1.0
        assert all(0.0 <= a <= 1.0 for a in line["local_accuracy"])
        assert set(line["routing_divergence"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    # round 2 carries FedAlign-MoE's routing regulariser toward the global distribution
    assert lines[1]["routing_loss"] > 0
    routing = read_jsonl(tmp_path / "run" / "routing.jsonl")
    assert [r["round"] for r in routing] == [0, 1, 2]
    usage = torch.tensor(routing[-1]["layers"]["model.layers.0.mlp"]["usage"])
    assert usage.shape == (3, 4) and torch.all(usage.sum(dim=1) > 0)
    decisions = read_jsonl(tmp_path / "run" / "decisions.jsonl")
    assert len(decisions) == 2
    assert 0.0 <= summary.final_accuracy <= 1.0


def test_training_on_the_correct_choice_lowers_its_loss() -> None:
    config = tiny_choice_config("mmlu", train__lr=1e-2, train__local_steps=12)
    prepared = prepare(config)
    model, data = prepared.model, prepared.data
    assert model.head == "causal-lm"
    rows = data.client_rows(0)
    before = evaluate(model, rows)
    train_local(model, rows, [], config.train, global_parameters=model.trainable_state(), seed=0)
    after = evaluate(model, rows)
    # the per-token NLL of the correct choices it trained on falls
    assert after.loss < before.loss - 0.05


def test_cli_runs_mmlu_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = [
        "run", "--model", "tiny-qwen3moe", "--dataset", "mmlu", "--data-path", "sample",
        "--device", "cpu", "--precision", "fp32", "--clients", "3", "--alpha", "0.5",
        "--rounds", "1", "--local-steps", "1", "--batch-size", "4", "--no-progress",
        "--set", "model.max-length=40", "--set", "data.test-fraction=0.25",
        "--set", "partition.min-client-size=4", "--set", "strategy.stats-max-examples=8",
        "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    assert "final accuracy" in capsys.readouterr().out
    assert 'device = "cpu"' in (out / "config.toml").read_text()


def test_an_encoder_cannot_score_multiple_choice() -> None:
    config = tiny_choice_config("hellaswag")
    config.model.name = "tiny-upcycled"
    with pytest.raises(ConfigError, match="encoder without a language-modelling head"):
        prepare(config)


def test_a_causal_moe_lm_from_a_folder(tmp_path: Path) -> None:
    """The hub path (``from_pretrained``) on a saved tiny DeepSeek-V2: fused experts, MLA."""
    import transformers

    hf: Any = transformers
    config = hf.DeepseekV2Config(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=0,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        vocab_size=30522,  # the MiniLM tokenizer used when the folder has none
        pad_token_id=0,
    )
    torch.manual_seed(0)
    hf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    run = tiny_choice_config("hellaswag", model__name=str(tmp_path / "model"), federated__rounds=1)
    summary = run_experiment(run, tmp_path / "run", log=None)
    assert 0.0 <= summary.final_accuracy <= 1.0
    layout = (tmp_path / "run" / "layout.json").read_text()
    assert "model.layers.1.mlp" in layout


@pytest.mark.parametrize("name", CAUSAL_TINY_MODELS)
def test_every_tiny_decoder_family_trains_and_scores_as_a_causal_lm(name: str) -> None:
    config = tiny_choice_config("mmlu", model__name=name)
    prepared = prepare(config)
    model = prepared.model
    assert model.head == "causal-lm" and model.full_layout.layers
    done = run_client_round(
        model,
        prepared.data,
        config,
        1,
        0,
        model.trainable_state(),
        TrainInstructions(collect_statistics=True),
    )
    assert math.isfinite(done.result.metrics["task_loss"])
    assert set(done.result.routing_statistics) == {layer.name for layer in model.layout.layers}
    assert 0.0 <= evaluate(model, prepared.data.test).accuracy <= 1.0
