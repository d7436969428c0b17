"""How far factor averaging (FedIT) is from the exact mean of LoRA products.

The measurement is ``fedalign bench --suite lora-error``
(:mod:`fedalign.experiments.bench.lora_error`); this script keeps the original command line.
Equivalent commands::

    OMP_NUM_THREADS=1 fedalign bench --suite lora-error --out-dir benchmarks/results/lora
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lora_error.py --out benchmarks/results/lora
    python benchmarks/lora_error.py --models tiny-qwen3moe --ranks 4 --rounds 1   # a quick look

Writes ``error.md``, ``error.json`` and appends the command to ``COMMAND.txt`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

from fedalign.config import ExperimentConfig
from fedalign.experiments.bench import BenchRequest, get_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/lora")
    parser.add_argument("--models", default="tiny-qwen3moe,upcycled-minilm")
    parser.add_argument("--ranks", default="2,4,8,16")
    parser.add_argument("--lrs", default="0.001,0.01")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--examples", type=int, default=400)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    suite = get_suite("lora-error")
    config = ExperimentConfig()
    config.apply_overrides(suite.defaults)
    config.federated.rounds = args.rounds
    config.partition.num_clients = args.clients
    config.train.local_steps = args.local_steps
    config.data.max_train_examples = args.examples
    options = {
        "models": args.models.split(","),
        "ranks": [int(r) for r in args.ranks.split(",")],
        "lrs": [float(x) for x in args.lrs.split(",")],
        "out_dir": args.out,
    }
    command = "OMP_NUM_THREADS=1 PYTHONPATH=src python " + " ".join(sys.argv)
    request = BenchRequest(config, options, lambda line: print(line, flush=True), command)
    print(suite.run(request))


if __name__ == "__main__":
    main()
