"""The ``fedalign`` command line.

Subcommands:

* ``fedalign run``: one experiment from a TOML config plus command-line overrides;
* ``fedalign compare``: several strategies on the identical partition and seed, with a
  results table and a convergence plot;
* further subcommands (``benchmark``, ``report``, ``bench``) are registered by their modules.

Every option maps onto a key of :class:`~fedalign.config.ExperimentConfig`; ``--set
section.key=value`` reaches any key that has no option of its own.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedalign.config import ConfigError, ExperimentConfig

# option name -> (config key, type, help)
OVERRIDES: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "strategy": ("strategy.name", str, "fedavg, fedprox, fedmoe, fedalign, fedadam or fedyogi"),
    "ablation": (
        "strategy.ablation",
        str,
        "FedAlign-MoE ablation row: fedavg, uniform-align, consistency, overlap-only, "
        "margin-only, adaptive-reg, full, full-sound",
    ),
    "model": ("model.name", str, "upcycled-minilm, a tiny-* test model, a hub id or a folder"),
    "trainable": ("model.trainable", str, "all, moe+head or lora"),
    "dataset": ("data.dataset", str, "wordnet-supersense, ag_news, or a .csv/.jsonl path"),
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


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Defaults, then the TOML file, then named options, then ``--set`` overrides."""
    config = ExperimentConfig.from_toml(args.config) if args.config else ExperimentConfig()
    for option, (key, _kind, _text) in OVERRIDES.items():
        value = getattr(args, option.replace("-", "_"), None)
        if value is not None:
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
def _cmd_run(args: argparse.Namespace) -> int:
    from fedalign.simulation import run_experiment

    if args.resume:
        folder = Path(args.resume)
        config_path = folder / "config.toml"
        if not config_path.exists():
            raise ConfigError(f"--resume {str(folder)!r}: no config.toml there")
        config = ExperimentConfig.from_toml(config_path)
        config.apply_overrides(args.overrides)
        if args.rounds:
            config.federated.rounds = args.rounds
        config.validate()
        summary = run_experiment(config, folder, resume=True)
    else:
        config = config_from_args(args)
        summary = run_experiment(config, config.run.out or None)
    print(
        f"{summary.strategy}: final accuracy {summary.final_accuracy:.4f} after "
        f"{summary.rounds} rounds ({summary.seconds:.1f}s); records in {summary.out_dir}"
    )
    return 0


# --------------------------------------------------------------------------- compare
def parse_strategy_list(text: str) -> list[tuple[str, str]]:
    """Parse ``"fedavg,fedalign:consistency"`` into ``(strategy, ablation)`` pairs."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, ablation = item.partition(":")
        out.append((name, ablation or "full"))
    if not out:
        raise ConfigError("--strategies must name at least one strategy")
    return out


def _cmd_compare(args: argparse.Namespace) -> int:
    from fedalign.compare import run_comparison

    config = config_from_args(args)
    strategies = parse_strategy_list(args.strategies)
    out = Path(config.run.out or "runs/compare")
    result = run_comparison(config, strategies, out)
    print(result.markdown)
    print(f"table: {out / 'results.md'}  plot: {out / 'convergence.png'}")
    return 0


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
    )
    add_experiment_options(run)
    run.add_argument("--resume", type=Path, help="continue a run folder from its checkpoint")
    run.set_defaults(handler=_cmd_run)

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
    compare.set_defaults(handler=_cmd_compare)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[Any], None]]:
    """Subcommands contributed by other modules (benchmark, report, bench, flower)."""
    registered: list[Callable[[Any], None]] = []
    for module_name in ("fedalign.benchmark", "fedalign.report", "fedalign.bench"):
        try:
            module = __import__(module_name, fromlist=["register_cli"])
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        registered.append(module.register_cli)
    return registered


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    # the load report of the upcycled encoder lists the unused pooler: not news to users
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except ConfigError as error:
        print(f"fedalign: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
