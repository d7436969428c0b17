"""Screen: drift control scaled by usage, on top of FedProx's proximal term (validation only).

Under label skew a client barely routes to some experts and holds no examples of some
classes, yet AdamW moves those parameters at full speed. The term screened here adds, to
FedProx's ``mu/2 ||w - w_global||^2``, an anchor ``mu/2 (w_r - 1) ||w_r - w_global,r||^2``
per row ``r`` of the expert tensors, the router rows and the classifier rows, with
``w_r = clip(1 / (K share_r), 1, cap)``: ``share_r`` the client's running share of top-k
selections of expert ``r`` (or of its examples of class ``r``) this round, ``K`` the number
of experts (classes). Parts used at least uniformly keep FedProx's ``mu``; a part never
used is held ``cap`` times harder.

The script reruns a finished benchmark run's configuration (its ``config.toml``) with the
anchor added as an extra loss term and prints the final validation accuracy next to the
original run's, paired by seed (same partition, initial model and client seeds):

    python benchmarks/screen_usage_anchor.py --cap 100 --out runs/screen-anchor \
        benchmarks/results/screen-merge/runs/alpha0.1/seed{0,1}/fedprox \
        benchmarks/results/screen-merge-verbs/runs/alpha0.1/seed{0,1}/fedprox

It is a screen (2 seeds, validation accuracy), not a claim; nothing is read off the test set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fedalign.client.losses import LossTerm, StepContext
from fedalign.config import ExperimentConfig
from fedalign.experiments.run import Simulation

Tensor = torch.Tensor


def anchor_weights(counts: Tensor, cap: float) -> Tensor:
    """``clip(1 / (K share), 1, cap)`` per entry of ``counts`` (``K`` entries)."""
    share = counts / counts.sum().clamp_min(1.0)
    return (1.0 / (counts.numel() * share.clamp_min(1e-12))).clamp(1.0, cap)


def row_distance(parameter: Tensor, reference: Tensor) -> Tensor:
    """Squared distance of each row (dimension 0) from the reference."""
    return (parameter - reference).pow(2).reshape(parameter.shape[0], -1).sum(dim=1)


class UsageAnchorTerm(LossTerm):
    """The extra anchor of the module docstring (``coefficient`` = FedProx's ``mu / 2``)."""

    name = "usage-anchor"
    metric = "extra_loss"

    def __init__(self, coefficient: float, cap: float) -> None:
        super().__init__(coefficient)
        self.cap = float(cap)
        self.reference: object = None  # the round's reference dict, held so it is not reused
        self.expert_counts: dict[str, Tensor] = {}
        self.class_counts = torch.zeros(0)

    def _count(self, step: StepContext) -> None:
        if step.reference is not self.reference:  # a new client round: fresh counts
            self.reference = step.reference
            self.expert_counts = {}
            self.class_counts = torch.zeros(step.model.num_labels)
        for name, (logits, _hidden) in step.routing.items():
            picked = logits.detach().topk(step.top_k[name], dim=-1).indices.reshape(-1).cpu()
            counts = torch.bincount(picked, minlength=logits.shape[-1]).float()
            self.expert_counts[name] = self.expert_counts.get(name, 0) + counts
        if step.labels is not None and step.model.head == "classification":
            labels = step.labels.reshape(-1).cpu()
            self.class_counts += torch.bincount(labels, minlength=self.class_counts.numel())

    def value(self, step: StepContext) -> Tensor:
        self._count(step)
        params = dict(step.model.model.named_parameters())
        total = torch.zeros(())
        for layer in step.model.layout.layers:
            if layer.name not in self.expert_counts:
                continue
            extra = anchor_weights(self.expert_counts[layer.name], self.cap) - 1.0
            for expert, slices in enumerate(layer.experts):
                for part in slices:
                    distance = (part.read(params) - part.read(step.reference)).pow(2).sum()
                    total = total + extra[expert] * distance
            for name in layer.router_params:
                total = total + (extra * row_distance(params[name], step.reference[name])).sum()
        if self.class_counts.numel() and self.class_counts.sum() > 0:
            extra = anchor_weights(self.class_counts, self.cap) - 1.0
            for name in step.model.trainable_names:
                if name.startswith("classifier") and params[name].shape[0] == extra.numel():
                    total = total + (extra * row_distance(params[name], step.reference[name])).sum()
        return total


def rerun(source: Path, out: Path, cap: float) -> dict[str, float | str]:
    """The run in ``source`` again with the anchor (FedProx's ``mu``) added."""
    config = ExperimentConfig.from_toml(source / "config.toml")
    if config.strategy.name != "fedprox":
        raise SystemExit(f"{source}: strategy.name is {config.strategy.name!r}; accepted: fedprox")
    config.run.threads, config.run.progress = 1, False
    torch.set_num_threads(1)
    simulation = Simulation(config, out, overwrite=True, log=None)
    simulation.simulator.extra_terms.append(UsageAnchorTerm(0.5 * config.strategy.proximal_mu, cap))
    summary = simulation.run()
    before = json.loads((source / "summary.json").read_text())
    return {
        "run": str(source),
        "validation": float(summary.final_validation_accuracy or 0.0),
        "validation_without": float(before["final_validation_accuracy"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished FedProx run folders")
    parser.add_argument("--cap", type=float, default=100.0)
    parser.add_argument("--out", type=Path, default=Path("runs/screen-anchor"))
    args = parser.parse_args()
    for index, source in enumerate(args.runs):
        row = rerun(source, args.out / f"run{index}", args.cap)
        delta = row["validation"] - row["validation_without"]  # type: ignore[operator]
        print(json.dumps({**row, "delta": round(delta, 4)}), flush=True)


if __name__ == "__main__":
    main()
