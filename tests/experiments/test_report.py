"""``fedalign report``: figures and page from a run folder in the documented record format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedalign.cli import main
from fedalign.config import ConfigError
from fedalign.experiments.report import (
    RunRecords,
    build_report,
    build_reports,
    default_expert,
    load_run,
    masked_inactive,
    mean_offdiagonal,
    merge_matrix,
    merge_weights,
    select_layers,
)

LAYERS = ("encoder.encoder.layer.4.intermediate", "encoder.encoder.layer.5.intermediate")
EXPERTS = 4
CLIENTS = [0, 1, 2]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _routing_line(server_round: int, rng: np.random.Generator) -> dict[str, Any]:
    layers = {}
    for _ in LAYERS:
        distribution = rng.dirichlet(np.ones(EXPERTS), size=len(CLIENTS))
        usage = np.clip(2 * distribution, 0, 1)
        directions = rng.normal(size=(EXPERTS, len(CLIENTS), 5))
        directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
        similarity = np.einsum("ech,edh->ecd", directions, directions)
        similarity[1, 2, :] = similarity[1, :, 2] = 0.0  # client 2 routed nothing to expert 1
        layers[_] = {
            "usage": usage.tolist(),
            "routing_distribution": distribution.tolist(),
            "semantic_similarity": similarity.tolist(),
        }
    return {"round": server_round, "clients": CLIENTS, "layers": layers}


def _metrics_line(server_round: int) -> dict[str, Any]:
    return {
        "round": server_round,
        "clients": CLIENTS,
        "train_loss": 1.0 / server_round,
        "global_accuracy": 0.3 + 0.1 * server_round,
        "global_loss": 1.0,
        "mean_local_accuracy": 0.25 + 0.1 * server_round,
        "worst_local_accuracy": 0.1 * server_round,
        "local_accuracy": [0.2, 0.3, 0.4],
        "routing_divergence": {
            layer: {"mean_js": 0.01 * server_round, "max_js": 0.02, "num_clients": 3}
            for layer in LAYERS
        },
        "semantic_dispersion": {
            layer: {"mean_dispersion": 0.1 / server_round, "per_expert": [0.1] * EXPERTS}
            for layer in LAYERS
        },
        "seconds": 1.0,
    }


def _fedalign_decision(server_round: int) -> dict[str, Any]:
    experts = []
    for expert in range(EXPERTS):
        record: dict[str, Any] = {
            "expert": expert,
            "omega": {"0": 0.3, "1": 0.3, "2": 0.4},
            "active": CLIENTS,
            "aligned": [0, 1],
            "aggregation_weights": {"0": 0.25, "1": 0.75},
            "fallback": None,
        }
        if expert == 3:
            record.update(active=[], aligned=None, aggregation_weights=None)
            record["fallback"] = "no-active-client"
        experts.append(record)
    return {
        "round": server_round,
        "strategy": "fedalign",
        "clients": CLIENTS,
        "example_weights": {"0": 0.2, "1": 0.3, "2": 0.5},
        "layers": {
            layer: {"global_routing": [0.4, 0.3, 0.2, 0.1], "experts": experts} for layer in LAYERS
        },
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rounds = 3
    _write_jsonl(folder / "metrics.jsonl", [_metrics_line(r) for r in range(1, rounds + 1)])
    _write_jsonl(folder / "decisions.jsonl", [_fedalign_decision(r) for r in range(1, rounds + 1)])
    _write_jsonl(folder / "routing.jsonl", [_routing_line(r, rng) for r in range(rounds + 1)])
    (folder / "summary.json").write_text(
        json.dumps({"strategy": "fedalign", "rounds": rounds, "final_accuracy": 0.6})
    )
    (folder / "config.toml").write_text(
        '[strategy]\nname = "fedalign"\n\n[partition]\nnum-clients = 3\nalpha = 0.1\n'
    )
    return folder


def test_report_writes_page_and_valid_pngs(run_dir: Path, assert_png: Any) -> None:
    page = build_report(run_dir)
    assert page == run_dir / "report" / "index.html"
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    expected = ["accuracy.png", "divergence.png"]
    for tag in ("moe0", "moe1"):
        expected += [
            f"usage_{tag}.png",
            f"routing_{tag}.png",
            f"similarity_{tag}.png",
            f"similarity_all_{tag}.png",
            f"merges_{tag}.png",
        ]
    for name in expected:
        assert_png(run_dir / "report" / name)
        assert f'src="{name}"' in text
    assert (run_dir / "report" / "report.md").read_text().count("![") == len(expected)


def test_report_layer_and_expert_options(run_dir: Path) -> None:
    assert main(["report", str(run_dir), "--layer", "layer.5", "--expert", "2"]) == 0
    report = run_dir / "report"
    assert (report / "usage_moe1.png").exists()
    assert not (report / "usage_moe0.png").exists()
    assert "expert 2" in (report / "index.html").read_text()
    with pytest.raises(ConfigError, match="out of range"):
        build_report(run_dir, expert=9)


def test_report_bad_folder_gives_clear_error(tmp_path: Path, capsys: Any) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a run folder"):
        build_report(tmp_path / "empty")


def test_report_without_routing_file_still_draws_curves(run_dir: Path, assert_png: Any) -> None:
    (run_dir / "routing.jsonl").unlink()
    page = build_report(run_dir)
    assert_png(run_dir / "report" / "accuracy.png")
    assert_png(run_dir / "report" / "merges_moe0.png")
    assert "no routing.jsonl" in page.read_text()


def test_folder_of_runs_gets_an_index(run_dir: Path) -> None:
    parent = run_dir.parent
    second = parent / "other"
    second.mkdir()
    for name in ("metrics.jsonl", "decisions.jsonl", "config.toml"):
        (second / name).write_bytes((run_dir / name).read_bytes())
    index = build_reports(parent, layer="0", log=lambda _m: None)
    assert index == parent / "report" / "index.html"
    text = index.read_text()
    assert "../run/report/index.html" in text and "../other/report/index.html" in text


def test_merge_weights_per_strategy_record() -> None:
    decision = _fedalign_decision(1)
    weights, rule = merge_weights(decision, LAYERS[0], 0)
    assert rule == "semantic" and weights == {0: 0.25, 1: 0.75, 2: 0.0}
    weights, rule = merge_weights(decision, LAYERS[0], 3)
    assert rule == "kept" and weights == {0: 0.0, 1: 0.0, 2: 0.0}
    fedmoe = {
        "round": 1,
        "clients": [0, 1],
        "example_weights": {"0": 0.5, "1": 0.5},
        "layers": {"L": {"experts": [{"expert": 0, "qualified": [1], "weights": {"1": 1.0}}]}},
    }
    assert merge_weights(fedmoe, "L", 0) == ({0: 0.0, 1: 1.0}, "qualified")
    fedavg = {"round": 1, "clients": [0, 1], "example_weights": {"0": 0.4, "1": 0.6}}
    assert merge_weights(fedavg, "L", 0) == ({0: 0.4, 1: 0.6}, "fedavg")
    # a client not selected in a round is NaN in the matrix
    rounds, matrix, rules = merge_matrix([fedavg], "L", 0, [0, 1, 2])
    assert rounds == [1] and rules == {"fedavg"}
    assert matrix[0, :2].tolist() == [0.4, 0.6] and np.isnan(matrix[0, 2])


def test_default_expert_and_layer_selection() -> None:
    similarity = np.ones((3, 2, 2))
    similarity[2, 0, 1] = similarity[2, 1, 0] = -0.5
    assert default_expert(similarity) == 2
    # a client that routed no token to the expert (all zeros, diagonal too) is left out
    matrix = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert mean_offdiagonal(matrix) == pytest.approx(0.5)
    shown = masked_inactive(matrix)
    assert np.isnan(shown[2]).all() and np.isnan(shown[:, 2]).all() and shown[0, 1] == 0.5
    assert np.isnan(mean_offdiagonal(np.eye(1)))
    assert select_layers(list(LAYERS), "1") == [(1, LAYERS[1])]
    assert select_layers(list(LAYERS), "layer.4") == [(0, LAYERS[0])]
    with pytest.raises(ConfigError, match="matches 2"):
        select_layers(list(LAYERS), "intermediate")


def test_summary_rows_report_the_final_round_and_p10(run_dir: Path) -> None:
    from fedalign.experiments.report.page import summary_rows

    (run_dir / "summary.json").write_text(
        json.dumps({"strategy": "fedalign", "final_accuracy": 0.6, "best_accuracy": 0.9})
    )
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    last.update(local_accuracy_p10=0.25, local_clients_evaluated=3)
    (run_dir / "metrics.jsonl").write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    rows = dict(summary_rows(load_run(run_dir)))
    assert "best accuracy" not in rows  # no model selection on the test set
    assert rows["final accuracy"] == "0.6000"
    assert rows["local accuracy p10"] == "0.2500" and rows["local clients evaluated"] == "3"


def test_strategy_label_from_config_is_the_run_label(tmp_path: Path) -> None:
    config = {"strategy": {"name": "fedalign", "ablation": "consistency"}}
    records = RunRecords(tmp_path, [], [], [], None, config)
    assert records.strategy == "fedalign-consistency"
