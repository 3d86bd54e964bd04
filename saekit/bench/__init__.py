"""Benchmarks run from the command line (``saekit bench ...``): each is one module with a typed config, a
function that returns a JSON-ready dict, and its CLI entry point."""

from saekit.bench.synthetic import SyntheticBenchConfig, run_synthetic_bench

__all__ = ["SyntheticBenchConfig", "run_synthetic_bench"]
