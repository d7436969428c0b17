"""Experiments on top of the simulator: comparisons, benchmark grids and run reports.

* :mod:`.compare`: several strategies on one partition, seed and initial model;
* :mod:`.benchmark`: the paper's grid of strategies x Dirichlet alphas x seeds;
* :mod:`.report`: figures and a page of one run folder;
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

__all__ = [
    "BAND_CHOICES",
    "SUITE_NAMES",
    "BenchmarkOptions",
    "ComparisonResult",
    "build_report",
    "build_reports",
    "comparison_table",
    "parse_strategies",
    "run_benchmark",
    "run_comparison",
]
