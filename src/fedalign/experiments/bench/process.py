"""Measuring a function in a process of its own: resident memory now and at its peak, and
:func:`in_fresh_process` (one torch thread, a fresh Python) so a cell's peak and timings
are the cell's own. Shared by the scale suite's server step and the memory cells.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Any

GB = 1e9
MB = 1e6


def resident_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """Peak resident set size of this process so far.

    ``VmHWM`` of ``/proc/self/status`` where there is one: the peak of this process's own
    memory. ``getrusage``'s ``ru_maxrss`` (the fallback; Linux reports KiB) also counts the
    parent's resident size at the ``fork``/``exec`` that started the process, so a cell
    started from a large process would report at least that.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def in_fresh_process(
    module: str, function: str, arguments: str, timeout: float | None = None
) -> dict[str, Any]:
    """``asdict(module.function(**json.loads(arguments)))`` computed in a fresh Python process
    with one torch thread (so peak memory and timings are the function's own).

    Raises
    ------
    RuntimeError
        When the process fails (the end of its standard error is in the message).
    """
    code = (
        "import json, sys\n"
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from dataclasses import asdict\n"
        f"from {module} import {function}\n"
        f"print(json.dumps(asdict({function}(**json.loads(sys.argv[1])))))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{function} {arguments} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
