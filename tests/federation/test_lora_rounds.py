"""Federated rounds of a tiny Qwen3-MoE with LoRA experts (simulator, end to end)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedalign.config import ExperimentConfig
from fedalign.experiments import run_experiment
from tests.helpers import tiny_config

H, I_MOE = 64, 32  # tiny-qwen3moe: hidden size, expert intermediate size
EXPERT_UPDATE = 2 * I_MOE * H + H * I_MOE  # gate_up (2I, H) + down (H, I) values


def _config(strategy: str, aggregation: str, rounds: int) -> ExperimentConfig:
    return tiny_config(
        model__name="tiny-qwen3moe",
        model__trainable="lora",
        model__lora_targets=["q_proj", "v_proj"],
        model__lora_experts=True,
        model__lora_rank=4,
        model__lora_aggregation=aggregation,
        strategy__name=strategy,
        federated__rounds=rounds,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "aggregation", "rounds"),
    [("fedavg", "factors", 1), ("fedalign", "product-svd", 2)],
)
def test_lora_expert_rounds(tmp_path: Path, strategy: str, aggregation: str, rounds: int) -> None:
    config = _config(strategy, aggregation, rounds)
    folder = tmp_path / strategy
    summary = run_experiment(config, folder, log=None)
    assert len(summary.accuracy_curve) >= 1
    records = [json.loads(line) for line in (folder / "decisions.jsonl").read_text().splitlines()]
    assert len(records) == rounds
    for record in records:
        assert record["lora"]["aggregation"] == aggregation
        assert 0.0 <= record["lora"]["product_error_max"] < 1.0
    if strategy == "fedalign":
        experts = [e for layer in records[-1]["layers"].values() for e in layer["experts"]]
        merged = [e for e in experts if e["fallback"] is None]
        assert merged, "no expert went through step D"
        # the direction consensus saw each expert's full weight update s B_e A_e
        assert all(e["lora_update_size"] == EXPERT_UPDATE for e in merged)
        assert all(e["lora_product_error"] < 1.0 for e in merged)
        assert all(len(e["consensus"]) == len(e["active"]) for e in merged)
    # only adapters, routers and head travel; the LoRA expert factors moved
    final = load_file(str(folder / "final_state.safetensors"))
    assert not any(name.endswith(("gate_up_proj", "down_proj")) for name in final)
    lora_b = [n for n in final if ".experts." in n and ".lora_B." in n]
    assert len(lora_b) == 4  # 2 layers x (gate_up, down)
    # peft starts every B at 0: the aggregated expert updates are not
    assert all(float(final[n].abs().max()) > 0 for n in lora_b)
