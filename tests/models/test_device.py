"""run.device and run.precision: names, resolution on this machine, placement of results."""

from __future__ import annotations

import math
import os

import pytest
import torch

from fedalign.client import prepare, run_client_round
from fedalign.config import ConfigError, ExperimentConfig
from fedalign.models import resolve_device, resolve_precision, set_deterministic
from fedalign.protocol import TrainInstructions
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_is_the_default_and_explicit_cpu_is_cpu() -> None:
    assert ExperimentConfig().run.device == "cpu"
    assert ExperimentConfig().run.precision == "fp32"
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_without_a_gpu_is_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) is None


def test_missing_gpu_is_a_named_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"run.device 'cuda:1' is not available \(visible GPUs"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match=r"run\.device 'cuda' is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CUDA", "cuda:-1", "mps"])
def test_malformed_device_names(name: str) -> None:
    config = ExperimentConfig()
    config.set("run.device", name)
    with pytest.raises(ConfigError, match=r"run.device must be one of \['cpu', 'auto', 'cuda'"):
        config.validate()


def test_precision_names_and_support(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16  # CPU autocast has bfloat16
    config = ExperimentConfig()
    config.set("run.precision", "fp16")
    with pytest.raises(ConfigError, match=r"run.precision must be one of \['fp32', 'bf16'"):
        config.validate()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ConfigError, match=r"run\.precision 'bf16' is not supported on cuda"):
        resolve_precision("bf16", torch.device("cuda"))
    assert resolve_precision("auto", torch.device("cuda")) is None


def _one_round(config: ExperimentConfig) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    prepared = prepare(config)
    model = prepared.model
    done = run_client_round(
        model,
        prepared.data,
        config,
        1,
        0,
        model.trainable_state(),
        TrainInstructions(collect_statistics=True),
    )
    assert all(t.device.type == "cpu" for t in done.result.parameters.values())
    for stats in done.result.routing_statistics.values():
        assert stats.mean_hidden.device.type == "cpu"
    if done.optimizer_state is not None:
        for state in done.optimizer_state["state"].values():
            assert all(v.device.type == "cpu" for v in state.values() if torch.is_tensor(v))
    return done.result.parameters, done.result.metrics


def test_bf16_autocast_on_cpu_trains_and_returns_float32_cpu_tensors() -> None:
    config = tiny_config(run__precision="bf16", train__keep_optimizer_state=True)
    parameters, metrics = _one_round(config)
    assert all(t.dtype == torch.float32 for t in parameters.values())
    assert math.isfinite(metrics["task_loss"])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dataset", ["wordnet-supersense", "mmlu"])
def test_cuda_bf16_round_matches_the_contract(dataset: str) -> None:
    config = tiny_config(run__device="cuda", run__precision="bf16")
    config.train.keep_optimizer_state = True
    if dataset == "mmlu":
        config.model.name = "tiny-qwen3moe"
        config.data.dataset, config.data.path = "mmlu", "sample"
        config.data.max_train_examples = config.data.max_test_examples = 0
        config.data.test_fraction = 0.25
        config.partition.min_client_size = 4
        config.model.max_length = 48
    parameters, metrics = _one_round(config)
    assert all(t.dtype == torch.float32 for t in parameters.values())
    assert math.isfinite(metrics["task_loss"])


@pytest.mark.gpu
@needs_cuda
def test_auto_picks_the_gpu() -> None:
    assert resolve_device("auto").type == "cuda"


def test_frozen_bf16_needs_autocast() -> None:
    config = tiny_config(run__frozen_dtype="bf16")
    with pytest.raises(ConfigError, match=r"run\.frozen-dtype 'bf16' needs bfloat16 autocast"):
        config.validate()
    config.run.frozen_dtype = "fp16"
    config.run.precision = "bf16"
    with pytest.raises(ConfigError, match=r"run.frozen-dtype must be one of \['fp32', 'bf16'\]"):
        config.validate()


@pytest.mark.parametrize("name", ["tiny-upcycled", "tiny-qwen3moe"])
def test_frozen_bf16_halves_the_frozen_weights_only(name: str) -> None:
    config = tiny_config(model__name=name, run__precision="bf16", run__frozen_dtype="bf16")
    prepared = prepare(config)
    params = dict(prepared.model.model.named_parameters())
    trainable = set(prepared.model.trainable_names)
    assert all(params[n].dtype == torch.float32 for n in trainable)
    frozen = {n: p.dtype for n, p in params.items() if n not in trainable}
    assert torch.bfloat16 in frozen.values()
    # normalisation weights stay float32
    assert all(dtype == torch.float32 for n, dtype in frozen.items() if "norm" in n.lower())
    parameters, metrics = _one_round(config)
    assert all(t.dtype == torch.float32 for t in parameters.values())
    assert math.isfinite(metrics["task_loss"])


def test_deterministic_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    set_deterministic(False)
    assert torch.are_deterministic_algorithms_enabled() == before
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before)
