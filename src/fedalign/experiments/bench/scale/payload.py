"""Bytes one client sends and receives per round, per strategy, on a model's real shapes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fedalign.compression import COMPRESSIONS, compress_update
from fedalign.config import ModelConfig
from fedalign.models.loading import load_moe_model
from fedalign.moe.layout import MoELayout
from fedalign.protocol import ClientResult, LayerRoutingStatistics, tensor_bytes
from fedalign.strategies import build_strategy

Tensor = torch.Tensor


PAYLOAD_STRATEGIES = ("fedavg", "fedprox", "fedmoe", "fedalign")


@dataclass
class PayloadBytes:
    """Bytes one client sends and receives in one round (round 2 on: FedAlign's target set)."""

    model: str
    strategy: str
    trainable_values: int
    download_bytes: int  # global trainable parameters + the instructions' tensors
    upload_bytes: int  # trainable parameters + routing statistics when asked for
    statistics_bytes: int
    statistics_share: float  # statistics / upload
    instructions_bytes: int


def statistics_like(layout: MoELayout) -> dict[str, LayerRoutingStatistics]:
    """Zero statistics with the shapes a client of ``layout`` uploads."""
    return {
        layer.name: LayerRoutingStatistics(
            routing_distribution=torch.zeros(layer.num_experts),
            usage=torch.zeros(layer.num_experts),
            margin=torch.zeros(layer.num_experts),
            mean_hidden=torch.zeros(layer.num_experts, layer.hidden_size),
            token_count=torch.zeros(layer.num_experts),
            num_tokens=0,
        )
        for layer in layout.layers
    }


def payload_bytes(
    layout: MoELayout,
    parameters: Mapping[str, Tensor],
    model: str,
    strategies: Sequence[str] = PAYLOAD_STRATEGIES,
) -> list[PayloadBytes]:
    """Per strategy, a client's bytes per round, counted as :mod:`fedalign.client.round` does.

    Download: ``tensor_bytes(global) + tensor_bytes([loss_terms, start_parameters])`` of the
    round-2 instructions (after one aggregation, so FedAlign sends ``p_g`` and ``alpha``);
    upload: ``tensor_bytes(parameters)`` plus the statistics' tensors when the strategy asks
    for them (``to_tensors()``, ``num_tokens`` included).
    """
    statistics = statistics_like(layout)
    stats_bytes = tensor_bytes([s.to_tensors() for s in statistics.values()])
    rows = []
    for name in strategies:
        strategy = build_strategy(name, {}, layout)
        results = []
        for cid in range(2):
            uniform = {
                layer: LayerRoutingStatistics(
                    routing_distribution=torch.full_like(s.usage, 1.0 / s.usage.numel()),
                    usage=torch.full_like(s.usage, 0.25),
                    margin=torch.full_like(s.usage, 0.1),
                    mean_hidden=torch.ones_like(s.mean_hidden),
                    token_count=torch.full_like(s.usage, 10.0),
                    num_tokens=40,
                )
                for layer, s in statistics.items()
            }
            results.append(ClientResult(cid, 10, dict(parameters), uniform))
        first = strategy.configure_train(1, [0, 1], {})[0]
        state = strategy.aggregate(1, parameters, results, {}).state
        instructions = strategy.configure_train(2, [0, 1], state)[0]
        instruction_bytes = tensor_bytes(
            [instructions.loss_terms, instructions.start_parameters or {}]
        )
        upload = tensor_bytes(parameters)
        uploaded_stats = stats_bytes if first.collect_statistics else 0
        rows.append(
            PayloadBytes(
                model=model,
                strategy=name,
                trainable_values=sum(int(t.numel()) for t in parameters.values()),
                download_bytes=tensor_bytes(parameters) + instruction_bytes,
                upload_bytes=upload + uploaded_stats,
                statistics_bytes=uploaded_stats,
                statistics_share=round(uploaded_stats / (upload + uploaded_stats), 5),
                instructions_bytes=instruction_bytes,
            )
        )
    return rows


def model_payload_bytes(model_name: str, num_labels: int = 8) -> list[PayloadBytes]:
    """:func:`payload_bytes` for a model of :func:`fedalign.models.loading.load_moe_model`.

    ``num_labels`` sizes the classifier (8: the default WordNet supersense task).
    """
    model = load_moe_model(ModelConfig(name=model_name), num_labels, seed=0)
    return payload_bytes(model.layout, model.trainable_state(), model_name)


def payload_table(rows: Sequence[PayloadBytes]) -> str:
    """Markdown table of :func:`payload_bytes` rows."""
    header = (
        "| model | strategy | trainable values | download B/client/round | upload B/client/round "
        "| statistics B | statistics share of upload | instruction tensors B |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    return header + "".join(
        f"| {r.model} | {r.strategy} | {r.trainable_values:,} | {r.download_bytes:,} | "
        f"{r.upload_bytes:,} | {r.statistics_bytes:,} | {100 * r.statistics_share:.3f}% | "
        f"{r.instructions_bytes:,} |\n"
        for r in rows
    )


def rows_as_dicts(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """Dataclass rows as plain dictionaries (for JSON)."""
    return [asdict(row) for row in rows]


SCALE_STRATEGIES = ("fedavg", "fedalign")


@dataclass
class CompressedBytes:
    """One (strategy, compression) upload of one client in one round."""

    model: str
    strategy: str
    compression: str
    upload_bytes: int
    vs_float32: float  # upload / the uncompressed upload of the same strategy
    statistics_share: float  # routing statistics / upload


def compressed_bytes(
    model_name: str, topk_fraction: float = 0.1, strategies: Sequence[str] = SCALE_STRATEGIES
) -> list[CompressedBytes]:
    """Upload bytes per strategy and compression, on the model's real tensor shapes.

    The compressed sizes depend on shapes only (bf16: 2 bytes a value; int8: 1 byte a value
    plus 4 a row; int4/int3/int2: 4/3/2 bits a value plus 2 bytes a row; topk: 8 bytes a
    kept value), so a random delta of the model's shapes gives the exact payload size.
    """
    model = load_moe_model(ModelConfig(name=model_name), 8, seed=0)
    parameters = model.trainable_state()
    generator = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(t.shape, generator=generator) for n, t in parameters.items()}
    sizes = {"none": tensor_bytes(parameters)}
    for method in COMPRESSIONS[1:]:
        update, _ = compress_update(delta, method, fraction=topk_fraction)
        sizes[method] = tensor_bytes(update)
    rows = []
    for base in payload_bytes(model.layout, parameters, model_name, strategies):
        for method, size in sizes.items():
            upload = size + base.statistics_bytes
            rows.append(
                CompressedBytes(
                    model=model_name,
                    strategy=base.strategy,
                    compression=method if method != "topk" else f"topk {topk_fraction:g}",
                    upload_bytes=upload,
                    vs_float32=round(upload / base.upload_bytes, 4),
                    statistics_share=round(base.statistics_bytes / upload, 5),
                )
            )
    return rows


def bytes_table(rows: Sequence[CompressedBytes]) -> str:
    lines = [
        "| model | strategy | upload compression | upload B/client/round | vs float32 "
        "| routing statistics share |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.strategy} | {r.compression} | {r.upload_bytes:,} | "
            f"{r.vs_float32:.3f} | {100 * r.statistics_share:.3f}% |"
        )
    return "\n".join(lines)
