"""``fedalign bench --suite memory-profile``: resident memory of one simulation, phase by
phase (the profile behind ``benchmarks/results/scale/memory_profile.md``).

Runs the memory cell of the scale suite (:data:`~.memory.MEMORY_OVERRIDES`, 20 clients of
``--examples-per-client`` examples by default) in this process and notes the resident and
peak resident memory (MB) after preparing, and before / after each round's client training,
screening (compressed uploads restored) and aggregation. The phases are observed by
wrapping three bound methods of this run's own simulator and server objects (the classes
are left alone).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedalign.config import ExperimentConfig
from fedalign.experiments.bench.memory import MEMORY_OVERRIDES
from fedalign.experiments.bench.process import MB, peak_resident_bytes, resident_bytes
from fedalign.experiments.bench.registry import BenchRequest, BenchSuite, SuiteOption, register
from fedalign.experiments.run import Simulation
from fedalign.protocol import tensor_bytes

Mark = tuple[str, float, float]
"""A phase: its name, resident MB, peak resident MB."""


def _wrap(
    owner: Any, name: str, after: Callable[[Any], None], before: Callable[[], None] | None = None
) -> None:
    """Replace ``owner.name`` (a bound method) by one that calls ``before()`` first and
    ``after(result)`` last."""
    method = getattr(owner, name)

    def wrapped(*args: Any) -> Any:
        if before is not None:
            before()
        done = method(*args)
        after(done)
        return done

    setattr(owner, name, wrapped)


def profile_phases(config: ExperimentConfig) -> tuple[list[Mark], str]:
    """Run ``config`` here with the phases marked; the marks and a line on the kept state."""
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    marks: list[Mark] = []

    def mark(what: str) -> None:
        marks.append((what, resident_bytes() / MB, peak_resident_bytes() / MB))

    with tempfile.TemporaryDirectory(prefix="fedalign-memory-profile-") as folder:
        simulation = Simulation(config, Path(folder) / "run", log=None)
        simulator = simulation.simulator
        _wrap(
            simulator,
            "_train_clients",
            lambda done: mark(f"after training (results {tensor_bytes(done[0]) / MB:.1f} MB)"),
            before=lambda: mark("before training"),
        )
        _wrap(
            simulator.server,
            "screen",
            lambda done: mark(
                "after screening (restored "
                f"{tensor_bytes([r.parameters for r in done.accepted]) / MB:.1f} MB)"
            ),
        )
        _wrap(simulator.server, "aggregate", lambda _done: mark("after aggregation"))
        mark("prepared")
        simulation.run()
        mark("end")
        kept = (
            f"kept per client state {simulator.client_state_bytes() / MB:.1f} MB, "
            f"trainable {tensor_bytes(simulator.server.global_parameters) / MB:.2f} MB"
        )
    return marks, kept


def memory_profile_text(marks: list[Mark], kept: str) -> str:
    """The kept-state line, then one line per phase: resident and peak MB."""
    lines = [kept]
    for what, resident, peak in marks:
        lines.append(f"{what:45s} resident {resident:8.1f} peak {peak:8.1f}")
    return "\n".join(lines)


EXAMPLES_PER_CLIENT = SuiteOption(
    "examples-per-client",
    "memory-profile: training examples a client (data.max-train-examples = clients x this)",
    int,
    20,
)


def _run(request: BenchRequest) -> str:
    config = request.config.copy()
    config.data.max_train_examples = (
        config.partition.num_clients * request.options["examples_per_client"]
    )
    config.validate()
    return memory_profile_text(*profile_phases(config))


register(
    BenchSuite(
        name="memory-profile",
        description="resident memory of one simulation, phase by phase (the scale memory cell)",
        run=_run,
        options=(EXAMPLES_PER_CLIENT,),
        defaults=(*MEMORY_OVERRIDES, "partition.num-clients=20"),
    )
)
