"""Issue 14: where does one Flower ClientApp ``train`` message spend its time?

A deployed SuperNode (Flower 1.41, ``--isolation subprocess``) starts a fresh
``flwr-clientapp`` process for every message. This script reproduces what such a process
does with our app, minus Flower's own process start and transport: it imports
``fedalign.flower.client_app`` and hands ``--messages`` train messages (as the ServerApp
builds them, rounds 1, 2, ...) to the ClientApp in **one** fresh process, under
``cProfile``. The first message is the cold one (every message of a cold deployment); the
later ones are what a warm ClientApp process pays.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/flower_profile.py \
        --config configs/demo.toml --set partition.num-clients=3 --messages 2 \
        --out benchmarks/results/flower

Writes ``profile.md`` (phases and the top functions of the cold message) under ``--out``.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

HEADER = "| message | seconds | what |\n|---|---|---|"


def _config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from fedalign.config import ExperimentConfig

    config = ExperimentConfig.from_toml(args.config) if args.config else ExperimentConfig()
    for item in args.set:
        key, _, value = item.partition("=")
        config.set(key, value)
    config.run.threads = 1
    config.run.progress = False
    config.validate()
    return config


def server_side(args: argparse.Namespace, path: Path) -> None:
    """What the ServerApp sends in round 1, saved for the cold process."""
    import torch

    from fedalign.client import prepare
    from fedalign.federation import ServerState, strategy_from_config
    from fedalign.flower.messages import model_fingerprint

    config = _config(args)
    torch.set_num_threads(1)
    prepared = prepare(config, include_train=False)
    server = ServerState(
        strategy_from_config(config, prepared.model.layout), prepared.model.trainable_state()
    )
    instructions = server.instructions(1, [args.partition])[args.partition]
    torch.save(
        {
            "global": server.global_parameters,
            "instructions": instructions,
            "fingerprint": model_fingerprint(prepared.model),
        },
        path,
    )


def client_side(args: argparse.Namespace, path: Path) -> None:
    """A fresh process: import the ClientApp, then ``--messages`` train messages."""
    profiler = cProfile.Profile()
    profiler.enable()
    imported = time.perf_counter()
    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedalign.flower import client_app
    from fedalign.flower.messages import (
        ARRAYS_KEY,
        CONFIG_KEY,
        FINGERPRINT_KEY,
        PARTITION_ID_KEY,
        SERVER_ROUND_KEY,
        encode_instructions,
        encode_state,
        run_config_from_config,
    )

    import_seconds = time.perf_counter() - imported
    # what flwr-clientapp sets from the task it pulled
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    import torch

    payload = torch.load(path, weights_only=False)
    config = _config(args)
    context = Context(
        run_id=1,
        node_id=1,
        node_config={
            "partition-id": args.partition,
            "num-partitions": config.partition.num_clients,
        },
        state=RecordDict(),
        run_config=run_config_from_config(config),
    )
    rows = [("python start to `main`", time.perf_counter() - _STARTED - import_seconds, "")]
    rows.append(("import torch, flwr, fedalign.flower.client_app", import_seconds, ""))
    for server_round in range(1, args.messages + 1):
        started = time.perf_counter()
        train_config = ConfigRecord(
            {
                SERVER_ROUND_KEY: server_round,
                PARTITION_ID_KEY: args.partition,
                FINGERPRINT_KEY: payload["fingerprint"],
            }
        )
        content = RecordDict(
            {ARRAYS_KEY: encode_state(payload["global"]), CONFIG_KEY: train_config}
        )
        for key, record in encode_instructions(payload["instructions"]).items():
            content[key] = record
        metadata = Metadata(
            run_id=1,
            message_id=f"m{server_round}",
            src_node_id=0,
            dst_node_id=1,
            reply_to_message_id="",
            group_id=str(server_round),
            created_at=time.time(),
            ttl=3600.0,
            message_type=MessageType.TRAIN,
        )
        message = Message(content=content, metadata=metadata)
        built = time.perf_counter()
        runtime_before = time.perf_counter()
        client_app.client_runtime(context)
        runtime_seconds = time.perf_counter() - runtime_before
        reply = client_app.app(message=message, context=context)
        assert not reply.has_error(), reply.error
        total = time.perf_counter() - started
        kind = "cold" if server_round == 1 else "warm"
        rows.append(
            (
                f"{server_round} ({kind})",
                total,
                f"build message {built - started:.2f} s; `client_runtime` (config, data, "
                f"model, prefix cache) {runtime_seconds:.2f} s; train + reply "
                f"{total - (built - started) - runtime_seconds:.2f} s",
            )
        )
        if server_round == 1:
            profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("cumulative").print_stats(args.top)
    table = "\n".join(f"| {name} | {seconds:.2f} | {what} |" for name, seconds, what in rows)
    report = (
        f"{HEADER}\n{table}\n\ncProfile of the process up to the end of message 1 "
        f"(cumulative, top {args.top}):\n\n```\n{_trim(stream.getvalue())}\n```\n"
    )
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / args.name).write_text(
            f"# One ClientApp process, {args.messages} train messages\n\n"
            f"Command: `{' '.join(sys.argv)}` (config {args.config}, set {args.set}, "
            f"partition {args.partition}).\n\n{report}",
            encoding="utf-8",
        )


def _trim(text: str) -> str:
    """pstats output without its preamble, paths shortened to the package."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    out = []
    for line in lines[start:]:
        for marker in ("site-packages/", "/src/", "python3.11/"):
            if marker in line:
                head, _, tail = line.partition(" ")
                prefix = line[: line.rfind(" ") + 1]
                path = line[len(prefix) :]
                if marker in path:
                    path = path.split(marker, 1)[1]
                line = prefix + path
                del head, tail
                break
        out.append(line.rstrip())
    return "\n".join(out).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--set", action="append", default=[], help="section.key=value")
    parser.add_argument("--partition", type=int, default=0)
    parser.add_argument("--messages", type=int, default=2)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", default="")
    parser.add_argument("--name", default="profile.md")
    parser.add_argument("--client-side", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_side:
        client_side(args, Path(args.client_side))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "round1.pt"
        server_side(args, path)
        # the cold ClientApp: a fresh interpreter, as flwr-clientapp is
        subprocess.run([sys.executable, *sys.argv, "--client-side", str(path)], check=True)


if __name__ == "__main__":
    main()
