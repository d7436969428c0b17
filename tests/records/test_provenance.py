"""provenance.json: where a run ran, kept across a resume on another machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedalign.config import ExperimentConfig
from fedalign.experiments.run import run_experiment
from fedalign.records import provenance, recorded_machine, run_folder
from fedalign.records.provenance import (
    UNKNOWN_LABEL,
    describe_environment,
    parse_cpuinfo,
    read_provenance,
    start_session,
)
from tests.helpers import tiny_config

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse4_2 avx f16c fma avx2 avx512f avx512bw avx512_bf16 amx_tile amx_bf16 aes

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx
"""

ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes crc32 asimdhp asimddp sve sve2 i8mm bf16
CPU implementer\t: 0x41
CPU part\t: 0xd4f
"""


def test_cpuinfo_gives_the_model_and_the_kernel_flags() -> None:
    model, flags = parse_cpuinfo(X86)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert flags == [
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_bf16",
        "amx_tile",
        "amx_bf16",
    ]  # the first processor's line; sse and aes do not select kernels
    model, flags = parse_cpuinfo(ARM)
    assert model == "ARM implementer 0x41 part 0xd4f"
    assert flags == ["asimd", "asimdhp", "asimddp", "sve", "sve2", "bf16", "i8mm"]
    assert parse_cpuinfo("") == ("", [])


def test_machine_id_follows_the_kernels_not_the_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(X86)
    monkeypatch.setattr(provenance, "CPUINFO", info)
    first = describe_environment()
    assert first["machine_label"] == (
        f"Intel(R) Xeon(R) Platinum 8480+, {torch.backends.cpu.get_cpu_capability()} kernels"
    )
    info.write_text(X86.replace(" avx512_bf16", ""))
    assert describe_environment()["machine"] != first["machine"]
    info.write_text(X86)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    again = describe_environment()
    assert again["threads"] == 97 and again["machine"] == first["machine"]
    # no /proc/cpuinfo (macOS, Windows): the platform's name, no flags
    monkeypatch.setattr(provenance, "CPUINFO", tmp_path / "absent")
    fallback = describe_environment()["cpu"]
    assert fallback["source"] == "platform" and fallback["kernel_flags"] == []
    assert fallback["model"]


def test_a_run_folder_records_where_it_ran(tmp_path: Path) -> None:
    config = tiny_config(federated__rounds=1)
    run_experiment(config, tmp_path / "run", log=None)
    record = json.loads((tmp_path / "run" / "provenance.json").read_text())
    cpu = record["cpu"]
    assert cpu["model"] and isinstance(cpu["kernel_flags"], list)
    assert cpu["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["gpu"] is None and record["device"] == "cpu"
    assert record["transport"] == "simulator"
    assert record["threads"] == torch.get_num_threads()
    assert record["python"] and record["platform"] and record["arch"]
    versions = record["versions"]
    assert versions["torch"].startswith(torch.__version__.split("+")[0])
    assert {"transformers", "numpy", "fedalign"} <= set(versions)
    assert len(record["machine"]) == 12 and len(record["software"]) == 12
    assert record["machine_label"].endswith(f"{cpu['torch_capability']} kernels")
    assert record["sessions"] == [
        {
            "from_round": 1,
            "machine": record["machine"],
            "machine_label": record["machine_label"],
            "software": record["software"],
            "started": record["sessions"][0]["started"],
        }
    ]
    assert record["spans_machines"] is False and "note" not in record
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["provenance"] == record
    # the configuration knows nothing of it: a run elsewhere is the same experiment
    assert "provenance" not in (tmp_path / "run" / "config.toml").read_text()
    saved = ExperimentConfig.from_toml(tmp_path / "run" / "config.toml")
    assert saved.to_dict() == config.to_dict()


def test_a_run_resumed_on_another_machine_keeps_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "run"
    run_experiment(tiny_config(federated__rounds=1), folder, log=None)
    first = read_provenance(folder)
    assert first is not None

    def elsewhere(device: str = "cpu", transport: str = "simulator") -> dict[str, Any]:
        here = describe_environment(device, transport)
        return {**here, "machine": "0123456789ab", "machine_label": "Other CPU, AVX512 kernels"}

    monkeypatch.setattr(run_folder, "describe_environment", elsewhere)
    run_experiment(tiny_config(federated__rounds=2), folder, resume=True, log=None)
    record = read_provenance(folder)
    assert record is not None
    assert [(s["from_round"], s["machine"]) for s in record["sessions"]] == [
        (1, first["machine"]),
        (2, "0123456789ab"),
    ]
    assert record["machine"] == "0123456789ab"  # the top level: the latest session
    assert record["spans_machines"] is True
    assert record["note"] == (
        f"this run spans machines: rounds 1-1 on {first['machine_label']}; "
        "rounds 2-2 on Other CPU, AVX512 kernels"
    )
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["provenance"]["spans_machines"] is True
    machine, label = recorded_machine(record)
    assert machine == f"{first['machine']}+0123456789ab"
    assert label.endswith("then Other CPU, AVX512 kernels (one run, resumed)")


def test_sessions_of_a_resume() -> None:
    here = {"machine": "aaaaaaaaaaaa", "machine_label": "A", "software": "s"}
    there = {"machine": "bbbbbbbbbbbb", "machine_label": "B", "software": "s"}
    record = start_session(None, here, 1, "t0")
    # a session that crashed before finishing a round is replaced by the next one
    crashed = start_session(record, there, 4, "t1")
    resumed = start_session(crashed, here, 4, "t2")
    assert [s["started"] for s in resumed["sessions"]] == ["t0", "t2"]
    assert resumed["spans_machines"] is False
    # a checkpoint written before provenance: its rounds ran on an unknown machine
    old = start_session(None, here, 3, "t3")
    assert [(s["from_round"], s["machine_label"]) for s in old["sessions"]] == [
        (1, UNKNOWN_LABEL),
        (3, "A"),
    ]
    assert old["spans_machines"] is True
    assert recorded_machine(None) == ("unknown", UNKNOWN_LABEL)
