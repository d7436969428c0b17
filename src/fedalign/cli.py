"""The ``fedalign`` command line.

Subcommands:

* ``fedalign run``: one experiment from a TOML config plus command-line overrides;
* ``fedalign compare``: several strategies on the identical partition and seed, with a
  results table and a convergence plot;
* ``fedalign benchmark``: the paper's grid of strategies x alphas x seeds;
* ``fedalign report``: figures of routers and experts for a run folder;
* ``fedalign bench``: speed, memory and backbone measurements (:mod:`fedalign.experiments.bench`);
* ``fedalign flower-worker``: a warm ClientApp executor beside a deployed Flower SuperNode
  (:mod:`fedalign.flower.worker`);
* ``fedalign flower-supernode``: Flower's ``flower-supernode`` (its options passed on) with
  settable waits (:mod:`fedalign.flower.supernode`).

This is the only module that sees argparse: the subcommands turn their options into typed
arguments of :mod:`fedalign.experiments` (e.g. :class:`~fedalign.experiments.BenchmarkOptions`).

Every option maps onto a key of :class:`~fedalign.config.ExperimentConfig`; ``--set
section.key=value`` reaches any key that has no option of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedalign import experiments
from fedalign.config import (
    ConfigError,
    ExperimentConfig,
    default_variant,
    strategy_names,
    strategy_options,
)
from fedalign.errors import FedAlignError
from fedalign.experiments import bench
from fedalign.experiments.run import run_experiment

# option name -> (config key, type, help)
OVERRIDES: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "strategy": ("strategy.name", str, "a registered strategy (see the list below)"),
    "ablation": (
        "strategy.ablation",
        str,
        "FedAlign-MoE ablation row: fedavg, uniform-align, consistency, overlap-only, "
        "margin-only, adaptive-reg, full, full-sound",
    ),
    "model": ("model.name", str, "upcycled-minilm, a tiny-* test model, a hub id or a folder"),
    "trainable": ("model.trainable", str, "all, moe+head or lora"),
    "dataset": (
        "data.dataset",
        str,
        "wordnet-supersense, ag_news, a .csv/.jsonl path, or multiple choice: mmlu, hellaswag",
    ),
    "data-path": (
        "data.path",
        str,
        "mmlu/hellaswag: a local .jsonl in the hub schema, or 'sample' (shipped)",
    ),
    "text-column": ("data.text_column", str, "text column of a CSV/JSONL dataset"),
    "label-column": ("data.label_column", str, "label column of a CSV/JSONL dataset"),
    "max-train-examples": ("data.max_train_examples", int, "cap on pooled training examples"),
    "max-test-examples": ("data.max_test_examples", int, "cap on the global test set"),
    "partition": ("partition.method", str, "dirichlet, pathological or iid"),
    "clients": ("partition.num_clients", int, "number of clients"),
    "alpha": ("partition.alpha", float, "Dirichlet concentration (smaller = more skewed)"),
    "rounds": ("federated.rounds", int, "federated rounds"),
    "fraction": ("federated.fraction", float, "fraction of clients sampled per round"),
    "seed": ("federated.seed", int, "seed of everything"),
    "lr": ("train.lr", float, "client learning rate"),
    "batch-size": ("train.batch_size", int, "client batch size"),
    "local-epochs": ("train.local_epochs", int, "local epochs per round"),
    "local-steps": ("train.local_steps", int, "local steps per round (overrides epochs)"),
    "routing-lambda": ("strategy.routing_lambda", float, "routing regulariser weight"),
    "proximal-mu": ("strategy.proximal_mu", float, "FedProx mu"),
    "device": ("run.device", str, "cpu, auto, cuda or cuda:N"),
    "precision": ("run.precision", str, "fp32, bf16 (autocast) or auto"),
}


def add_experiment_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that runs experiments."""
    parser.add_argument("--config", type=Path, help="TOML config file (hyphenated keys)")
    for option, (key, kind, text) in OVERRIDES.items():
        parser.add_argument(
            f"--{option}", dest=option.replace("-", "_"), type=kind, help=f"{text} [{key}]"
        )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config key, e.g. --set strategy.beta=0.5 (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="run folder [run.out]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, help="torch threads [run.threads]")


def named_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``section.key`` -> value of the named options given on the command line."""
    settings = {}
    for option, (key, _kind, _text) in OVERRIDES.items():
        value = getattr(args, option.replace("-", "_"), None)
        if value is not None:
            settings[key] = value
    return settings


def config_from_args(
    args: argparse.Namespace, *, config_file: str | None = None, defaults: Sequence[str] = ()
) -> ExperimentConfig:
    """Defaults, then the TOML file (``--config``, else ``config_file``), then ``defaults``
    (``section.key=value``), then named options, then ``--set`` overrides."""
    path = args.config or config_file
    config = ExperimentConfig.from_toml(path) if path else ExperimentConfig()
    config.apply_overrides(defaults)
    for key, value in named_settings(args).items():
        config.set(key, value)
    config.apply_overrides(args.overrides)
    if getattr(args, "out", None):
        config.run.out = str(args.out)
    if getattr(args, "no_progress", False):
        config.run.progress = False
    if getattr(args, "threads", None):
        config.run.threads = args.threads
    config.validate()
    return config


# ------------------------------------------------------------------------------- run
def strategy_help() -> str:
    """Every registered strategy with its options and defaults (for ``--help``)."""
    lines = ["strategies and their options (set with --set strategy.KEY=VALUE):"]
    for name in strategy_names():
        options = [
            f"{item.name.replace('_', '-')}={item.default!r}"
            for item in dataclasses.fields(strategy_options(name))
        ]
        lines.append(f"  {name}: {', '.join(options) if options else '(no options)'}")
    return "\n".join(lines)


def _cmd_run(args: argparse.Namespace) -> int:
    if args.resume is not None and args.resume is not True:
        # --resume DIR: the folder's own config.toml, plus --set / --rounds
        folder = Path(args.resume)
        config_path = folder / "config.toml"
        if not config_path.exists():
            raise ConfigError(f"--resume {str(folder)!r}: no config.toml there")
        config = ExperimentConfig.from_toml(config_path)
        config.apply_overrides(args.overrides)
        if args.rounds:
            config.federated.rounds = args.rounds
        config.run.out = str(folder)
        if args.no_progress:
            config.run.progress = False
        config.validate()
        summary = run_experiment(config, folder, resume=True, overwrite=args.overwrite)
    elif args.resume is True:
        # --out DIR --resume: the command line's config, which must fit the checkpoint
        config = config_from_args(args)
        if not config.run.out:
            raise ConfigError("--resume without a folder needs --out DIR (or run.out)")
        summary = run_experiment(config, config.run.out, resume=True, overwrite=args.overwrite)
    else:
        config = config_from_args(args)
        summary = run_experiment(config, config.run.out or None, overwrite=args.overwrite)
    print(
        f"{summary.strategy}: final accuracy {summary.final_accuracy:.4f} after "
        f"{summary.rounds} rounds ({summary.seconds:.1f}s); records in {summary.out_dir}"
    )
    return 0


# --------------------------------------------------------------------------- compare
def parse_strategy_list(text: str) -> list[tuple[str, str]]:
    """Parse ``"fedavg,fedalign:consistency"`` into ``(strategy, ablation)`` pairs."""
    try:
        return experiments.parse_strategies(text.split(","))
    except ConfigError as error:
        raise ConfigError("--strategies must name at least one strategy") from error


def _cmd_compare(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    strategies = parse_strategy_list(args.strategies)
    out = Path(config.run.out or "runs/compare")
    result = experiments.run_comparison(
        config, strategies, out, resume=args.resume, overwrite=args.overwrite
    )
    print(result.markdown)
    print(f"table: {out / 'results.md'}  plot: {out / 'convergence.png'}")
    return 0


def _register_compare(sub: Any) -> None:
    compare = sub.add_parser(
        "compare",
        help="several strategies on the same partition and seed",
        description=(
            "Run several strategies on the identical partition and seed, print a results "
            "table and write it (Markdown, CSV) with a convergence plot."
        ),
    )
    add_experiment_options(compare)
    compare.add_argument(
        "--strategies",
        default="fedavg,fedprox,fedalign",
        help="comma-separated; 'fedalign:ROW' picks an ablation row (default: %(default)s)",
    )
    compare.add_argument(
        "--resume", action="store_true", help="continue the runs in --out from their checkpoints"
    )
    compare.add_argument(
        "--overwrite", action="store_true", help="replace the comparison held in --out"
    )
    compare.set_defaults(handler=_cmd_compare)


# ------------------------------------------------------------------------- benchmark
def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise ConfigError(f"--alphas expects comma-separated numbers (got {text!r})") from error
    if not values:
        raise ConfigError("--alphas must name at least one alpha")
    return values


def _grid_from_args(
    args: argparse.Namespace,
) -> tuple[list[float] | None, list[tuple[str, str]] | None]:
    """The alphas and strategies of ``--alphas`` / ``--alpha`` and ``--strategies`` / ...."""
    if args.alpha is not None and args.alphas:
        raise ConfigError("give --alpha or --alphas, not both")
    if args.strategy and args.strategies:
        raise ConfigError("give --strategy or --strategies, not both")
    alphas = _float_list(args.alphas) if args.alphas else None
    if alphas is None and args.alpha is not None:
        alphas = [args.alpha]
    strategies = parse_strategy_list(args.strategies) if args.strategies else None
    if strategies is None and args.strategy:
        strategies = [(args.strategy, args.ablation or default_variant(args.strategy))]
    elif strategies is None and args.ablation:
        strategies = [("fedalign", args.ablation)]
    return alphas, strategies


def benchmark_options(args: argparse.Namespace) -> experiments.BenchmarkOptions:
    """The typed options of ``fedalign benchmark``."""
    alphas, strategies = _grid_from_args(args)
    return experiments.BenchmarkOptions(
        suite=args.suite,
        quick=args.quick,
        seeds=args.seeds,
        first_seed=args.seed,
        alphas=alphas,
        strategies=strategies,
        config_file=args.config,
        settings=named_settings(args),
        overrides=list(args.overrides),
        out=args.out,
        progress=not args.no_progress,
        threads=args.threads,
        band=args.band,
        execute=not args.no_run,
        reports=not args.no_report,
        keep_states=args.keep_states,
        dry_run=args.dry_run,
        overwrite=args.overwrite,
        rerun_other_machines=args.rerun_other_machines,
    )


def _cmd_benchmark(args: argparse.Namespace) -> int:
    experiments.run_benchmark(benchmark_options(args))
    return 0


def _benchmark_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="apply the suite's [quick] size")
    parser.add_argument("--seeds", type=int, help="number of seeds (overrides the suite)")
    parser.add_argument("--alphas", help="comma-separated Dirichlet alphas (overrides the suite)")
    parser.add_argument(
        "--strategies", help="comma-separated, 'fedalign:ROW' for ablations (overrides the suite)"
    )
    parser.add_argument(
        "--band",
        choices=experiments.BAND_CHOICES,
        default="minmax",
        help="plot band across seeds: min-max or ± std (default: %(default)s)",
    )
    parser.add_argument(
        "--no-run", action="store_true", help="only aggregate the runs that already finished"
    )
    parser.add_argument(
        "--no-report", action="store_true", help="no per-run report pages under reports/"
    )
    parser.add_argument(
        "--keep-states",
        action="store_true",
        help="keep each finished run's checkpoint/ and final_state.safetensors (large)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the planned runs and their status"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace run folders that hold a run of another configuration",
    )
    parser.add_argument(
        "--rerun-other-machines",
        action="store_true",
        help="run again (replacing them) the finished or interrupted runs recorded on another "
        "machine or before provenance (provenance.json), so that the table comes from this one",
    )


def _register_benchmark(sub: Any) -> None:
    parser = sub.add_parser(
        "benchmark",
        help="the paper's grid: strategies x alphas x seeds, with tables and plots",
        description=(
            "Run a benchmark suite (benchmarks/<suite>.toml): every strategy at every "
            "Dirichlet alpha and seed. Finished runs are reused. Writes results.md/.csv "
            "(final-round accuracy: mean ± std and paired differences to the reference over "
            "seeds), convergence.png, divergence.png and COMMAND.txt. Experiment options "
            "override the suite's base config; --alpha, --strategy, --ablation and --seed "
            "narrow the grid to one value."
        ),
    )
    parser.add_argument(
        "--suite",
        default="main",
        help=f"{' or '.join(experiments.SUITE_NAMES)} (benchmarks/<name>.toml) or a suite "
        "TOML path (default: %(default)s)",
    )
    _benchmark_flags(parser)
    add_experiment_options(parser)
    for action in parser._actions:
        if "--out" in action.option_strings:
            action.help = "results folder (default: benchmarks/results/<suite>[-quick])"
    parser.set_defaults(handler=_cmd_benchmark)


# ---------------------------------------------------------------------------- report
def _cmd_report(args: argparse.Namespace) -> int:
    experiments.build_reports(args.run_dir, expert=args.expert, layer=args.layer)
    return 0


def _register_report(sub: Any) -> None:
    parser = sub.add_parser(
        "report",
        help="figures of routers and experts for a run folder (HTML page with PNGs)",
        description=(
            "Draw a run folder's routing and expert records: usage heatmaps before and after "
            "training, routing distribution over rounds, semantic similarity of clients per "
            "expert, who was merged into each expert, accuracy and divergence curves. "
            "Writes RUN_DIR/report/index.html (and report.md). A folder of runs (compare "
            "or benchmark output) gets one report per run and an index."
        ),
    )
    parser.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a run folder, or a folder of run folders"
    )
    parser.add_argument(
        "--expert", type=int, help="expert of the similarity figure (default: least-agreeing)"
    )
    parser.add_argument(
        "--layer", help="only this MoE layer: full name, unique part of it, or index"
    )
    parser.set_defaults(handler=_cmd_report)


# ----------------------------------------------------------------------------- bench
def _cmd_bench(args: argparse.Namespace) -> int:
    suite = bench.get_suite(args.suite)
    config = config_from_args(args, config_file=suite.config_file, defaults=suite.defaults)
    request = bench.BenchRequest(
        config=config,
        options={option.dest: getattr(args, option.dest) for option in suite.options},
        log=lambda line: print(line, flush=True),
        command="fedalign " + shlex.join(args.argv),
    )
    table = suite.run(request)
    print(table)
    if args.out_table:
        suite.write(table, Path(args.out_table))
    return 0


def bench_suites_help() -> str:
    """Every registered suite with its description and options (for ``--help``)."""
    lines = ["suites (--suite NAME) and their options:"]
    for suite in bench.SUITES.values():
        options = " ".join(f"--{option.name}" for option in suite.options)
        lines.append(f"  {suite.name}: {suite.description}" + (f" [{options}]" if options else ""))
        start = ([f"--config {suite.config_file}"] if suite.config_file else []) + [
            f"--set {item}" for item in suite.defaults
        ]
        if start:
            lines.append(f"    starts from: {' '.join(start)}")
    return "\n".join(lines)


def _add_suite_option(parser: argparse.ArgumentParser, option: bench.SuiteOption) -> None:
    if option.kind is None:
        parser.add_argument(f"--{option.name}", action="store_true", help=option.help)
    else:
        parser.add_argument(
            f"--{option.name}", type=option.kind, default=option.default, help=option.help
        )


def _register_bench(sub: Any) -> None:
    names = bench.suite_names()
    parser = sub.add_parser(
        "bench",
        help="speed and memory ratios of the design choices; the backbone comparison",
        description=bench.__doc__,
        epilog=bench_suites_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_experiment_options(parser)
    parser.add_argument(
        "--suite",
        choices=names,
        default=names[0],
        help="; ".join(f"{s.name}: {s.description}" for s in bench.SUITES.values()),
    )
    for option in bench.suite_options():
        _add_suite_option(parser, option)
    parser.add_argument("--out-table", type=Path, help="also write the table (Markdown) here")
    parser.set_defaults(handler=_cmd_bench)


# --------------------------------------------------------------------- flower-worker
def _cmd_flower_worker(args: argparse.Namespace) -> int:
    # Flower is an optional dependency: imported only by the command that needs it
    try:
        from fedalign.flower import worker
    except ImportError as error:
        raise FedAlignError(
            f"fedalign flower-worker needs Flower ({error}); pip install 'fedalign[flower]'"
        ) from error
    certificates = None
    if args.root_certificates is not None:
        if args.insecure:
            raise FedAlignError("--insecure and --root-certificates are mutually exclusive")
        certificates = Path(args.root_certificates).read_bytes()
    if not args.poll_interval > 0:
        raise FedAlignError(f"--poll-interval must be > 0 (got {args.poll_interval})")
    worker.serve_clientapp_tasks(
        args.runtime_api_address,
        insecure=certificates is None,
        root_certificates=certificates,
        poll_interval=args.poll_interval,
        max_poll_interval=args.max_poll_interval,
        max_tasks=args.max_tasks,
    )
    return 0


def _register_flower_worker(sub: Any) -> None:
    parser = sub.add_parser(
        "flower-worker",
        help="run a deployed SuperNode's ClientApp messages in one warm process",
        description=(
            "Serve the ClientApp tasks of a Flower SuperNode started with "
            "`flower-supernode --isolation process` in this one process, so the model and "
            "the partition's prepared data are built once instead of once per message "
            "(docs/flower.md, 'Warm ClientApps')."
        ),
    )
    parser.add_argument(
        "--runtime-api-address",
        default="127.0.0.1:9094",
        help="the SuperNode's Runtime API, host:port (its --port; default 127.0.0.1:9094)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP to the Runtime API (the default unless --root-certificates)",
    )
    parser.add_argument(
        "--root-certificates",
        metavar="PEM",
        help="CA certificate when the SuperNode serves its Runtime API with TLS",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.05,
        help="first wait (s) after a poll found no task; doubles (default 0.05)",
    )
    parser.add_argument(
        "--max-poll-interval",
        type=float,
        default=0.25,
        help="longest wait (s) between polls for a task (default 0.25)",
    )
    parser.add_argument(
        "--max-tasks", type=int, default=None, help="exit after this many tasks (default: never)"
    )
    parser.set_defaults(handler=_cmd_flower_worker)


# ------------------------------------------------------------------ flower-supernode
def _cmd_flower_supernode(args: argparse.Namespace) -> int:
    try:
        from fedalign.flower import supernode
    except ImportError as error:
        raise FedAlignError(
            f"fedalign flower-supernode needs Flower ({error}); pip install 'fedalign[flower]'"
        ) from error
    for name in ("idle_poll_interval", "idle_poll_max", "reply_poll_interval"):
        if not getattr(args, name) > 0:
            option = "--" + name.replace("_", "-")
            raise FedAlignError(f"{option} must be > 0 (got {getattr(args, name)})")
    try:
        supernode.run_supernode(
            args.flower_args,
            idle=args.idle_poll_interval,
            idle_max=max(args.idle_poll_max, args.idle_poll_interval),
            reply=args.reply_poll_interval,
        )
    except supernode.FlowerLoopChanged as error:
        raise FedAlignError(str(error)) from None
    return 0


def _register_flower_supernode(sub: Any) -> None:
    parser = sub.add_parser(
        "flower-supernode",
        help="Flower's flower-supernode, asking the SuperLink after 0.05-0.5 s instead of 3 s",
        description=(
            "Run Flower's `flower-supernode` with every option not listed here passed on "
            "unchanged (see `flower-supernode --help`), its two fixed waits replaced: "
            "3 s between requests to the SuperLink while no message waits (here from "
            "--idle-poll-interval, doubling up to --idle-poll-max), 0.5 s between looks "
            "for the ClientApp's reply (docs/flower.md, 'Warm ClientApps')."
        ),
        allow_abbrev=False,  # an abbreviated Flower option is Flower's, never ours
    )
    parser.add_argument(
        "--idle-poll-interval",
        type=float,
        default=0.05,
        help="first wait (s) after the SuperLink had no message (default 0.05; Flower: 3)",
    )
    parser.add_argument(
        "--idle-poll-max",
        type=float,
        default=0.5,
        help="longest such wait (s), reached by doubling (default 0.5)",
    )
    parser.add_argument(
        "--reply-poll-interval",
        type=float,
        default=0.02,
        help="seconds between looks for the ClientApp's reply (default 0.02; Flower: 0.5)",
    )
    parser.set_defaults(handler=_cmd_flower_supernode, flower_args=[])


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedalign",
        description=(
            "Federated fine-tuning of Mixture-of-Experts models under non-IID data: "
            "FedAlign-MoE and its baselines, simulated on one machine."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run one experiment",
        description="Run one federated experiment and write its run folder.",
        epilog=strategy_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_experiment_options(run)
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        type=Path,
        metavar="DIR",
        help="continue a run folder from its checkpoint: DIR with its own config.toml, or "
        "the --out folder with this command line's config (which must match)",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="replace the run held in the --out folder"
    )
    run.set_defaults(handler=_cmd_run)

    for register in (
        _register_compare,
        _register_benchmark,
        _register_report,
        _register_bench,
        _register_flower_worker,
        _register_flower_supernode,
    ):
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    # the load report of the upcycled encoder lists the unused pooler: not news to users
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "flower-supernode":  # it passes them on to Flower
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if unknown:
        args.flower_args = unknown
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code: int = args.handler(args)
        return code
    except FedAlignError as error:
        print(f"fedalign: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
