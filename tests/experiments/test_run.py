"""The simulator: determinism, the per-client memory rule, prefix caching, bytes, resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from fedalign.client import CallableTerm, client_seed, load_model
from fedalign.config import ExperimentConfig
from fedalign.experiments.run import Simulation, run_experiment
from fedalign.federation import sample_clients
from fedalign.models import MoEModel
from fedalign.protocol import tensor_bytes
from fedalign.records import read_jsonl
from tests.helpers import tiny_config


def final_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "final_state.safetensors"))


def test_same_seed_same_numbers_twice(tmp_path: Path) -> None:
    """Two runs with one seed give identical metrics and bitwise identical final states."""
    config = tiny_config(strategy__name="fedalign")
    first = run_experiment(config.copy(), tmp_path / "a", log=None)
    second = run_experiment(config.copy(), tmp_path / "b", log=None)
    assert first.accuracy_curve == second.accuracy_curve
    assert first.final_loss == second.final_loss
    state_a, state_b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    decisions_a = read_jsonl(tmp_path / "a" / "decisions.jsonl")
    decisions_b = read_jsonl(tmp_path / "b" / "decisions.jsonl")
    assert decisions_a == decisions_b


def test_a_model_loader_builds_the_model_and_changes_nothing(tmp_path: Path) -> None:
    """``run_experiment(model_loader=...)`` builds the model with it (a cached copy of the
    default loader's model gives bitwise the same run: benchmarks/robustness.py does that)."""
    calls: list[int] = []
    cached: dict[int, MoEModel] = {}

    def loader(config: ExperimentConfig, num_labels: int) -> MoEModel:
        calls.append(num_labels)
        if num_labels not in cached:
            cached[num_labels] = load_model(config, num_labels)
        return copy.deepcopy(cached[num_labels])

    config = tiny_config(federated__rounds=1)
    run_experiment(config.copy(), tmp_path / "default", log=None)
    run_experiment(config.copy(), tmp_path / "loaded", log=None, model_loader=loader)
    assert len(calls) == 1
    state_a, state_b = final_state(tmp_path / "default"), final_state(tmp_path / "loaded")
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_different_seed_different_numbers(tmp_path: Path) -> None:
    first = run_experiment(tiny_config(federated__rounds=1), tmp_path / "a", log=None)
    second = run_experiment(
        tiny_config(federated__rounds=1, federated__seed=1), tmp_path / "b", log=None
    )
    state_a, state_b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert first.final_loss != second.final_loss
    assert any(not torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.mark.slow
def test_prefix_cache_gives_the_same_numbers(tmp_path: Path) -> None:
    """Caching the frozen prefix once equals recomputing it every step."""
    cached = Simulation(tiny_config(federated__rounds=1), tmp_path / "cached", log=None)
    fresh = Simulation(
        tiny_config(federated__rounds=1, model__cache_prefix=False), tmp_path / "fresh", log=None
    )
    assert cached.data.prefix_cached and cached.data.train.prefix_hidden is not None
    assert not fresh.data.prefix_cached and fresh.data.train.prefix_hidden is None
    cached_summary = cached.run()
    fresh_summary = fresh.run()
    a, b = final_state(tmp_path / "cached"), final_state(tmp_path / "fresh")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)
    assert cached_summary.final_accuracy == fresh_summary.final_accuracy
    assert cached_summary.final_loss == pytest.approx(fresh_summary.final_loss, abs=1e-5)


@pytest.mark.slow
def test_memory_grows_only_by_kept_client_state(tmp_path: Path) -> None:
    """No optimizer state kept: nothing per client. Kept: exactly AdamW's two moments."""
    plain = Simulation(tiny_config(federated__rounds=1), tmp_path / "plain", log=None)
    plain.run()
    assert plain.simulator.client_state_bytes() == 0
    kept = Simulation(
        tiny_config(federated__rounds=1, train__keep_optimizer_state=True),
        tmp_path / "kept",
        log=None,
    )
    kept.run()
    trainable_bytes = tensor_bytes(kept.global_parameters)
    per_client = [tensor_bytes(s) for s in kept.simulator.optimizer_states.values()]
    assert len(per_client) == 3
    expert_bytes = tensor_bytes(
        {n: v for n, v in kept.global_parameters.items() if ".experts." in n}
    )
    for size in per_client:
        # exp_avg and exp_avg_sq (one copy of the trainable parameters each) + step scalars;
        # with MoEfied experts a client's routing can leave an expert without any token, and
        # AdamW keeps no moments for a parameter that never had a gradient
        assert 2 * (trainable_bytes - expert_bytes) <= size <= 2 * trainable_bytes + 8 * 1024
    assert kept.simulator.client_state_bytes() == sum(per_client)
    # the model itself is held once: its parameters are not multiplied by the clients
    model_bytes = tensor_bytes(dict(kept.model.model.named_parameters()))
    assert kept.simulator.client_state_bytes() < 3 * model_bytes


def test_bytes_counted_per_client_and_round(tmp_path: Path) -> None:
    sim = Simulation(
        tiny_config(federated__rounds=1, strategy__name="fedavg"), tmp_path / "run", log=None
    )
    sim.run()
    line = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    trainable_bytes = tensor_bytes(sim.global_parameters)
    for counts in line["bytes_per_client"].values():
        # FedAvg: the parameters go down and come back, nothing else
        assert counts == {"sent": trainable_bytes, "received": trainable_bytes}
    assert line["bytes_received"] == 3 * trainable_bytes
    aligned = Simulation(
        tiny_config(federated__rounds=1, strategy__name="fedalign"), tmp_path / "al", log=None
    )
    aligned.run()
    aligned_line = read_jsonl(tmp_path / "al" / "metrics.jsonl")[0]
    for counts in aligned_line["bytes_per_client"].values():
        # routing statistics ride along the update
        assert counts["received"] > trainable_bytes


@pytest.mark.slow
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    config = tiny_config(federated__rounds=3, strategy__name="fedalign")
    run_experiment(config.copy(), tmp_path / "whole", log=None)
    partial = Simulation(config.copy(), tmp_path / "crashed", log=None)
    partial.run_round(1)
    partial.run_round(2)
    # the process dies here; a new one resumes from the checkpoint
    del partial
    resumed = Simulation(config.copy(), tmp_path / "crashed", resume=True, log=None)
    assert resumed.completed_rounds == 2
    resumed.run()
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "crashed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rounds = [row["round"] for row in read_jsonl(tmp_path / "crashed" / "metrics.jsonl")]
    assert rounds == [1, 2, 3]


@pytest.mark.slow
def test_run_folder_contents(tmp_path: Path) -> None:
    summary = run_experiment(tiny_config(strategy__name="fedalign"), tmp_path / "run", log=None)
    folder = tmp_path / "run"
    for name in (
        "config.toml",
        "metrics.jsonl",
        "decisions.jsonl",
        "routing.jsonl",
        "summary.json",
        "final_state.safetensors",
        "partition.md",
        "partition.csv",
        "convergence.png",
    ):
        assert (folder / name).exists(), name
    assert (folder / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        ExperimentConfig.from_toml(folder / "config.toml").to_dict()
        == tiny_config(strategy__name="fedalign").to_dict()
    )
    metrics = read_jsonl(folder / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2]
    for key in ("global_accuracy", "mean_local_accuracy", "worst_local_accuracy", "seconds"):
        assert metrics[-1][key] is not None
    assert metrics[-1]["routing_divergence"]
    routing = read_jsonl(folder / "routing.jsonl")
    assert [r["round"] for r in routing] == [0, 1, 2]
    decisions = read_jsonl(folder / "decisions.jsonl")
    layer = next(iter(decisions[-1]["layers"].values()))
    assert len(layer["experts"]) == 8 and "aligned" in layer["experts"][0]
    stored = json.loads((folder / "summary.json").read_text())
    assert stored["final_accuracy"] == summary.final_accuracy


def test_client_sampling_is_seeded_and_sized() -> None:
    assert sample_clients(0, 1, 10, 1.0) == list(range(10))
    picked = sample_clients(0, 3, 10, 0.3)
    assert len(picked) == 3 and picked == sample_clients(0, 3, 10, 0.3)
    assert sample_clients(0, 1, 10, 0.01) != [] and len(sample_clients(0, 1, 10, 0.01)) == 1
    assert client_seed(0, 1, 2) == client_seed(0, 1, 2) != client_seed(0, 2, 2)


@pytest.mark.slow
def test_extra_loss_hook_reaches_the_client_loss(tmp_path: Path) -> None:
    """A user-supplied loss term on the captured router logits is trained against."""
    calls: list[int] = []

    def router_entropy_bonus(model: MoEModel, captured: dict) -> torch.Tensor:  # type: ignore[type-arg]
        calls.append(len(captured))
        logits = next(iter(captured.values()))[0]
        probs = logits.softmax(dim=-1)
        return 5.0 * (probs * probs.clamp_min(1e-9).log()).sum(dim=-1).mean()

    plain = Simulation(tiny_config(federated__rounds=1), tmp_path / "plain", log=None)
    plain.run()
    hooked = Simulation(tiny_config(federated__rounds=1), tmp_path / "hooked", log=None)
    hooked.simulator.extra_terms.append(CallableTerm(router_entropy_bonus))
    hooked.run()
    # called once per local step of every client, with both MoE layers captured
    assert len(calls) == 3 * 3 and set(calls) == {2}
    a, b = final_state(tmp_path / "plain"), final_state(tmp_path / "hooked")
    router = next(name for name in a if name.endswith("router.weight"))
    assert not torch.equal(a[router], b[router])


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["int8", "int3", "topk"])
def test_compressed_uploads_bytes_and_kept_residuals(tmp_path: Path, compression: str) -> None:
    """The upload is the compressed payload's real size; each client keeps one residual."""
    sim = Simulation(
        tiny_config(
            federated__rounds=1,
            strategy__name="fedavg",
            federated__upload_compression=compression,
            federated__topk_fraction=0.25,
        ),
        tmp_path / "run",
        log=None,
    )
    sim.run()
    line = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    parameters = sim.global_parameters
    values = sum(t.numel() for t in parameters.values())
    rows = sum(t.numel() // t.shape[-1] if t.dim() >= 2 else 1 for t in parameters.values())
    if compression == "int8":
        expected = values + 4 * rows
    elif compression == "int3":  # 3 bits a value, packed per tensor, and a bfloat16 scale a row
        expected = sum((3 * t.numel() + 7) // 8 for t in parameters.values()) + 2 * rows
    else:
        expected = 8 * sum(max(1, round(0.25 * t.numel())) for t in parameters.values())
    for counts in line["bytes_per_client"].values():
        assert counts["received"] == expected < tensor_bytes(parameters)
    assert sorted(sim.simulator.residuals) == [0, 1, 2]
    assert sim.simulator.client_state_bytes() == 3 * tensor_bytes(parameters)
    assert line["rejected_clients"] == {}


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["topk", "int3"])
def test_resume_with_error_feedback_matches_an_uninterrupted_run(
    tmp_path: Path, compression: str
) -> None:
    config = tiny_config(
        federated__rounds=3, strategy__name="fedalign", federated__upload_compression=compression
    )
    whole = Simulation(config.copy(), tmp_path / "whole", log=None)
    whole.run()
    partial = Simulation(config.copy(), tmp_path / "crashed", log=None)
    partial.run_round(1)
    partial.run_round(2)
    del partial
    resumed = Simulation(config.copy(), tmp_path / "crashed", resume=True, log=None)
    assert resumed.completed_rounds == 2 and sorted(resumed.simulator.residuals) == [0, 1, 2]
    resumed.run()
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "crashed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for client, residual in whole.simulator.residuals.items():
        kept = resumed.simulator.residuals[client]
        assert all(torch.equal(residual[k], kept[k]) for k in residual)
    # error feedback changed the numbers: without it the final state differs
    plain = tiny_config(
        federated__rounds=3,
        strategy__name="fedalign",
        federated__upload_compression=compression,
        federated__error_feedback=False,
    )
    run_experiment(plain, tmp_path / "plain", log=None)
    c = final_state(tmp_path / "plain")
    assert any(not torch.equal(a[k], c[k]) for k in a)
