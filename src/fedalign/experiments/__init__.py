"""Experiments built on the layers below: one run, comparisons, benchmark grids, reports.

* :mod:`.run`: one federated run in this process (prepare, simulate, record, summarise);
* :mod:`.compare`: several strategies on one partition, seed and initial model;
* :mod:`.benchmark`: the paper's grid of strategies x Dirichlet alphas x seeds;
* :mod:`.report`: figures and a page of one run folder;
* :mod:`.bench`: every measurement (the registered ``fedalign bench`` suites, the scale
  measurement of ``benchmarks/scale.py``);
* :mod:`.stats`, :mod:`.tables`, :mod:`.plots`: the evaluation statistics (paired
  differences, censored rounds to target), table rendering and curves they share.

No argparse here: :mod:`fedalign.cli` maps the command line onto these functions.
"""

from fedalign.experiments.benchmark import (
    BAND_CHOICES,
    SUITE_NAMES,
    BenchmarkOptions,
    parse_strategies,
    run_benchmark,
)
from fedalign.experiments.compare import ComparisonResult, comparison_table, run_comparison
from fedalign.experiments.report import build_report, build_reports
from fedalign.experiments.run import Simulation, default_out_dir, run_experiment

__all__ = [
    "BAND_CHOICES",
    "SUITE_NAMES",
    "BenchmarkOptions",
    "ComparisonResult",
    "Simulation",
    "build_report",
    "build_reports",
    "comparison_table",
    "default_out_dir",
    "parse_strategies",
    "run_benchmark",
    "run_comparison",
    "run_experiment",
]
