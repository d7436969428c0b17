"""``fedalign report RUN_DIR``: pictures of what the routers and experts did in one run.

* :mod:`.load`: reading a run folder (``metrics.jsonl``, ``decisions.jsonl``,
  ``routing.jsonl``, ``summary.json``, ``config.toml``);
* :mod:`.extract`: layers, routing rows, client similarity and merge weights (pure);
* :mod:`.drawing`, :mod:`.figures`: the PNGs (matplotlib, Agg backend);
* :mod:`.page`: the HTML and Markdown pages, one run or a folder of runs.
"""

from fedalign.experiments.report.extract import (
    default_expert,
    masked_inactive,
    mean_offdiagonal,
    merge_matrix,
    merge_weights,
    select_layers,
)
from fedalign.experiments.report.load import RunRecords, find_run_folders, load_run
from fedalign.experiments.report.page import build_report, build_reports

__all__ = [
    "RunRecords",
    "build_report",
    "build_reports",
    "default_expert",
    "find_run_folders",
    "load_run",
    "masked_inactive",
    "mean_offdiagonal",
    "merge_matrix",
    "merge_weights",
    "select_layers",
]
