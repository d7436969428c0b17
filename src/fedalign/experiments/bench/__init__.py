"""``fedalign bench``: speed, memory and backbone measurements, each table from one run.

Every suite registers itself in :data:`SUITES` (:mod:`.registry`); the command line lists
and runs what is registered:

* :mod:`.design`: ratios of the simulator's design choices (prefix cache, padding skip,
  aggregation cost, kept bytes per client);
* :mod:`.backbone`: MoEfied vs copy-upcycled backbone (router gradient, routing entropy and
  divergence, round time, upload bytes, FLOP rate, centralised accuracy);
* :mod:`.scale`: the server step at scale (synthetic rounds, sketch accuracy, bytes per
  client, update compression) and the scale suite (server step, bytes per client per round
  with each upload compression, simulator memory per client, with :mod:`.memory`);
* :mod:`.lora_error`: FedIT factor averaging vs the exact mean of LoRA products (and SVD-r);
* :mod:`.memory_profile`: resident memory of one simulation, phase by phase;
* :mod:`.parallel`: simulator rounds with clients in 1 vs N worker processes;
* :mod:`.flower_overhead`: per-round wall time of loopback Flower deployments (cold, warm,
  TLS) against the simulator.

:mod:`.process` measures a function in a fresh process (resident and peak memory);
:mod:`.output` writes a suite's result files (page, rows, ``COMMAND.txt``).
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
from fedalign.experiments.bench.flower_overhead import overhead_table, run_overhead
from fedalign.experiments.bench.lora_error import lora_error_table, run_lora_error
from fedalign.experiments.bench.memory_profile import memory_profile_text, profile_phases
from fedalign.experiments.bench.parallel import parallel_table, run_parallel
from fedalign.experiments.bench.registry import (
    SUITES,
    BenchRequest,
    BenchSuite,
    SuiteOption,
    get_suite,
    register,
    suite_names,
    suite_options,
    suites_using,
)
from fedalign.experiments.bench.scale import run_scale_benchmark, run_scale_suite

__all__ = [
    "SUITES",
    "BenchRequest",
    "BenchSuite",
    "SuiteOption",
    "backbone_measurements",
    "backbone_variant",
    "central_accuracy",
    "format_table",
    "get_suite",
    "lora_error_table",
    "matmul_flop_rate",
    "median_seconds",
    "memory_profile_text",
    "overhead_table",
    "parallel_table",
    "profile_phases",
    "register",
    "router_grad_norm",
    "routing_entropy",
    "run_backbone_suite",
    "run_bench",
    "run_lora_error",
    "run_overhead",
    "run_parallel",
    "run_scale_benchmark",
    "run_scale_suite",
    "suite_names",
    "suite_options",
    "suites_using",
]
