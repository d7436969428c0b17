"""The sketch on real updates: round 1's step-D decisions of one small real run, exact and
sketched."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedalign.config import ExperimentConfig
from fedalign.experiments.run import run_experiment
from fedalign.strategies.fedalign.semantic import (
    sketch_buckets,
)

Tensor = torch.Tensor


TINY_RUN = (
    "model.name=tiny-upcycled",
    "model.max-length=24",
    "data.max-train-examples=600",
    "run.threads=1",
)
"""Overrides of the small real run whose round-1 decisions :func:`real_sketch_agreement` uses."""


def round_agreement(
    exact: Mapping[str, Any], sketched: Mapping[str, Any]
) -> tuple[int, int, float]:
    """``(agreeing, memberships, max |c_i difference|)`` of two decision records' step D.

    A membership is an (expert, active client) pair; it agrees when the client is in both
    aligned sets or in neither.
    """
    agree = total = 0
    worst = 0.0
    for name, layer in exact["layers"].items():
        other = sketched["layers"][name]["experts"]
        for first, second in zip(layer["experts"], other, strict=True):
            aligned = set(first["aligned"] or []), set(second["aligned"] or [])
            for cid in first["active"] or []:
                total += 1
                agree += (cid in aligned[0]) == (cid in aligned[1])
            for cid, value in (first["consensus"] or {}).items():
                worst = max(worst, abs(value - (second["consensus"] or {}).get(cid, value)))
    return agree, total, worst


def real_sketch_agreement(
    out: str | Path,
    sketch_dims: Sequence[int],
    overrides: Sequence[str] = TINY_RUN,
) -> list[dict[str, Any]]:
    """Round-1 step-D decisions of one real run with exact and with sketched cosines.

    Runs ``fedalign run`` (one round, ``overrides``) once per ``sketch_dim`` in ``0`` and
    ``sketch_dims`` under ``out/k<dim>``: same seed, partition and client training, so
    round 1's client updates are identical and only step D's cosines differ. Also counts
    how close the exact consensus values lie to the threshold.
    """
    records = {}
    for dim in (0, *sketch_dims):
        config = ExperimentConfig()
        config.apply_overrides([*overrides, "federated.rounds=1", f"strategy.sketch-dim={dim}"])
        folder = Path(out) / f"k{dim}"
        run_experiment(config, folder, log=None)
        with (folder / "decisions.jsonl").open(encoding="utf-8") as handle:
            records[dim] = json.loads(handle.readline())
    gaps = [
        abs(value - expert["tau"])
        for layer in records[0]["layers"].values()
        for expert in layer["experts"]
        if expert["tau"] is not None
        for value in expert["consensus"].values()
    ]
    near = sum(gap < 0.01 for gap in gaps) / max(len(gaps), 1)
    rows = []
    for dim in sketch_dims:
        agree, total, worst = round_agreement(records[0], records[dim])
        rows.append(
            {
                "sketch_dim": dim,
                "buckets": sketch_buckets(dim),
                "memberships": total,
                "agreement": round(agree / max(total, 1), 4),
                "max_abs_consensus_difference": round(worst, 4),
                "exact_within_0.01_of_tau": round(near, 4),
            }
        )
    return rows


def real_agreement_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`real_sketch_agreement`'s rows."""
    header = (
        "| sketch dim | buckets | memberships | agree with exact | max abs consensus diff "
        "| exact memberships within 0.01 of tau |\n|---|---|---|---|---|---|\n"
    )
    return header + "".join(
        f"| {r['sketch_dim']} | {r['buckets']} | {r['memberships']} | {r['agreement']:.4f} | "
        f"{r['max_abs_consensus_difference']:.4f} | {r['exact_within_0.01_of_tau']:.2%} |\n"
        for r in rows
    )
