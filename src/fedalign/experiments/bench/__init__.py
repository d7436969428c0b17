"""``fedalign bench``: speed, memory and backbone measurements, each table from one run.

* :mod:`.design`: ratios of the simulator's design choices (prefix cache, padding skip,
  aggregation cost, kept bytes per client);
* :mod:`.backbone`: MoEfied vs copy-upcycled backbone (router gradient, routing entropy and
  divergence, round time, upload bytes, FLOP rate, centralised accuracy);
* :mod:`.scale`: scale ratios (server step, bytes per client per round with each upload
  compression, simulator memory per client), with :mod:`.memory`.
"""

from fedalign.experiments.bench.backbone import (
    backbone_measurements,
    backbone_variant,
    central_accuracy,
    matmul_flop_rate,
    router_grad_norm,
    routing_entropy,
    run_backbone_suite,
)
from fedalign.experiments.bench.design import format_table, median_seconds, run_bench
from fedalign.experiments.bench.scale import run_scale_suite

__all__ = [
    "backbone_measurements",
    "backbone_variant",
    "central_accuracy",
    "format_table",
    "matmul_flop_rate",
    "median_seconds",
    "router_grad_norm",
    "routing_entropy",
    "run_backbone_suite",
    "run_bench",
    "run_scale_suite",
]
