"""The scale measurements, one concern a module.

* :mod:`.synthetic`: synthetic rounds (layout, parameters, routing statistics; no training);
* :mod:`.server_step`: one strategy's ``aggregate`` timed on a synthetic round, each cell in
  a fresh process (:mod:`fedalign.experiments.bench.process`), and its table;
* :mod:`.sketch`, :mod:`.sketch_real`: step D's decisions with sketched vs exact update
  cosines, on structured synthetic updates and on a small real run;
* :mod:`.payload`: bytes per client per round, per strategy and upload compression;
* :mod:`.compression`: encodings of a run folder's update (bytes, reconstruction error);
* :mod:`.parts`: every part written under one folder (``benchmarks/scale.py``);
* :mod:`.suite`: ``fedalign bench --suite scale`` (server step, bytes, simulator memory).
"""

from fedalign.experiments.bench.process import (
    GB,
    MB,
    in_fresh_process,
    peak_resident_bytes,
    resident_bytes,
)
from fedalign.experiments.bench.scale.compression import (
    CompressionRow,
    compression_table,
    delta_compression,
    run_folder_update,
)
from fedalign.experiments.bench.scale.parts import SCALE_PARTS, run_scale_benchmark
from fedalign.experiments.bench.scale.payload import (
    PAYLOAD_STRATEGIES,
    SCALE_STRATEGIES,
    CompressedBytes,
    PayloadBytes,
    bytes_table,
    compressed_bytes,
    model_payload_bytes,
    payload_bytes,
    payload_table,
    rows_as_dicts,
    statistics_like,
)
from fedalign.experiments.bench.scale.server_step import (
    CellResult,
    run_cell,
    run_cell_isolated,
    server_step_table,
)
from fedalign.experiments.bench.scale.sketch import (
    SketchAccuracy,
    sketch_accuracy,
    sketch_accuracy_table,
    structured_updates,
)
from fedalign.experiments.bench.scale.sketch_real import (
    TINY_RUN,
    real_agreement_table,
    real_sketch_agreement,
    round_agreement,
)
from fedalign.experiments.bench.scale.suite import QUICK, ScaleSize, run_scale_suite
from fedalign.experiments.bench.scale.synthetic import (
    EXPERT_SIZES,
    synthetic_layout,
    synthetic_parameters,
    synthetic_round,
    synthetic_statistics,
)

__all__ = [
    "EXPERT_SIZES",
    "GB",
    "MB",
    "PAYLOAD_STRATEGIES",
    "QUICK",
    "SCALE_PARTS",
    "SCALE_STRATEGIES",
    "TINY_RUN",
    "CellResult",
    "CompressedBytes",
    "CompressionRow",
    "PayloadBytes",
    "ScaleSize",
    "SketchAccuracy",
    "bytes_table",
    "compressed_bytes",
    "compression_table",
    "delta_compression",
    "in_fresh_process",
    "model_payload_bytes",
    "payload_bytes",
    "payload_table",
    "peak_resident_bytes",
    "real_agreement_table",
    "real_sketch_agreement",
    "resident_bytes",
    "round_agreement",
    "rows_as_dicts",
    "run_cell",
    "run_cell_isolated",
    "run_folder_update",
    "run_scale_benchmark",
    "run_scale_suite",
    "server_step_table",
    "sketch_accuracy",
    "sketch_accuracy_table",
    "statistics_like",
    "structured_updates",
    "synthetic_layout",
    "synthetic_parameters",
    "synthetic_round",
    "synthetic_statistics",
]
