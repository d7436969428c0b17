"""Run records: the folder every run leaves behind, its files and plots.

* :mod:`fedalign.records.files`: atomic writes, JSON lines, safetensors, the checkpoint;
* :mod:`fedalign.records.run_folder`: :class:`RunFolder` (round lines, routing snapshots,
  checkpoints, the summary) shared by the simulator and the Flower ServerApp;
* :mod:`fedalign.records.plots`: convergence plots.
"""

from fedalign.records.files import (
    RunRecorder,
    atomic_write_bytes,
    atomic_write_text,
    read_jsonl,
    save_state,
    to_jsonable,
    write_jsonl,
)
from fedalign.records.plots import plot_convergence
from fedalign.records.run_folder import (
    RunFolder,
    RunSummary,
    check_resumable,
    claim_run_folder,
    config_fingerprint,
    config_identity,
    peak_memory_mib,
    routing_snapshot,
    run_marker,
)

__all__ = [
    "RunFolder",
    "RunRecorder",
    "RunSummary",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_resumable",
    "claim_run_folder",
    "config_fingerprint",
    "config_identity",
    "peak_memory_mib",
    "plot_convergence",
    "read_jsonl",
    "routing_snapshot",
    "run_marker",
    "save_state",
    "to_jsonable",
    "write_jsonl",
]
