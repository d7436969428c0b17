"""``evaluate_global`` on the server's validation set (``data.validation-examples``)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from fedalign.client import prepare
from fedalign.experiments.run import run_experiment
from fedalign.federation import evaluate_global
from fedalign.records import read_jsonl
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_validation_goes_through_the_test_set_code_path() -> None:
    prepared = prepare(tiny_config(data__validation_examples=40))
    data, model = prepared.data, prepared.model
    assert data.validation is not None and len(data.validation) == 40
    parameters = model.trainable_state()
    own = evaluate_global(model, data, parameters)
    assert 0.0 <= own["validation_accuracy"] <= 1.0
    # the test rows given as the validation set score exactly as the test set
    swapped = evaluate_global(model, dataclasses.replace(data, validation=data.test), parameters)
    assert swapped["validation_accuracy"] == swapped["global_accuracy"]
    assert swapped["validation_loss"] == swapped["global_loss"]
    without = evaluate_global(model, dataclasses.replace(data, validation=None), parameters)
    assert "validation_accuracy" not in without
    assert without["global_accuracy"] == own["global_accuracy"]


def test_metrics_and_summary_carry_validation_accuracy(tmp_path: Path) -> None:
    summary = run_experiment(
        tiny_config(data__validation_examples=40, federated__rounds=2), tmp_path / "v", log=None
    )
    lines = read_jsonl(tmp_path / "v" / "metrics.jsonl")
    assert [0.0 <= line["validation_accuracy"] <= 1.0 for line in lines] == [True, True]
    saved = json.loads((tmp_path / "v" / "summary.json").read_text())
    assert saved["final_validation_accuracy"] == lines[-1]["validation_accuracy"]
    assert summary.final_validation_accuracy == lines[-1]["validation_accuracy"]
    assert not math.isnan(saved["final_accuracy"])


def test_default_runs_have_no_validation_keys(tmp_path: Path) -> None:
    run_experiment(tiny_config(federated__rounds=1), tmp_path / "d", log=None)
    line = read_jsonl(tmp_path / "d" / "metrics.jsonl")[0]
    assert "validation_accuracy" not in line
    saved = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert "final_validation_accuracy" not in saved


@pytest.mark.parametrize("min_local_test", [1, 15, 10_000])
def test_local_figures_are_taken_over_the_same_clients(min_local_test: int) -> None:
    """Mean, worst and p10 over one set of clients: p10 lies between the worst and the best of them,
    and the count says how many clients that set holds."""
    prepared = prepare(tiny_config())
    data, model = prepared.data, prepared.model
    result = evaluate_global(model, data, model.trainable_state(), min_local_test=min_local_test)
    sizes = {c: len(rows) for c, rows in data.client_test.items() if len(rows) > 0}
    sized = [c for c, n in sizes.items() if n >= min_local_test]
    assert result["local_clients_with_test"] == len(sizes)
    assert result["local_clients_evaluated"] == (len(sized) or len(sizes))
    counted = [
        acc for c, acc in zip(sorted(sizes), result["local_accuracy"]) if not sized or c in sized
    ]
    assert result["mean_local_accuracy"] == pytest.approx(sum(counted) / len(counted))
    assert result["worst_local_accuracy"] == min(counted)
    if sized:
        assert result["worst_local_accuracy"] <= result["local_accuracy_p10"]
        assert result["local_accuracy_p10"] <= max(counted)
    else:
        assert result["local_accuracy_p10"] is None
