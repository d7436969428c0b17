"""Pick MoEfication's top-k, gating and load-balancing default by measurement (issue 10).

For each variant on configs/demo.toml: centralised test accuracy after 300 steps on the
pooled training data, and after one federated round (Dirichlet 0.1) the router gradient
norm, the per-token routing entropy and the between-client JS of routing distributions.
Run: python benchmarks/moefication_gating.py
"""

from __future__ import annotations

import torch

from fedalign.config import ExperimentConfig
from fedalign.experiments.bench import backbone_variant, central_accuracy

VARIANTS = (
    ("straight-through", 2, 0.0),
    ("scaled", 2, 0.0),
    ("renormalize", 2, 0.0),
    ("straight-through", 1, 0.0),
    ("straight-through", 4, 0.0),
    ("straight-through", 2, 0.01),
)


def main() -> None:
    torch.set_num_threads(1)
    base = ExperimentConfig.from_toml("configs/demo.toml")
    base.run.progress = False
    print(
        "| gating | top-k | load-balance coef | central acc (300 steps) | router grad init "
        "| router grad round 1 | entropy | JS | round s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    prepared = None
    for gating, top_k, balance in VARIANTS:
        config = base.copy()
        config.model.gating = gating
        config.model.top_k = top_k
        config.model.load_balance_coef = balance
        accuracy, prepared = central_accuracy(config, "moefication", top_k, 300, prepared)
        row = backbone_variant(config, "moefication")
        print(
            f"| {gating} | {top_k} | {balance} | {accuracy:.3f} | {row['router_grad_init']:.3g} "
            f"| {row['router_grad_round1']:.3g} | {row['entropy']:.3f} | {row['js']:.3g} "
            f"| {row['round_s']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
