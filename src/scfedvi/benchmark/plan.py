"""The benchmark's plan: settings, and one :class:`Job` per embedding with its cache keys.

Methods that do not use the partition (pooled methods) share one job across numbers of sites;
the scFedVI methods' keys include the hash of the core code they run, the baselines' the hash of
``benchmark/baselines.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from scfedvi import __version__
from scfedvi.benchmark.cache import hash_key
from scfedvi.benchmark.methods import (
    BASELINE_CODE,
    CORE_CODE,
    METHODS,
    federated_runner_hash,
    source_hash,
    tool_version,
)
from scfedvi.benchmark.task import (
    SITE_KEY,
    DatasetSpec,
    eval_adata,
    fingerprint,
    load_data,
    make_partition,
    read_partition_file,
    select_genes,
)

#: Genes kept when ``n_top_genes="auto"``: every gene up to this many, else this many HVGs.
AUTO_TOP_GENES = 2000


@dataclass(frozen=True)
class BenchmarkSettings:
    """A benchmark: what to run, on what, how.

    Parameters
    ----------
    datasets
        Data sets (see :func:`~scfedvi.benchmark.task.resolve_dataset`).
    clients
        Numbers of sites.
    methods
        Method names (:data:`~scfedvi.benchmark.methods.METHODS`).
    seeds
        Seeds of the methods (the partitions are fixed, seed 0).
    partition
        ``"paper"`` (pancreas/cortex, else automatic), ``"auto"`` (whole batches, balanced by
        cell count) or a JSON file ``{site: [batch values]}``.
    quick
        The smoke-test schedule (few rounds and epochs, small data).
    scib
        Compute the scIB metrics (fast subset in quick mode).
    n_top_genes
        Genes for every method: ``"auto"`` (all up to 2,000, else 2,000 highly variable),
        ``None`` (all) or a number.
    """

    datasets: tuple[DatasetSpec, ...]
    clients: tuple[int, ...] = (2, 3, 5)
    methods: tuple[str, ...] = (
        "scfedvi",
        "fedavg",
        "scvi-per-site",
        "scvi-pooled",
        "harmony",
        "pca",
    )
    seeds: tuple[int, ...] = (0,)
    partition: str = "paper"
    quick: bool = False
    scib: bool = True
    n_top_genes: int | str | None = "auto"


@dataclass(frozen=True)
class Job:
    """One embedding and its evaluation."""

    dataset: DatasetSpec
    n_sites: int
    partition: tuple[tuple[str, tuple[str, ...]], ...]
    method: str
    seed: int
    genes: tuple[str, ...]
    n_top_genes: int | None
    quick: bool
    scib: bool
    key: str
    eval_keys: tuple[str, ...]
    key_parts: dict[str, Any] = field(hash=False, compare=False)


def _n_top(setting: int | str | None, n_vars: int) -> int | None:
    if setting == "auto":
        return None if n_vars <= AUTO_TOP_GENES else AUTO_TOP_GENES
    if setting is None or int(setting) <= 0 or int(setting) >= n_vars:
        return None
    return int(setting)


def _partitions(settings: BenchmarkSettings, spec: DatasetSpec, adata) -> dict[int, dict]:
    if settings.partition in ("paper", "auto"):
        return {
            n: make_partition(spec, adata, n, mode=settings.partition) for n in settings.clients
        }
    groups = read_partition_file(settings.partition)
    return {
        n: make_partition(spec, adata, n, mode="groups", groups=g)
        for n, g in sorted(groups.items())
    }


def plan(settings: BenchmarkSettings) -> tuple[list[tuple[tuple, Job]], dict[tuple, pd.DataFrame]]:
    """Every (dataset, n_sites, method, seed) with its job, and each partition's cell ``obs``."""
    entries, obs = [], {}
    core, metrics_code = source_hash(*CORE_CODE), source_hash("metrics")
    baseline_code = source_hash(*BASELINE_CODE)
    runner = federated_runner_hash()
    for spec in settings.datasets:
        adata = load_data(spec)
        n_top = _n_top(settings.n_top_genes, adata.n_vars)
        for n_sites, part in _partitions(settings, spec, adata).items():
            cells = eval_adata(adata, part)
            obs[(spec.name, n_sites)] = cells.obs[[spec.batch_key, spec.label_key, SITE_KEY]]
            data_fp = fingerprint(cells, [spec.batch_key, spec.label_key])
            obs[(spec.name, n_sites)].attrs["data_sha256"] = data_fp  # named in the report
            genes = tuple(select_genes(cells, spec.batch_key, n_top))
            part_fp = hash_key({"partition": part})
            for name in settings.methods:
                method = METHODS[name]
                for seed in settings.seeds:
                    parts = {
                        "data": data_fp,
                        "partition": part_fp if method.uses_partition else None,
                        "method": name,
                        "settings": method.settings(settings.quick),
                        "seed": seed,
                        "genes": hash_key({"genes": genes}),
                        "batch_key": spec.batch_key,
                        "versions": {
                            "scfedvi": __version__,
                            method.tool: tool_version(method.tool),
                        },
                    }
                    if method.kind == "federated":
                        parts["code"] = core
                        parts["runner"] = runner
                    else:
                        parts["code"] = baseline_code
                    key = hash_key(parts)
                    # The evaluation to compute first; without scIB, one with scIB also serves.
                    evals = [{"scib": settings.scib, "fast": settings.quick}]
                    if not settings.scib:
                        evals.append({"scib": True, "fast": settings.quick})
                    eval_keys = tuple(
                        hash_key(
                            {
                                "embedding": key,
                                "label_key": spec.label_key,
                                **e,
                                "scfedvi": __version__,
                                "metrics_code": metrics_code,
                            }
                        )
                        for e in evals
                    )
                    part_t = tuple((s, tuple(c)) for s, c in part.items())
                    job = Job(
                        spec,
                        n_sites,
                        part_t,
                        name,
                        seed,
                        genes,
                        n_top,
                        settings.quick,
                        settings.scib,
                        key,
                        eval_keys,
                        parts,
                    )
                    entries.append(((spec.name, n_sites, name, seed), job))
    return entries, obs
