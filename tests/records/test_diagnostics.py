"""Merge diagnostics (``records/diagnostics.py``) and the evaluation's diagnostics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedalign.client import evaluate, expert_specialisation, prepare
from fedalign.experiments.report.page import build_report
from fedalign.experiments.run import run_experiment
from fedalign.federation import evaluate_global
from fedalign.protocol import ClientResult
from fedalign.records import read_jsonl
from fedalign.records.diagnostics import merge_diagnostics
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# clients 0, 1, 2 hold classes (a, b, c): 0 has only a, 1 only b, 2 half a half c
COUNTS = [[10, 0, 0], [0, 30, 0], [10, 0, 10]]
BASE = {"clients": [0, 1, 2], "example_weights": {"0": 0.2, "1": 0.6, "2": 0.2}}


def test_fedavg_merges_by_data_share() -> None:
    result = merge_diagnostics(BASE, COUNTS)
    assert result["source"] == "example-weights" and result["merges"] == 0
    assert result["tv_mean"] == 0.0 and result["class_coverage_min"] == 1.0


def test_expert_merge_that_leaves_a_client_out() -> None:
    """Expert merged from clients 0 and 1 only (weights 0.5, 0.5): TV = 0.5 (|0.5-0.2| +
    |0.5-0.6| + 0.2) = 0.3; class a reached 10 of 20, b all, c none."""
    decision = {
        **BASE,
        "layers": {"moe": {"experts": [{"aggregation_weights": {"0": 0.5, "1": 0.5}}]}},
    }
    result = merge_diagnostics(decision, COUNTS)
    assert result["source"] == "expert-weights" and result["merges"] == 1
    assert result["tv_mean"] == pytest.approx(0.3)
    assert result["class_coverage_by_class"] == [0.5, 1.0, 0.0]
    assert result["class_coverage_min"] == 0.0
    assert result["class_coverage_mean"] == pytest.approx(0.5)


def test_expert_without_merge_is_skipped_and_absent_classes_ignored() -> None:
    decision = {
        "clients": [0, 1],
        "example_weights": {"0": 0.25, "1": 0.75},
        "layers": {
            "moe": {
                "experts": [
                    {"aggregation_weights": None, "fallback": "no-active-client"},
                    {"weights": {"0": 0.25, "1": 0.75}},
                ]
            }
        },
    }
    result = merge_diagnostics(decision, COUNTS)
    assert result["merges"] == 1 and result["tv_mean"] == 0.0
    assert result["class_coverage_by_class"] == [1.0, 1.0, None]  # class c: not in the round


def test_class_accuracy_and_routing_breakdown() -> None:
    prepared = prepare(tiny_config())
    model, data = prepared.model, prepared.data
    parameters = model.trainable_state()
    routers = sorted(model.layout.router_param_names())
    assert routers
    same = ClientResult(client_id=0, parameters=dict(parameters), num_examples=1)
    scrambled = {
        **parameters,
        **{n: torch.randn_like(parameters[n]) * 10 for n in routers},
    }
    other = ClientResult(client_id=1, parameters=scrambled, num_examples=1)
    result = evaluate_global(model, data, parameters, results=[same, other])
    counts = np.bincount(data.test.labels.numpy(), minlength=len(result["class_accuracy"]))
    weighted = sum(a * n for a, n in zip(result["class_accuracy"], counts) if a is not None)
    assert weighted / counts.sum() == pytest.approx(result["global_accuracy"], abs=1e-6)
    assert result["own_router_gain"]["0"] == 0.0
    assert set(result["own_router_accuracy"]) == {"0", "1"}
    # the model is left holding the global parameters
    after = model.trainable_state()
    assert all(torch.equal(after[n], parameters[n]) for n in routers)
    assert "own_router_gain" not in evaluate_global(model, data, parameters)


def test_expert_specialisation_is_zero_when_blurred_and_one_when_experts_decide() -> None:
    blurred = torch.tensor([[5.0, 5.0, 10.0], [1.0, 1.0, 2.0]])  # every class routed alike
    assert expert_specialisation(blurred) == pytest.approx(0.0, abs=1e-12)
    decided = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 3.0]])  # the expert gives the class
    assert expert_specialisation(decided) == pytest.approx(1.0)
    partial = torch.tensor([[4.0, 1.0], [1.0, 4.0]])
    assert 0.0 < expert_specialisation(partial) < 1.0  # type: ignore[operator]
    assert expert_specialisation(torch.zeros(2, 3)) is None
    assert expert_specialisation(torch.tensor([[3.0, 1.0]])) is None  # one class: nothing to say


def test_routing_counts_by_class_add_up_to_the_tokens() -> None:
    """Each real token adds 1 (k routes of 1/k) to its example's class row, per layer."""
    prepared = prepare(tiny_config())
    model, test = prepared.model, prepared.data.test
    plain = evaluate(model, test, batch_size=16)
    counted = evaluate(model, test, batch_size=16, expert_classes=True)
    assert counted.accuracy == plain.accuracy and not plain.expert_label_counts
    tokens = test.attention_mask.sum(1).double()
    by_class = torch.zeros(model.num_labels, dtype=torch.float64).index_add_(0, test.labels, tokens)
    assert set(counted.expert_label_counts) == {layer.name for layer in model.full_layout.layers}
    for counts in counted.expert_label_counts.values():
        assert counts.shape[0] == model.num_labels
        assert torch.allclose(counts.sum(1).double(), by_class, atol=1e-3)


def test_run_records_and_report_carry_the_diagnostics(tmp_path: Path) -> None:
    run_experiment(tiny_config(strategy__name="fedalign"), tmp_path / "run", log=None)
    line = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert line["merge_diagnostics"]["source"] == "expert-weights"
    assert 0.0 <= line["merge_diagnostics"]["tv_mean"] <= 1.0
    assert len(line["class_accuracy"]) == 8 and "own_router_gain_mean" in line
    assert 0.0 <= line["expert_specialisation_mean"] <= 1.0
    assert len(line["expert_specialisation"]) == 2  # the tiny model's two MoE layers
    build_report(tmp_path / "run")
    page = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "## Where accuracy goes" in page and "Global test accuracy per class" in page
    assert (tmp_path / "run" / "report" / "diagnostics.png").exists()
