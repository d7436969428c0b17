"""A Flower deployment on 127.0.0.1: one SuperLink, one SuperNode per partition, ``flwr run``.

What ``docs/flower.md`` describes step by step, as one object, for the overhead benchmark
(``fedalign bench --suite flower-overhead``) and the deployment test: real ``flower-superlink`` and
``flower-supernode`` processes on free ports, optionally with TLS (certificates made by
``scripts/flower_certificates.sh``, the docs' recipe) and optionally with warm ClientApps
(each SuperNode with ``--isolation process`` plus a ``fedalign flower-worker``,
:mod:`fedalign.flower.worker`); warm SuperNodes are started as ``fedalign
flower-supernode`` (:mod:`fedalign.flower.supernode`: Flower's SuperNode with shorter
waits) unless ``fast_poll=False``. Every process starts in its own session and is stopped by
its process group id (SIGTERM, then SIGKILL), also when a step fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from fedalign.config import ExperimentConfig
from fedalign.flower.messages import FlowerOptions, run_config_from_config

FEDERATION = "loopback"
"""The connection name written to ``$FLWR_HOME/config.toml``."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes]) -> None:
    """Return once 127.0.0.1:``port`` accepts connections.

    Raises
    ------
    RuntimeError
        When ``process`` exits first or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def app_keys(app_dir: Path) -> set[str]:
    """The keys of ``[tool.flwr.app.config]`` in ``app_dir/pyproject.toml``."""
    document = tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    section = document["tool"]["flwr"]["app"]["config"]

    def flatten(table: dict[str, Any], prefix: str = "") -> set[str]:
        keys: set[str] = set()
        for key, value in table.items():
            if isinstance(value, dict):
                keys |= flatten(value, f"{prefix}{key}.")
            else:
                keys.add(f"{prefix}{key}")
        return keys

    return flatten(section)


def run_config_argument(config: ExperimentConfig, out: Path, app_dir: Path) -> str:
    """``--run-config`` for ``flwr run``: every key of ``config`` (and ``run.out = out``,
    ``flower.overwrite = true``) that ``app_dir``'s app lists, strings quoted."""
    flat = run_config_from_config(config, FlowerOptions(overwrite=True))
    flat["run.out"] = str(out)
    known = app_keys(app_dir)
    parts = []
    for key, value in flat.items():
        if key not in known:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = f"'{value}'"
        else:
            text = repr(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def make_certificates(folder: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1")) -> Path:
    """CA and SuperLink certificate for ``hosts`` via ``scripts/flower_certificates.sh``.

    Returns ``folder`` (holding ``ca.crt``, ``server.pem``, ``server.key``).
    """
    script = Path(__file__).resolve().parents[3] / "scripts" / "flower_certificates.sh"
    if not script.exists():
        raise FileNotFoundError(f"{script} (run from a checkout of the repository)")
    subprocess.run(
        ["bash", str(script), str(folder), *hosts], check=True, capture_output=True, timeout=60
    )
    return folder


class LoopbackDeployment:
    """SuperLink + ``num_nodes`` SuperNodes (+ warm workers) on 127.0.0.1.

    Parameters
    ----------
    workdir : Path
        Logs, ``FLWR_HOME`` and certificates go here.
    num_nodes : int
        SuperNodes, one per partition (``partition-id=i num-partitions=num_nodes``).
    warm : bool, default False
        SuperNodes with ``--isolation process`` and one ``fedalign flower-worker`` each
        (default: Flower's ``--isolation subprocess``, a process per message).
    fast_poll : bool or None, default None
        Start the SuperNodes as ``fedalign flower-supernode`` (Flower's SuperNode asking the
        SuperLink every 0.1 s instead of 3 s, :mod:`fedalign.flower.supernode`) instead of
        ``flower-supernode``. None: as ``warm``.
    tls : bool, default False
        TLS between the SuperNodes / the CLI and the SuperLink (self-signed CA).
    env : mapping, optional
        Environment of every process (default: this process's), plus the Flower settings
        that keep a run offline and local.
    """

    def __init__(
        self,
        workdir: Path,
        num_nodes: int,
        *,
        warm: bool = False,
        tls: bool = False,
        fast_poll: bool | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.num_nodes = num_nodes
        self.warm = warm
        self.tls = tls
        self.fast_poll = warm if fast_poll is None else fast_poll
        self.bin = Path(sys.executable).parent
        self.env = dict(os.environ if env is None else env)
        self.env.update(
            {
                "FLWR_HOME": str(self.workdir / "flwr-home"),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_TELEMETRY_ENABLED": "0",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PATH": f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}",
            }
        )
        self.processes: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self.port = 0

    # ------------------------------------------------------------------ processes
    def _tool(self, name: str) -> str:
        path = self.bin / name
        return str(path) if path.exists() else name

    def _start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        self._logs.append(log)
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
            start_new_session=True,  # its own process group: stopped as one
        )
        self.processes.append(process)
        return process

    def start(self, timeout: float = 120.0) -> None:
        """Start the SuperLink, wait for its port, then the SuperNodes (and workers)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        certs = self.workdir / "certs"
        link_tls = ["--insecure"]
        node_tls = ["--insecure"]
        if self.tls:
            make_certificates(certs)
            link_tls = [
                "--ssl-ca-certfile",
                str(certs / "ca.crt"),
                "--ssl-certfile",
                str(certs / "server.pem"),
                "--ssl-keyfile",
                str(certs / "server.key"),
            ]
            node_tls = ["--root-certificates", str(certs / "ca.crt")]
        self.port = free_port()
        link = self._start(
            "superlink",
            [self._tool("flower-superlink"), *link_tls, "--port", str(self.port)],
        )
        wait_for_port(self.port, timeout, link)
        self._write_connection(certs / "ca.crt" if self.tls else None)
        for i in range(self.num_nodes):
            runtime_port = free_port()
            isolation = ["--isolation", "process"] if self.warm else []
            supernode = (
                [sys.executable, "-m", "fedalign.cli", "flower-supernode"]
                if self.fast_poll
                else [self._tool("flower-supernode")]
            )
            self._start(
                f"supernode-{i}",
                [
                    *supernode,
                    *node_tls,
                    "--superlink",
                    f"127.0.0.1:{self.port}",
                    "--port",
                    str(runtime_port),
                    *isolation,
                    "--node-config",
                    f"partition-id={i} num-partitions={self.num_nodes}",
                ],
            )
            if self.warm:
                self._start(
                    f"worker-{i}",
                    [
                        sys.executable,
                        "-m",
                        "fedalign.cli",
                        "flower-worker",
                        "--runtime-api-address",
                        f"127.0.0.1:{runtime_port}",
                        "--insecure",
                    ],
                )

    def _write_connection(self, ca: Path | None) -> None:
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{ca}"' if ca is not None else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{self.port}"\n{security}\n',
            encoding="utf-8",
        )

    def run(
        self, app_dir: Path, run_config: str, *, timeout: float = 1800.0
    ) -> subprocess.CompletedProcess[str]:
        """``flwr run APP_DIR loopback --stream --run-config RUN_CONFIG`` (waits)."""
        return subprocess.run(
            [
                self._tool("flwr"),
                "run",
                str(app_dir),
                FEDERATION,
                "--stream",
                "--run-config",
                run_config,
            ],
            env=self.env,
            cwd=app_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every process group started here, then SIGKILL what is left."""
        for process in self.processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        for process in self.processes:
            # the group may outlive its leader (SuperExec, ClientApp children)
            _signal_group(process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        self.processes.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> LoopbackDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    # the group the process leads (start_new_session); gone already is fine
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)
