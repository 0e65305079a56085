"""Collect a benchmark's results from its cache: one row per dataset, method, sites and seed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scfedvi.benchmark.methods import METHODS

if TYPE_CHECKING:
    from scfedvi.benchmark.cache import ResultCache
    from scfedvi.benchmark.runner import BenchmarkRun, Job

#: The first columns of ``results.csv``, in order.
ID_COLUMNS = ("dataset", "method", "label", "n_sites", "seed")
#: Privacy columns of ``results.csv`` (see :mod:`scfedvi.benchmark.mia` and docs/dp.md).
PRIVACY_COLUMNS = ("epsilon", "delta", "noise_multiplier", "mia_auc", "mia_tpr_at_1fpr")


def _row(ident: tuple, job: Job, meta: dict[str, Any], metrics: dict[str, Any]) -> dict:
    dataset, n_sites, method, seed = ident
    info = meta.get("info", {})
    epochs = info.get("epochs")
    row: dict[str, Any] = {
        "dataset": dataset,
        "method": method,
        "label": METHODS[method].label,
        "n_sites": n_sites,
        "seed": seed,
    }
    row.update(metrics)
    b = meta.get("bytes")
    row.update(
        {
            "train_seconds": meta.get("seconds"),
            "bytes": np.nan if b is None else b,
            "rounds": info.get("rounds"),
            "local_epochs": info.get("local_epochs"),
            "epochs": epochs if not isinstance(epochs, dict) else max(epochs.values()),
            "n_genes": info.get("n_genes"),
            # privacy (federated methods; NaN otherwise): the DP guarantee over the run
            # (epsilon inf without DP) and the membership-inference attack on the global model
            **{k: info.get(k, np.nan) for k in PRIVACY_COLUMNS},
            "batch_key": job.dataset.batch_key,
            "label_key": job.dataset.label_key,
            "cache_key": job.key,
        }
    )
    return row


def collect(
    entries: list[tuple[tuple, Job]],
    obs: dict[tuple, pd.DataFrame],
    cache: ResultCache,
    computed: dict[str, int],
    n_jobs: int,
    seconds: float,
    *,
    other_code: bool = False,
) -> BenchmarkRun:
    """Read every entry's embedding metadata and evaluation from ``cache``.

    With ``other_code``, an entry missing for the current core code (or metrics code) is
    replaced by one computed with another version of it, flagged ``other_code`` in its row.
    """
    from scfedvi.benchmark.runner import BenchmarkRun

    rows: list[dict] = []
    curves: list[dict] = []
    histories: dict[tuple, pd.DataFrame] = {}
    umaps: dict[tuple, dict[str, np.ndarray]] = {}
    missing: list[tuple] = []
    first_seed = min((ident[3] for ident, _ in entries), default=0)
    for ident, job in entries:
        key = job.key
        eval_key = next((k for k in job.eval_keys if cache.has_eval(key, k)), None)
        stale = False
        if eval_key is None and other_code:
            if not cache.has_embedding(key):
                key = cache.find_other_code(job.key_parts) or key
            eval_key = cache.any_eval(key, job.scib) if cache.has_embedding(key) else None
            stale = eval_key is not None
        if eval_key is None:
            missing.append(ident)
            continue
        ev = cache.load_eval(key, eval_key)
        meta = cache.meta(key)
        rows.append(_row(ident, job, meta, ev["metrics"]) | {"cache_key": key, "other_code": stale})
        dataset, n_sites, method, seed = ident
        for point in ev["curve"]:
            curves.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "label": METHODS[method].label,
                    "n_sites": n_sites,
                    "seed": seed,
                    **point,
                }
            )
        history = cache.load_history(key)
        if history is not None:
            histories[ident] = history
        if seed == first_seed and ev["umap"] is not None:
            umaps.setdefault((dataset, n_sites), {})[METHODS[method].label] = ev["umap"]
    results = pd.DataFrame(rows)
    if not results.empty:
        order = [c for c in ID_COLUMNS if c in results] + [
            c for c in results.columns if c not in ID_COLUMNS
        ]
        results = results[order]
    return BenchmarkRun(
        results=results,
        curves=pd.DataFrame(curves),
        histories=histories,
        umaps=umaps,
        obs=obs,
        n_jobs=n_jobs,
        computed=computed,
        missing=missing,
        seconds=seconds,
    )
