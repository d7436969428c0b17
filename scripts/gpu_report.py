"""The GPU check's summary: ``summary.md`` (every table) and ``summary.json`` (everything)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any


def source_digest(src: Path) -> str:
    """First 12 hex digits of the SHA-256 of every ``.py`` file under ``src`` (paths and
    contents, in path order): names the code that ran where no git history travels."""
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*.py")):
        digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "/").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _environment(env: dict[str, Any], scale: dict[str, Any] | None) -> list[str]:
    minilm = env.get("minilm")
    if isinstance(minilm, dict):
        drift = minilm.get("output_drift", {})
        minilm = (
            f"float16-rounded weights ({minilm.get('source')}), pooled output within "
            f"{drift.get('max_abs_difference', float('nan')):.1e} of float32"
        )
    gpu = (scale or {}).get("gpu", "-")
    header = ["python", "torch", "CUDA", "transformers", "peft", "GPU", "all-MiniLM-L6-v2"]
    row = [env.get(k) for k in ("python", "torch", "cuda", "transformers", "peft")]
    return table(header, [[*row, gpu, minilm]])


def _scale(scale: dict[str, Any] | None) -> list[str]:
    if not scale:
        return ["No result (see `log.txt`, stage scale)."]
    estimate = scale["estimate_gib"]
    matmul = scale["matmul"]
    rounds = scale["rounds"]
    lines = [
        f"{scale['model']}: {scale['parameters']:,} parameters, {scale['trainable']:,} "
        f"trained (computed: {scale['estimated_trainable']:,}), {scale['active_per_token']:,} "
        f"active per token outside the embeddings; precision {scale['precision']}; "
        f"transformers' default expert kernel here: `{scale['default_experts_implementation']}`. "
        f"{matmul['dtype']} matmul n = {matmul['n']} in the same run: "
        f"{matmul['tflops']:.3g} TFLOP/s. Computed memory (scripts/estimate_memory.py): "
        "{total:.3g} GiB = {weights:.3g} weights + {grad+adam+ref:.3g} gradients, AdamW and "
        "reference + {activations:.3g} activations.".format(**estimate),
        "",
    ]
    measures = [
        ("tokens per second (training steps)", "tokens_per_second"),
        ("seconds per step", "step_seconds"),
        ("model TFLOP/s (6 N T + 12 L s w T)", "model_tflops"),
        ("fraction of the matmul rate", "fraction_of_matmul"),
        ("peak GPU memory allocated, GiB", "peak_allocated_gib"),
        ("peak GPU memory reserved, GiB", "peak_reserved_gib"),
        ("whole client round, s (statistics, copies to the CPU)", "round_seconds"),
        ("steps (timed)", "timed_steps"),
        ("error", "error"),
    ]
    rows = [[label, *(r.get(key) for r in rounds.values())] for label, key in measures]
    peaks = [r.get("peak_allocated_gib") for r in rounds.values()]
    rows.append(
        ["measured peak / computed", *((p / estimate["total"]) if p else None for p in peaks)]
    )
    return lines + table(["measure", *(f"`{name}`" for name in rounds)], rows)


def round_line(measured: dict[str, Any]) -> str:
    """One client round's result in a line (or its error)."""
    if "error" in measured:
        return measured["error"]
    peak = measured.get("peak_allocated_gib")
    return (
        f"{measured['tokens_per_second']:,.0f} tokens/s, {measured['step_seconds']:.3f} s a step"
        + (f", peak {peak:.1f} GiB" if peak is not None else "")
    )


def _tiny(rows: list[dict[str, Any]] | None) -> list[str]:
    if not rows:
        return ["No result (see `log.txt`, stage tiny)."]
    body = [
        [r["model"], r["task"], r["precision"], r["status"], r.get("final_accuracy"),
         r["seconds"], r.get("error", "")]
        for r in rows
    ]  # fmt: skip
    header = ["model", "task", "precision", "status", "final accuracy", "seconds", "error"]
    return table(header, body)


def _claim(claim: dict[str, Any] | None, out: Path) -> list[str]:
    if claim is None:
        return ["Not run (`--no-claim`)."]
    runs = claim["runs"]
    lines = [
        f"{claim['finished']} of {len(runs)} runs finished in {claim['seconds']:.0f} s on "
        f"{claim['workers']} benchmark processes ({claim['stopped_at_deadline']} stopped at "
        "the deadline). Pages: `claim-results.md`, `claim-versus-fedprox.md`; run files: "
        "`claim-runs.tar.gz`.",
        "",
    ]
    use = claim.get("gpu_use")
    if use:
        lines += [
            f"GPU use meanwhile (nvidia-smi, {use['samples']} samples 5 s apart): "
            f"{use['mean_utilisation']:.0f} % mean, {use['max_utilisation']:.0f} % peak, "
            f"{use['max_memory_mib']:,.0f} MiB peak memory.",
            "",
        ]
    page = out / "claim-results.md"
    if page.exists():
        lines += tables_of(page.read_text())
    unfinished = [[r["run"], r["rounds"]] for r in runs if not r["finished"]]
    if unfinished:
        lines += ["Unfinished runs (rounds recorded when stopped):", ""]
        lines += table(["run", "rounds"], unfinished)
    return lines


def tables_of(markdown: str) -> list[str]:
    """The table lines of ``markdown``, each table followed by an empty line."""
    lines: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines and lines[-1]:
            lines.append("")
    return lines + ([""] if lines and lines[-1] else [])


def write(report: dict[str, Any], out: Path) -> None:
    """``out/summary.md`` and ``out/summary.json`` from the check's ``report``."""
    env = report["environment"]
    arguments = report["arguments"]
    flags = " ".join(
        f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else f"--{k}"
        for k, v in arguments.items()
        if k in ("device", "budget", "claim_workers") and v is not None
    ) + (" --quick" if arguments.get("quick") else "")
    stages = [[s["stage"], s["status"], s["seconds"], s.get("tail", "")] for s in report["stages"]]
    lines = [
        "# GPU check",
        "",
        f"`scripts/gpu_check.sh {flags}` on {time.strftime('%Y-%m-%d')}, fedalign source "
        f"digest `{env['fedalign_source']}`, {report['seconds']:.0f} s in all.",
        "",
        "## Machine and software",
        "",
        *_environment(env, report.get("scale")),
        "",
        "## Stages",
        "",
        *table(["stage", "status", "seconds", "last line"], stages),
        "",
        "## One client round of a random-weight MoE of realistic size",
        "",
        *_scale(report.get("scale")),
        "",
        "## Tiny families: two FedAlign-MoE rounds each",
        "",
        *_tiny(report.get("tiny")),
        "",
        "## The claim at the paper's scale (benchmarks/claim-gpu.toml)",
        "",
        *_claim(report.get("claim"), out),
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
