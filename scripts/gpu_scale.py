"""Stage 'scale' of the GPU check: one client round of a random-weight MoE of realistic size.

The model is :func:`estimate_memory.check_moe_options`' Qwen3-MoE-shaped classifier (2.24 B
parameters; ``quick``: a small one), built with random weights straight on the device and
given fedalign's MoE view by :func:`fedalign.models.wrap_moe_model`. Its data are synthetic
texts of random words, every one filling ``model.max-length`` tokens. One client runs
fedalign's client round (:func:`fedalign.client.run_client_round`) with the loss terms of
FedAlign-MoE's heaviest client configuration (routing regulariser in its batch-KL form plus
FedProx's proximal term), once per expert kernel of transformers (:data:`IMPLEMENTATIONS`).
Measured:

* tokens per second of the training steps, after ``WARMUP`` steps (CUDA events, so no step
  waits for the GPU to be timed);
* peak GPU memory of the round, beside the computed estimate of ``scripts/estimate_memory.py``
  for the same model and batch;
* the rate of a large bfloat16 matrix product on the same GPU, and the fraction of it the
  training steps reach in model FLOPs (``6 N T`` for ``N`` parameters active per token
  outside the embeddings, plus ``12 L s w`` per token for attention; PaLM's convention,
  which counts the weight gradients of the frozen attention that are not computed).
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import estimate_memory
import torch

from fedalign.client import prepare, run_client_round
from fedalign.config import ExperimentConfig
from fedalign.models import MoEModel, wrap_moe_model
from fedalign.models.tokenizer import tokenizer_for
from fedalign.protocol import LossTermSpec, TrainInstructions

WARMUP = 2
"""Training steps left out of the timing (allocation, kernel selection)."""


def matmul_rate(device: torch.device, quick: bool) -> dict[str, Any]:
    """TFLOP/s of ``n x n @ n x n`` products (bfloat16 on a GPU, float32 on a CPU), the
    mean of ``repeats`` after three warm-ups."""
    n, repeats = (512, 3) if quick or device.type != "cuda" else (8192, 10)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = _timed(device, lambda: [a @ b for _ in range(repeats)])
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "tflops": 2 * n**3 * repeats / seconds / 1e12,
    }


def _timed(device: torch.device, work: Any) -> float:
    if device.type != "cuda":
        started = time.perf_counter()
        work()
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1000


def synthetic_csv(path: Path, rows: int, words: int, seed: int = 0) -> Path:
    """``rows`` texts of ``words`` random lowercase words with random labels of
    :data:`estimate_memory.CHECK_LABELS` classes."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = ["".join(rng.choices(letters, k=rng.randint(3, 8))) for _ in range(2000)]
    lines = ["text,label"]
    for _ in range(rows):
        text = " ".join(rng.choices(vocabulary, k=words))
        lines.append(f"{text},c{rng.randrange(estimate_memory.CHECK_LABELS)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def check_config(device: str, quick: bool, data_path: Path, steps: int) -> ExperimentConfig:
    """The experiment around the round: 2 IID clients, every row of client 0 trains."""
    batch, seq = estimate_memory.check_batch(quick)
    config = ExperimentConfig()
    config.model.name = "gpu-check-qwen3-moe"  # built by the loader below, never loaded
    config.model.max_length = seq
    config.model.trainable = "moe+head"
    config.data.dataset = str(data_path)
    config.data.test_fraction = 0.1
    config.partition.method = "iid"
    config.partition.num_clients = 2
    config.partition.min_client_size = 1
    config.partition.local_test_fraction = 0.0
    config.train.batch_size = batch
    config.train.local_steps = steps
    config.train.lr = 1e-4
    config.strategy.name = "fedalign"
    config.strategy.stats_max_examples = 4 * batch
    config.run.device = device
    config.run.precision = "bf16" if device.startswith("cuda") else "fp32"
    config.run.progress = False
    return config


def _loader(quick: bool) -> Any:
    def load(config: ExperimentConfig, num_labels: int) -> MoEModel:
        import transformers as hf

        options = estimate_memory.check_moe_options(quick)
        hf_config = hf.Qwen3MoeConfig(**options, num_labels=num_labels)
        torch.manual_seed(config.federated.seed)
        with torch.device(config.run.device):  # random weights straight on the device
            bare = hf.AutoModelForSequenceClassification.from_config(hf_config)
        tokenizer = tokenizer_for(config.model, None)  # the MiniLM tokenizer (30,522 ids)
        return wrap_moe_model(
            bare,
            tokenizer,
            "qwen3_moe",
            config.model,
            num_labels,
            device=config.run.device,
            precision=config.run.precision,
        )

    return load


def _instructions(model: MoEModel) -> TrainInstructions:
    """FedAlign-MoE's client terms in a later round: the batch-KL routing regulariser
    toward a uniform global routing, and a proximal term with mu = 0.01."""
    target = {
        layer.name: torch.full((layer.num_experts,), 1.0 / layer.num_experts)
        for layer in model.layout.layers
    }
    alpha = {name: torch.ones_like(p) for name, p in target.items()}
    routing = LossTermSpec(
        "routing-alignment",
        0.1,
        options={"form": "batch-kl"},
        tensors={"target": target, "alpha": alpha},
    )
    return TrainInstructions(loss_terms=[routing, LossTermSpec("proximal", 0.005)])


def active_parameters(model: torch.nn.Module, top_k: int, experts: int) -> int:
    """Parameters a token passes through outside the embeddings: everything but the
    embedding and the routed experts, plus ``top_k / experts`` of the experts."""
    dense = routed = 0
    for name, parameter in model.named_parameters():
        if "embed" in name:
            continue
        if ".experts." in name:
            routed += parameter.numel()
        else:
            dense += parameter.numel()
    return dense + routed * top_k // experts


def _step_events(device: torch.device) -> tuple[list[Any], Any]:
    events: list[Any] = []

    def on_step() -> None:
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            events.append(event)
        else:
            events.append(time.perf_counter())

    return events, on_step


def _elapsed(device: torch.device, events: list[Any]) -> float:
    """Seconds from the end of step ``WARMUP`` to the end of the last step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return float(events[WARMUP - 1].elapsed_time(events[-1])) / 1000
    return float(events[-1] - events[WARMUP - 1])


def one_round(
    prepared: Any, config: ExperimentConfig, global_parameters: dict[str, Any], flops_per_token: int
) -> dict[str, Any]:
    """Client 0's round on the prepared model, timed; peak GPU memory of the round."""
    model, device = prepared.model, prepared.model.device
    batch, seq = config.train.batch_size, config.model.max_length
    events, on_step = _step_events(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    done = run_client_round(
        model, prepared.data, config, 2, 0, global_parameters, _instructions(model),
        on_step=on_step,
    )  # fmt: skip
    round_seconds = time.perf_counter() - started
    seconds = _elapsed(device, events)
    timed_steps = len(events) - WARMUP
    tokens = timed_steps * batch * seq
    result: dict[str, Any] = {
        "steps": int(done.result.metrics["steps"]),
        "timed_steps": timed_steps,
        "step_seconds": seconds / max(timed_steps, 1),
        "tokens_per_second": tokens / seconds if seconds > 0 else float("nan"),
        "model_tflops": tokens * flops_per_token / seconds / 1e12 if seconds > 0 else float("nan"),
        "task_loss": done.result.metrics["task_loss"],
        "round_seconds": round_seconds,
    }
    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return result


IMPLEMENTATIONS = ("grouped_mm", "eager")
"""transformers' expert kernels measured: ``grouped_mm`` (its default where it runs; not
autocast-enabled, so with float32 expert weights it multiplies in float32) and ``eager``
(one ``F.linear`` per expert, which bf16 autocast covers)."""


def scale_round(device_name: str, quick: bool, steps: int = 16) -> dict[str, Any]:
    """One client round of the check's MoE per expert implementation: speed, memory and
    their references (a failing implementation is reported with its error)."""
    device = torch.device(device_name)
    batch, seq = estimate_memory.check_batch(quick)
    with tempfile.TemporaryDirectory() as folder:
        data = synthetic_csv(Path(folder) / "synthetic.csv", 2 * steps * batch + 16, seq)
        config = check_config(device_name, quick, data, steps)
        started = time.perf_counter()
        prepared = prepare(config, include_test=False, model_loader=_loader(quick))
    model = prepared.model
    built = time.perf_counter() - started
    global_parameters = model.trainable_state()
    options = estimate_memory.check_moe_options(quick)
    active = active_parameters(model.model, options["num_experts_per_tok"], options["num_experts"])
    width = options["num_attention_heads"] * options["head_dim"]
    flops_per_token = 6 * active + 12 * options["num_hidden_layers"] * seq * width
    setting = estimate_memory.qwen3_moe_check(quick)
    result: dict[str, Any] = {
        "model": setting.label,
        "parameters": sum(p.numel() for p in model.model.parameters()),
        "trainable": sum(p.numel() for n, p in model.model.named_parameters() if p.requires_grad),
        "estimated_trainable": setting.trainable,
        "active_per_token": active,
        "default_experts_implementation": model.model.config._experts_implementation,
        "precision": config.run.precision,
        "batch": batch,
        "seq": seq,
        "build_seconds": built,
        "estimate_gib": estimate_memory.memory(setting, 4, 2 if device.type == "cuda" else 4),
        "rounds": {},
    }
    for implementation in IMPLEMENTATIONS:
        try:
            model.model.set_experts_implementation(implementation)
            measured = one_round(prepared, config, global_parameters, flops_per_token)
        except Exception as error:  # reported; the other implementation still runs
            measured = {"error": f"{type(error).__name__}: {error}"[:300]}
        result["rounds"][implementation] = measured
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        result["gpu"] = f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB"
        result["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    del prepared, model, global_parameters
    result["matmul"] = matmul_rate(device, quick)
    for measured in result["rounds"].values():
        if "model_tflops" in measured:
            measured["fraction_of_matmul"] = measured["model_tflops"] / result["matmul"]["tflops"]
    return result
