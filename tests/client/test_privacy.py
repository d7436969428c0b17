"""What leaves a client in each ``strategy.semantic-privacy`` mode (docs/privacy.md)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedalign.client import client_seed, prepare, run_client_round
from fedalign.client.statistics import compute_routing_statistics
from fedalign.flower.messages import decode_reply, encode_reply
from fedalign.protocol import TrainInstructions
from fedalign.routing import (
    clip_and_noise_rows,
    gaussian_delta,
    gaussian_dp_mu,
    gaussian_epsilon,
)
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STATISTICS_KEYS = {
    "routing_distribution",
    "usage",
    "margin",
    "mean_hidden",
    "token_count",
    "num_tokens",
}
CLIP_NOISE_METRICS = {
    "semantic_clip",
    "semantic_noise_std",
    "semantic_mu",
    "semantic_epsilon",
    "semantic_delta",
}


@pytest.fixture(scope="module")
def prepared() -> Any:
    return prepare(tiny_config(strategy__name="fedalign"))


def client_upload(prepared: Any, **overrides: object) -> Any:
    config = tiny_config(strategy__name="fedalign", **overrides)
    model = prepared.model
    return run_client_round(
        model,
        prepared.data,
        config,
        1,
        0,
        model.trainable_state(),
        TrainInstructions(collect_statistics=True),
    )


@pytest.mark.parametrize(
    ("mode", "width_is_hidden", "extra_metrics"),
    [
        ("none", True, set()),
        ("clip-noise", True, CLIP_NOISE_METRICS),
        ("public-probe", False, {"semantic_hidden_width"}),
    ],
)
def test_exact_keys_and_shapes_sent_in_each_mode(
    prepared: Any, mode: str, width_is_hidden: bool, extra_metrics: set[str]
) -> None:
    done = client_upload(prepared, strategy__semantic_privacy=mode)
    layout = prepared.model.full_layout
    clean = client_upload(prepared)
    assert set(done.result.metrics) - set(clean.result.metrics) == extra_metrics
    decoded = decode_reply(encode_reply(done.result, bytes_received=done.bytes_received)).result
    for result in (done.result, decoded):
        assert list(result.routing_statistics) == [layer.name for layer in layout.layers]
        for layer in layout.layers:
            tensors = result.routing_statistics[layer.name].to_tensors()
            assert set(tensors) == STATISTICS_KEYS
            experts = layer.num_experts
            for key in ("routing_distribution", "usage", "margin", "token_count"):
                assert tuple(tensors[key].shape) == (experts,)
            width = layer.hidden_size if width_is_hidden else 0
            assert tuple(tensors["mean_hidden"].shape) == (experts, width)
            assert tensors["num_tokens"].shape == ()
    assert decoded.metrics == pytest.approx(done.result.metrics)
    # the upload shrinks by exactly the hidden-state summaries in public-probe mode
    hidden_bytes = sum(4 * layer.num_experts * layer.hidden_size for layer in layout.layers)
    assert clean.bytes_received - done.bytes_received == (0 if width_is_hidden else hidden_bytes)


def test_clip_noise_has_the_recorded_scale(prepared: Any) -> None:
    """Residual of the noised rows around the clipped true rows: mean 0, std sigma * C."""
    model, data = prepared.model, prepared.data
    rows = data.client_rows(0)
    seed = client_seed(0, 1, 0)
    clip, sigma = 0.5, 0.3
    true = compute_routing_statistics(model, rows, max_examples=32, seed=seed)
    noised = compute_routing_statistics(
        model,
        rows,
        max_examples=32,
        seed=seed,
        semantic_privacy="clip-noise",
        semantic_clip=clip,
        semantic_noise_multiplier=sigma,
    )
    residuals = []
    for name, stats in true.items():
        clipped, _ = clip_and_noise_rows(stats.mean_hidden, clip, 0.0)
        assert bool((clipped.norm(dim=-1) <= clip + 1e-5).all())
        residuals.append((noised[name].mean_hidden - clipped).flatten())
    residual = torch.cat(residuals)
    n = residual.numel()
    assert n >= 256
    # the sample std of n normal values has relative sd about 1 / sqrt(2 n)
    assert abs(float(residual.std()) / (sigma * clip) - 1) < 4 / math.sqrt(2 * n)
    assert abs(float(residual.mean())) < 4 * sigma * clip / math.sqrt(n)
    done = client_upload(
        prepared,
        strategy__semantic_privacy="clip-noise",
        strategy__semantic_clip=clip,
        strategy__semantic_noise_multiplier=sigma,
    )
    assert done.result.metrics["semantic_noise_std"] == pytest.approx(sigma * clip)
    assert done.result.metrics["semantic_clip"] == clip


def test_clip_and_noise_rows_clips_absolutely_and_noises_every_row() -> None:
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])  # norms 5, 0.5, 0
    clipped, count = clip_and_noise_rows(rows, 1.0, 0.0)
    assert count == 1
    assert torch.allclose(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))
    generator = torch.Generator().manual_seed(0)
    noised, _ = clip_and_noise_rows(torch.zeros(4000, 8), 2.0, 0.5, generator)
    assert float(noised.std()) == pytest.approx(1.0, rel=0.02)  # sigma * C = 1
    assert bool((noised != 0).all())  # zero rows (experts without tokens) are noised too
    with pytest.raises(ValueError, match="clip"):
        clip_and_noise_rows(rows, 0.0, 1.0)


def test_gaussian_epsilon_inverts_delta_and_beats_the_classic_bound() -> None:
    assert gaussian_dp_mu(16, 1.0) == 8.0
    assert math.isinf(gaussian_dp_mu(16, 0.0))
    for mu in (0.2, 1.0, 3.0, 8.0):
        epsilon = gaussian_epsilon(mu, 1e-5)
        assert gaussian_delta(mu, epsilon) <= 1e-5 * (1 + 1e-6)
        assert gaussian_delta(mu, epsilon * 0.999) > 1e-5
    # the classic mechanism: sigma = sqrt(2 ln(1.25 / delta)) / epsilon gives (1, delta)-DP
    delta = 1e-5
    mu_classic = 1.0 / math.sqrt(2 * math.log(1.25 / delta))
    assert gaussian_epsilon(mu_classic, delta) <= 1.0
    # epsilon grows with mu
    values = [gaussian_epsilon(mu, delta) for mu in (0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] > 0
