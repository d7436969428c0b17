"""Pick the spread of MoEfication's fitted router logits by measurement (issue 10).

configs/demo.toml (straight-through gates, top-2): centralised accuracy after 300 steps and,
after one federated round at Dirichlet 0.1, routing entropy and between-client JS, for
logit std 1, 2 and 4 on the sample text. Run: python benchmarks/moefication_router_scale.py
"""

from __future__ import annotations

import torch

from fedalign.config import ExperimentConfig
from fedalign.experiments.bench import backbone_variant, central_accuracy
from fedalign.models import moefy


def main() -> None:
    torch.set_num_threads(1)
    config = ExperimentConfig.from_toml("configs/demo.toml")
    config.run.progress = False
    print("| router logit std | central acc (300 steps) | router grad init | entropy | JS |")
    print("|---|---|---|---|---|")
    prepared = None
    for scale in (1.0, 2.0, 4.0):
        moefy.ROUTER_LOGIT_STD = scale
        accuracy, prepared = central_accuracy(config, "moefication", 2, 300, prepared)
        row = backbone_variant(config, "moefication")
        print(
            f"| {scale} | {accuracy:.3f} | {row['router_grad_init']:.3g} | "
            f"{row['entropy']:.3f} | {row['js']:.3g} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
