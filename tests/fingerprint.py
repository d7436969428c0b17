"""Behaviour fingerprint: six fixed tiny runs, pinned two ways.

**Portable** (any machine): a run's *signature* is compared with the committed reference
``tests/fingerprint_reference.json``. What is discrete must match exactly: the
configuration, the round count, every integer, string, boolean and list length in the
decision and metric records (clients selected, aligned sets, fallbacks, rejected clients,
example counts, bytes), and the names, shapes and dtypes of the final state's tensors. What
is floating point must match within the case's :class:`Tolerance`: every float of the
decision and metric records, the accuracies (a stated number of test predictions), each
tensor's L2 norm and 16 fixed random projections of the whole final state.

Float results differ in the last bits from one CPU (or kernel path) to another and a few
rounds of Adam amplify that, so a bitwise digest recorded on one machine is not a test
another can pass. The tolerances are ten to a hundred times the spread measured between
torch's AVX2 and default kernel paths on one machine, and tighter than the effect of a
real change (``tests/test_fingerprint.py`` perturbs one aggregation weight by 5 % and
flips one selection, and sees the check fail).

**Bitwise** (one machine): :func:`digests` gives SHA-256 digests of the final state and the
decision records. Two runs on one machine agree bit for bit (a test), and
``scripts/compare_commits.sh A B`` compares two commits' digests on this machine, for
refactors that must not change a bit.

``python tests/fingerprint.py record`` rewrites the reference (after a deliberate change of
numerics, said in the commit); ``check`` compares against it; ``digests [CASE ...]`` prints
the bitwise digests.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedalign.config import ExperimentConfig
from fedalign.records import read_jsonl

REFERENCE = Path(__file__).with_name("fingerprint_reference.json")
PROJECTIONS = 16
PROJECTION_SEED = 20261203

# The options every case shares: a tiny upcycled encoder on WordNet glosses.
BASE: dict[str, object] = {
    "model.name": "tiny-upcycled",
    "model.expert-init": "copy",
    "model.max-length": 24,
    "model.load-balance-coef": 0.0,
    "model.router-noise-std": 0.02,
    "model.cache-prefix": True,
    "model.trainable": "moe+head",
    "data.max-train-examples": 240,
    "data.max-test-examples": 80,
    "partition.method": "dirichlet",
    "partition.num-clients": 3,
    "partition.alpha": 0.5,
    "partition.min-client-size": 10,
    "federated.rounds": 2,
    "federated.fraction": 1.0,
    "federated.seed": 0,
    "train.local-steps": 3,
    "train.batch-size": 8,
    "train.lr": 1e-3,
    "train.weight-decay": 0.0,
    "train.grad-clip": 1.0,
    "strategy.stats-max-examples": 32,
    "strategy.hidden-noise-std": 0.0,
    "run.progress": False,
}

CASES: dict[str, dict[str, object]] = {
    "fedavg": {"strategy.name": "fedavg"},
    "fedprox": {"strategy.name": "fedprox", "strategy.proximal-mu": 0.1},
    "fedmoe": {"strategy.name": "fedmoe", "strategy.fedmoe-u-min": 0.01},
    "fedadam": {"strategy.name": "fedadam", "strategy.server-lr": 0.01},
    "fedalign": {
        "strategy.name": "fedalign",
        "strategy.ablation": "full",
        "strategy.routing-lambda": 0.1,
        "strategy.beta": 1.0,
        "strategy.overlap": "geometric",
        "strategy.personalized-experts": True,
        "model.load-balance-coef": 0.01,
        "federated.rounds": 3,
    },
    "fedalign-adaptive-reg-qwen3": {
        "strategy.name": "fedalign",
        "strategy.ablation": "adaptive-reg",
        "strategy.routing-lambda": 0.5,
        "strategy.overlap": "bhattacharyya",
        "model.name": "tiny-qwen3moe",
        "train.keep-optimizer-state": True,
        "partition.num-clients": 4,
        "federated.fraction": 0.75,
        "federated.rounds": 3,
    },
}

# Metric keys that measure the machine, not the behaviour.
MACHINE_KEYS = frozenset(
    {"seconds", "train_seconds", "aggregation_seconds", "client_state_bytes", "peak_memory_mib"}
)


@dataclass(frozen=True)
class Tolerance:
    """How far a portable signature may move from the reference.

    Attributes
    ----------
    state : float
        The final state's distance from the reference, relative to its norm: the 16
        projections' root-mean-square difference (an estimate of ``||w - w_ref||``) and each
        tensor's norm difference (at most ``||w - w_ref||``) must stay under
        ``state * ||w_ref||``.
    rtol, atol : float
        Every other float ``x`` of the records: ``|x - x_ref| <= atol + rtol * |x_ref|``.
    predictions : int
        Accuracies may differ by this many predictions of the set they were measured on
        (a near-tie can flip on another machine).
    routes : float
        Expert specialisation (normalised mutual information of the test tokens' top-k
        experts and their class) may differ by this much: a near-tie in a router moves a
        token to another expert, about 1e-3 per token on the tiny test sets.
    """

    state: float = 1e-3
    rtol: float = 1e-3
    atol: float = 1e-4
    predictions: int = 1
    routes: float = 1e-2


# Measured spread between torch's AVX2 and default kernel paths (AMD EPYC, 2026-12-03):
# final-state distance 8e-7 (FedAvg) to 4e-5 (FedProx), record floats within 2e-6 abs;
# FedAdam's server Adam turns last-bit differences of near-zero pseudo-gradients into
# lr-sized steps: 1.3e-3 of the state, 2.6e-3 abs in routing figures.
TOLERANCES: dict[str, Tolerance] = {
    "fedadam": Tolerance(state=3e-2, rtol=5e-2, atol=2e-2),
}


def tolerance(case: str) -> Tolerance:
    return TOLERANCES.get(case, Tolerance())


# ---------------------------------------------------------------------- running a case
def case_config(name: str) -> ExperimentConfig:
    config = ExperimentConfig()
    for key, value in {**BASE, **CASES[name]}.items():
        config.set(key, value)
    return config


def run_case(name: str, folder: Path) -> Path:
    """Run case ``name`` into ``folder`` (one torch thread) and return the folder."""
    from fedalign.experiments.run import run_experiment

    torch.set_num_threads(1)
    run_experiment(case_config(name), folder, log=None)
    return folder


def final_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "final_state.safetensors"))


# --------------------------------------------------------------------------- bitwise
def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def decisions_digest(folder: Path) -> str:
    text = json.dumps(read_jsonl(folder / "decisions.jsonl"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def digests(folder: Path) -> tuple[str, str]:
    """Bitwise digests of a finished case: (final state, decision records)."""
    return state_digest(final_state(folder)), decisions_digest(folder)


# -------------------------------------------------------------------------- portable
def _projection_vector(name: str, size: int) -> np.ndarray:
    """Fixed Gaussian vectors for tensor ``name`` (numpy's generator: the same bits on
    every machine), one row per projection."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([PROJECTION_SEED, seed])
    return rng.standard_normal((PROJECTIONS, size))


