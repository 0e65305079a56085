"""Helpers of the benchmark tests: the ``scfedvi benchmark`` parser, and a small own .h5ad."""

from __future__ import annotations

import argparse

import pandas as pd
import pytest

from scfedvi.benchmark.cli import add_benchmark_parser, run_benchmark_command


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``scfedvi benchmark ARGV`` as the lead's ``cli.py`` will."""
    parser = argparse.ArgumentParser(prog="scfedvi")
    add_benchmark_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["benchmark", *argv])


def run_cli(argv: list[str]) -> int:
    """Run ``scfedvi benchmark ARGV`` in this process; returns the exit code."""
    return run_benchmark_command(parse(argv))


def read_results(out) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv")


@pytest.fixture
def own_h5ad(tmp_path):
    """An .h5ad of counts with custom keys: obs['lab'] (4 labs), obs['ctype'] (3 types)."""
    from scfedvi.data import simulate

    a = simulate(n_cells=320, n_genes=100, n_batches=4, n_cell_types=3, seed=1, n_jobs=1)
    a.obs = a.obs.rename(columns={"batch": "lab", "cell_type": "ctype"})
    path = tmp_path / "own.h5ad"
    a.write_h5ad(path)
    return path
