"""Run records: the folder every run leaves behind, its files and plots.

* :mod:`fedalign.records.files`: atomic writes, JSON lines, safetensors, the checkpoint;
* :mod:`fedalign.records.run_folder`: :class:`RunFolder` (round lines, routing snapshots,
  checkpoints, the summary) shared by the simulator and the Flower ServerApp;
* :mod:`fedalign.records.provenance`: where a run ran (``provenance.json``: CPU, kernel
  flags, torch capability, GPU, versions; a short machine identifier);
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
from fedalign.records.provenance import (
    UNKNOWN_LABEL,
    UNKNOWN_MACHINE,
    current_machine,
    describe_environment,
    read_provenance,
    recorded_machine,
)
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
    "UNKNOWN_LABEL",
    "UNKNOWN_MACHINE",
    "RunFolder",
    "RunRecorder",
    "RunSummary",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_resumable",
    "claim_run_folder",
    "config_fingerprint",
    "config_identity",
    "current_machine",
    "describe_environment",
    "peak_memory_mib",
    "plot_convergence",
    "read_jsonl",
    "read_provenance",
    "recorded_machine",
    "routing_snapshot",
    "run_marker",
    "save_state",
    "to_jsonable",
    "write_jsonl",
]