def state_signature(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Names, shapes, dtypes and norms of every tensor, the whole state's norm and its
    :data:`PROJECTIONS` random projections (float64)."""
    tensors: dict[str, Any] = {}
    projections = np.zeros(PROJECTIONS)
    total = 0.0
    for name in sorted(state):
        values = state[name].detach().to(torch.float64).flatten().numpy()
        norm = float(np.linalg.norm(values))
        total += norm**2
        projections += _projection_vector(name, values.size) @ values
        tensors[name] = {
            "shape": list(state[name].shape),
            "dtype": str(state[name].dtype),
            "norm": norm,
        }
    return {"norm": math.sqrt(total), "projections": projections.tolist(), "tensors": tensors}


def behaviour_lines(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in MACHINE_KEYS} for row in rows]


def signature(folder: Path) -> dict[str, Any]:
    """What the portable check compares: config, round count, decision and metric records
    (machine-dependent timings left out), test-set sizes and the final state's signature."""
    import tomllib

    config = tomllib.loads((folder / "config.toml").read_text())
    config.pop("run", None)
    summary = json.loads((folder / "summary.json").read_text())
    partition = json.loads((folder / "partition.json").read_text())
    return {
        "config": config,
        "rounds": summary["rounds"],
        "partition": partition,
        "decisions": behaviour_lines(read_jsonl(folder / "decisions.jsonl")),
        "metrics": behaviour_lines(read_jsonl(folder / "metrics.jsonl")),
        "state": state_signature(final_state(folder)),
    }


@dataclass
class Comparison:
    """Differences between a signature and its reference (empty: within tolerance)."""

    problems: list[str] = field(default_factory=list)
    largest_state_distance: float = 0.0

    def add(self, text: str) -> None:
        self.problems.append(text)

    def report(self, limit: int = 20) -> str:
        shown = self.problems[:limit]
        more = len(self.problems) - len(shown)
        return "\n".join(shown + ([f"... and {more} more"] if more > 0 else []))


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        if not value:
            yield path, {}
        for key, item in value.items():
            yield from _leaves(item, f"{path}/{key}")
    elif isinstance(value, list):
        yield f"{path}#len", len(value)
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}/{index}")
    else:
        yield path, value


def _accuracy_set_size(path: str, sizes: Mapping[str, int]) -> int | None:
    """The number of examples an accuracy at ``path`` was measured on (None: not one)."""
    leaf = path.rsplit("/", 1)[-1]
    if not ("accuracy" in path or "own_router_gain" in path) or leaf.endswith("#len"):
        return None
    if "global_accuracy" in leaf:
        return sizes["test"]
    if "class_accuracy" in path:
        return sizes["test_per_class"]
    return sizes["smallest_local_test"]


