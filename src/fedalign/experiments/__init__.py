"""Experiments built on the layers below: one run, comparisons, benchmarks, reports."""

from fedalign.experiments.run import Simulation, default_out_dir, run_experiment

__all__ = ["Simulation", "default_out_dir", "run_experiment"]
