"""``fedalign benchmark``: the paper's grid of strategies x Dirichlet alphas x seeds.

* :mod:`.suite`: suite files (``benchmarks/*.toml``) parsed into a :class:`Suite`;
* :mod:`.plan`: typed :class:`BenchmarkOptions`, the planned runs and their folders' state;
* :mod:`.runner`: :func:`run_benchmark`, running what has not finished;
* :mod:`.results`: per-run and per-(strategy, alpha) rows (paired and censored statistics);
* :mod:`.page`: the results folder (tables, plots, run reports, ``COMMAND.txt``).
"""

from fedalign.experiments.benchmark.plan import (
    BAND_CHOICES,
    BenchmarkOptions,
    PlannedRun,
    alpha_name,
    command_text,
    plan_runs,
    resolve,
    run_status,
)
from fedalign.experiments.benchmark.results import aggregate_rows, display_rows, run_rows
from fedalign.experiments.benchmark.runner import execute_plan, run_benchmark
from fedalign.experiments.benchmark.suite import (
    SUITE_NAMES,
    Suite,
    find_suite_file,
    load_suite,
    parse_strategies,
)

__all__ = [
    "BAND_CHOICES",
    "SUITE_NAMES",
    "BenchmarkOptions",
    "PlannedRun",
    "Suite",
    "aggregate_rows",
    "alpha_name",
    "command_text",
    "display_rows",
    "execute_plan",
    "find_suite_file",
    "load_suite",
    "parse_strategies",
    "plan_runs",
    "resolve",
    "run_benchmark",
    "run_rows",
    "run_status",
]