def compare_records(
    reference: Any, current: Any, tol: Tolerance, sizes: Mapping[str, int], out: Comparison
) -> None:
    expected = dict(_leaves(reference))
    found = dict(_leaves(current))
    for path in sorted(set(expected) ^ set(found)):
        out.add(f"{path}: present in {'reference' if path in expected else 'this run'} only")
    for path in sorted(set(expected) & set(found)):
        a, b = expected[path], found[path]
        floats = isinstance(a, float) or isinstance(b, float)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
        if not (floats and numbers):
            if a != b:
                out.add(f"{path}: reference {a!r}, this run {b!r} (must match exactly)")
            continue
        if math.isnan(a) or math.isnan(b):
            if not (math.isnan(a) and math.isnan(b)):
                out.add(f"{path}: reference {a!r}, this run {b!r}")
            continue
        size = _accuracy_set_size(path, sizes)
        bound = tol.atol + tol.rtol * abs(a)
        if size:
            bound = max(bound, tol.predictions / size + 1e-9)
        if "expert_specialisation" in path:
            bound = max(bound, tol.routes)
        if abs(a - b) > bound:
            out.add(
                f"{path}: reference {a!r}, this run {b!r} (|diff| {abs(a - b):.3g} > {bound:.3g})"
            )


def compare_states(
    reference: Mapping[str, Any], current: Mapping[str, Any], tol: Tolerance, out: Comparison
) -> None:
    bound = tol.state * reference["norm"]
    ref_tensors, tensors = reference["tensors"], current["tensors"]
    if set(ref_tensors) != set(tensors):
        out.add(f"state tensors differ: {sorted(set(ref_tensors) ^ set(tensors))}")
        return
    for name, ref in ref_tensors.items():
        now = tensors[name]
        if (ref["shape"], ref["dtype"]) != (now["shape"], now["dtype"]):
            out.add(
                f"state/{name}: reference {ref['shape']} {ref['dtype']}, "
                f"this run {now['shape']} {now['dtype']}"
            )
        elif abs(ref["norm"] - now["norm"]) > bound:
            out.add(
                f"state/{name}: norm {now['norm']:.6g}, reference {ref['norm']:.6g} "
                f"(> {bound:.3g} apart)"
            )
    differences = np.asarray(current["projections"]) - np.asarray(reference["projections"])
    distance = float(np.sqrt(np.mean(differences**2)))
    out.largest_state_distance = distance / reference["norm"]
    if distance > bound:
        out.add(
            f"final state moved {distance / reference['norm']:.3g} of its norm from the "
            f"reference (tolerance {tol.state:.3g})"
        )


def accuracy_set_sizes(signature: Mapping[str, Any]) -> dict[str, int]:
    """Sizes of the sets accuracies are measured on: the global test set (the config's cap)
    and the smallest local test split (a flipped prediction moves its accuracy most)."""
    local = [int(n) for n in signature["partition"].get("test_sizes", []) if int(n) > 0]
    test = max(int(signature["config"]["data"]["max-test-examples"]), 1)
    classes = max(len(signature["partition"].get("label_names", [])), 1)
    return {
        "test": test,
        "test_per_class": max(test // classes, 1),
        "smallest_local_test": min(local, default=1),
    }


def compare(reference: Mapping[str, Any], current: Mapping[str, Any], tol: Tolerance) -> Comparison:
    """Compare two :func:`signature` results under ``tol``."""
    out = Comparison()
    sizes = accuracy_set_sizes(reference)
    compare_records(
        {k: v for k, v in reference.items() if k != "state"},
        {k: v for k, v in current.items() if k != "state"},
        tol,
        sizes,
        out,
    )
    compare_states(reference["state"], current["state"], tol, out)
    return out


def load_reference() -> dict[str, Any]:
    return json.loads(REFERENCE.read_text())


def main(argv: list[str]) -> int:
    command, cases = (argv[0] if argv else "check"), (argv[1:] or sorted(CASES))
    reference = (
        load_reference()
        if command == "check" or (command == "record" and REFERENCE.exists())
        else {}
    )
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            folder = run_case(case, Path(tmp) / case)
            if command == "digests":
                print(f"{case} {' '.join(digests(folder))}", flush=True)
            elif command == "record":
                reference[case] = signature(folder)
            elif command == "check":
                result = compare(reference[case], signature(folder), tolerance(case))
                status = "ok" if not result.problems else "DIFFERS"
                print(f"{case}: {status} (state distance {result.largest_state_distance:.2e})")
                if result.problems:
                    print(result.report())
            else:
                print(f"unknown command {command!r}: record, check or digests", file=sys.stderr)
                return 2
    if command == "record":
        REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
        print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
