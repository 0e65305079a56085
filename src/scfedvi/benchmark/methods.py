"""The methods compared: scFedVI (default and variants) and the baselines, one function each.

Every method takes a :class:`~scfedvi.benchmark.task.Task` and returns a :class:`MethodResult`
whose embedding has one row per evaluation cell, in the task's cell order (NaN rows for cells a
method could not embed). :data:`METHODS` names them for the command line.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

import numpy as np
import pandas as pd

from scfedvi.benchmark.task import Task
from scfedvi.config import RunConfig

log = logging.getLogger(__name__)

#: scFedVI's schedule: (rounds, local epochs, KL warm-up epochs), the issue's measurement.
FULL_SCHEDULE = (20, 20, 400)
QUICK_SCHEDULE = (3, 1, 3)
#: Rounds at which the embedding is also evaluated (the quality-vs-communication curve).
FULL_CURVE_ROUNDS = (1, 2, 5, 10, 20)
QUICK_CURVE_ROUNDS = (1, 2, 3)
#: scFedVI's minibatch size in quick mode (small sites of the subsample).
QUICK_BATCH_SIZE = 16
#: scvi-tools' epochs in quick mode (``None`` in full mode: its default heuristic).
QUICK_SCVI_EPOCHS = 2


@dataclass
class MethodResult:
    """An embedding and what it cost.

    Attributes
    ----------
    embedding
        ``(n_cells, d)`` in the task's cell order.
    seconds
        Training (fitting) wall time.
    bytes
        Bytes communicated (parameters up and down, all sites and rounds); NaN when not
        federated.
    history
        scFedVI's history (one row per site and round), else ``None``.
    curve
        Intermediate embeddings: ``{"round", "epochs", "steps", "bytes", "seconds",
        "embedding"}`` per evaluated round.
    info
        Anything else worth recording (epochs, genes, ...).
    """

    embedding: np.ndarray
    seconds: float
    bytes: float = float("nan")
    history: pd.DataFrame | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A named method of the benchmark.

    Attributes
    ----------
    name
        Command-line name (``--methods``).
    label
        Name in tables and figures.
    kind
        ``"federated"``, ``"per_site"`` (both depend on the partition) or ``"pooled"`` (does not).
    settings
        ``settings(quick)``: the method's configuration (part of the cache key).
    run
        ``run(task, settings)``.
    tool
        The distribution whose version is part of the cache key.
    """

    name: str
    label: str
    kind: Literal["federated", "per_site", "pooled"]
    settings: Callable[[bool], dict[str, Any]]
    run: Callable[[Task, dict[str, Any]], MethodResult]
    tool: str = "scfedvi"

    @property
    def uses_partition(self) -> bool:
        return self.kind != "pooled"


def source_hash(*parts: str) -> str:
    """sha256 of scfedvi's own source files under ``parts`` (sub-packages or modules).

    Part of the cache key of the methods whose result depends on that code: the package
    version alone does not change between commits.
    """
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for part in parts:
        path = root / part
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


#: The code a federated run depends on (model, training, aggregation, data handling).
CORE_CODE = ("module", "train", "federation", "data", "model.py", "config.py", "_constants.py")

#: The code a baseline (scvi-tools, Harmony, PCA) runs through.
BASELINE_CODE = ("benchmark/baselines.py",)


def federated_runner_hash() -> str:
    """sha256 of the functions in this module that run a federated job (part of its key).

    Only these functions, not the whole module, so that adding a method to the registry does
    not invalidate every cached result.
    """
    import hashlib

    h = hashlib.sha256()
    for fn in (scfedvi_config, run_scfedvi, _embed_all, _comm):
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:16]


def tool_version(dist: str) -> str:
    """Installed version of a distribution (``"absent"`` if not installed)."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return "absent"


# -- scFedVI ---------------------------------------------------------------------------------
def scfedvi_settings(
    overrides: dict[str, dict[str, Any]],
    *,
    epochs_per_round: int | None = None,
    schedule: tuple[int, int, int] | None = None,
):
    """A settings function: the package defaults, the benchmark schedule (or ``schedule``:
    rounds, local epochs, KL warm-up, in full mode), then ``overrides``."""

    def settings(quick: bool) -> dict[str, Any]:
        rounds, epochs, warmup = QUICK_SCHEDULE if quick else (schedule or FULL_SCHEDULE)
        if epochs_per_round is not None:
            epochs, warmup = epochs_per_round, rounds * epochs_per_round
        d = RunConfig().to_dict()
        d["federation"]["n_rounds"] = rounds
        d["train"].update(local_epochs=epochs, n_epochs_kl_warmup=warmup)
        if quick:  # a 300-cell subsample has sites smaller than one minibatch of 128
            d["train"]["batch_size"] = QUICK_BATCH_SIZE
        for section, values in overrides.items():
            d[section].update(values)
        curve = QUICK_CURVE_ROUNDS if quick else FULL_CURVE_ROUNDS
        return {"config": d, "curve_rounds": [r for r in curve if r <= rounds]}

    return settings


def _embed_all(model: Any, task: Task) -> np.ndarray:
    from scfedvi._constants import LATENT_KEY

    Z: np.ndarray | None = None
    for name in task.sites:
        model.get_latent_representation(site=name, write=True)
        site = model.sites[name]
        z = np.asarray(site.obsm[LATENT_KEY], dtype=np.float32)
        if Z is None:
            Z = np.full((task.adata.n_obs, z.shape[1]), np.nan, dtype=np.float32)
        Z[task.adata.obs_names.get_indexer(site.obs_names)] = z
    assert Z is not None
    return Z


def _comm(history: pd.DataFrame, n_rounds: int) -> tuple[float, float]:
    """Bytes (up and down, all sites) and mean local steps per site over the first rounds."""
    h = history[history["round"] < n_rounds]
    total = float(h.get("bytes_up", pd.Series(dtype=float)).fillna(0).sum())
    total += float(h.get("bytes_down", pd.Series(dtype=float)).fillna(0).sum())
    steps = float(h.groupby("site")["steps"].sum().mean()) if "steps" in h else float("nan")
    return total, steps


def scfedvi_config(settings: dict[str, Any], seed: int) -> RunConfig:
    """The run's configuration with the job's seed (initialization, minibatches, noise)."""
    cfg = RunConfig.from_dict(settings["config"])
    return replace(cfg, federation=replace(cfg.federation, seed=seed))


def run_scfedvi(task: Task, settings: dict[str, Any]) -> MethodResult:
    """Train scFedVI in process over the task's sites and embed every site's cells at the site.

    The run is trained up to each round of ``settings["curve_rounds"]`` in turn (each call
    continues the same run in memory, exactly as one uninterrupted run) and embedded there.
    The time is the training's plus, after the last round, the balancing step's (federated
    k-means; part of the trained model).
    """
    from scfedvi.model import ScFedVI

    cfg = scfedvi_config(settings, task.seed)
    if cfg.privacy.enabled and cfg.privacy.expected_sites is None:  # the divisor: the sites
        cfg = replace(cfg, privacy=replace(cfg.privacy, expected_sites=len(task.sites)))
    model = ScFedVI.from_sites(
        task.site_dict(),
        batch_key=task.batch_key,
        label_key=task.label_key,
        n_top_genes=task.n_top_genes,
        config=cfg,
    )
    if list(model.schema.genes) != task.genes:
        log.warning("scFedVI's schema genes differ from the baselines' genes")
    n_rounds = cfg.federation.n_rounds
    rounds = sorted({*settings.get("curve_rounds", []), n_rounds})
    curve, seconds, balance_seconds = [], 0.0, 0.0
    for r in rounds:
        t0 = time.perf_counter()
        model.train(n_rounds=r, resume=True, progress=False)
        seconds += time.perf_counter() - t0
        if r == n_rounds:
            t0 = time.perf_counter()
            model.balance_steps()
            balance_seconds = time.perf_counter() - t0
            seconds += balance_seconds
        Z = _embed_all(model, task)
        nbytes, steps = _comm(model.history, r)
        epochs = r * model.schedule.epochs / model.schedule.rounds  # the resolved schedule
        curve.append(
            {
                "round": r,
                "epochs": epochs,
                "steps": steps,
                "bytes": nbytes,
                "seconds": seconds,
                "embedding": Z,
            }
        )
    return MethodResult(
        embedding=curve[-1]["embedding"],
        seconds=seconds,
        bytes=curve[-1]["bytes"],
        history=model.history.copy(),
        curve=curve,
        info=_privacy_info(model, cfg)
        | {
            "rounds": n_rounds,
            "local_epochs": model.schedule.local_epochs,
            "epochs": model.schedule.epochs,
            "balance_seconds": balance_seconds,
            "balance_clusters": [len(st.composition) for st in model.balance_steps()],
            "n_genes": model.schema.n_genes,
            "genes_match": list(model.schema.genes) == task.genes,
        },
    )


def _privacy_info(model: Any, cfg: RunConfig) -> dict[str, Any]:
    """The run's DP guarantee (epsilon ``inf`` without DP) and the membership-inference
    attack on its global model (:mod:`scfedvi.benchmark.mia`)."""
    from scfedvi.benchmark.mia import membership_inference
    from scfedvi.privacy.accountant import gaussian_epsilon
    from scfedvi.train.data import SiteTensors

    priv = cfg.privacy
    sites = [(n, SiteTensors(sd.X, sd.batch_index)) for n, sd in model.site_data.items()]
    mia = membership_inference(
        model.params, sites, model.schema.n_genes, model.schema.n_batches, cfg
    )
    eps = (
        gaussian_epsilon(priv.noise_multiplier, cfg.federation.n_rounds, priv.delta, priv.adjacency)
        if priv.enabled
        else float("inf")
    )
    return mia | {
        "epsilon": eps,
        "delta": priv.delta if priv.enabled else float("nan"),
        "noise_multiplier": priv.noise_multiplier if priv.enabled else 0.0,
        "clip_norm": priv.clip_norm if priv.enabled else float("nan"),
        "adjacency": priv.adjacency if priv.enabled else "",
    }


#: Client-level DP in the benchmark: the clip norm (L2 over all parameters) and delta. The
#: signal-to-noise ratio of a round, n / (sigma sqrt(d)) for n sites and d parameters, does not
#: depend on C; C sets the absolute noise, and 1.0 made the weights overflow (non-finite
#: updates) at epsilon 1 on pancreas in quick mode, so C is small: docs/dp.md.
DP_CLIP_NORM = 0.01
DP_DELTA = 1e-5


def dp_settings(epsilon: float):
    """scFedVI with client-level DP (add/remove one site) calibrated to ``epsilon`` at
    :data:`DP_DELTA` over the run's rounds; the divisor is the task's number of sites."""
    base = scfedvi_settings({})

    def settings(quick: bool) -> dict[str, Any]:
        from scfedvi.privacy.accountant import noise_for_epsilon

        s = base(quick)
        rounds = s["config"]["federation"]["n_rounds"]
        sigma = noise_for_epsilon(epsilon, DP_DELTA, rounds)
        s["config"]["privacy"].update(
            clip_norm=DP_CLIP_NORM, noise_multiplier=round(sigma, 6), delta=DP_DELTA
        )
        return s

    return settings


def _registry() -> dict[str, Method]:
    from scfedvi.benchmark import baselines as b

    fed: Literal["federated"] = "federated"
    methods = [
        Method("scfedvi", "scFedVI", fed, scfedvi_settings({}), run_scfedvi),
        Method(
            "fedavg",
            "plain FedAvg (paper)",
            fed,
            scfedvi_settings(  # scVI's architecture (BatchNorm in the decoder too)
                {
                    "model": {"decoder_norm": "batch"},
                    "federation": {"norm_stats": "averaged", "batch_owned": False},
                }
            ),
            run_scfedvi,
        ),
        Method(
            "scfedvi-layernorm",
            "scFedVI LayerNorm",
            fed,
            scfedvi_settings({"model": {"norm": "layer"}}),
            run_scfedvi,
        ),
        Method(
            "scfedvi-no-batch-owned",
            "scFedVI batch-owned off",
            fed,
            scfedvi_settings({"federation": {"batch_owned": False}}),
            run_scfedvi,
        ),
        Method(
            "scfedvi-fedprox",
            "scFedVI FedProx μ=0.01",
            fed,
            scfedvi_settings({"train": {"proximal_mu": 0.01}}),
            run_scfedvi,
        ),
        Method(
            "scfedvi-global-norm",
            "scFedVI global BatchNorm statistics",
            fed,
            scfedvi_settings({"federation": {"norm_stats": "global"}}),
            run_scfedvi,
        ),
        Method(
            "scfedvi-own-stats",
            "scFedVI site statistics unbalanced",
            fed,
            scfedvi_settings({"federation": {"balance_clusters": 0}}),
            run_scfedvi,
        ),
        Method(
            "scfedvi-1-epoch",
            "scFedVI 1 local epoch",
            fed,
            scfedvi_settings({}, epochs_per_round=1),
            run_scfedvi,
        ),
        *(
            Method(
                f"scfedvi-dp-eps{eps:g}",
                f"scFedVI DP ε={eps:g}",
                fed,
                dp_settings(eps),
                run_scfedvi,
            )
            for eps in (8.0, 3.0, 1.0)
        ),
        Method(
            "scvi-per-site",
            "scVI per site",
            "per_site",
            b.scvi_settings,
            b.run_scvi_per_site,
            "scvi-tools",
        ),
        Method(
            "scvi-pooled", "pooled scVI", "pooled", b.scvi_settings, b.run_scvi_pooled, "scvi-tools"
        ),
        Method("harmony", "Harmony (pooled)", "pooled", b.pca_settings, b.run_harmony, "harmonypy"),
        Method("pca", "PCA (uncorrected)", "pooled", b.pca_settings, b.run_pca, "scanpy"),
    ]
    return {m.name: m for m in methods}


#: Every method by command-line name.
METHODS: dict[str, Method] = _registry()
#: The paper reproduction's methods (``--methods`` default).
DEFAULT_METHODS = ("scfedvi", "fedavg", "scvi-per-site", "scvi-pooled", "harmony", "pca")
#: The pooled scVI baseline (the line to reach in the communication figure).
POOLED_REFERENCE = "scvi-pooled"


def parse_methods(names: Sequence[str] | str) -> list[Method]:
    """Methods by name (``"all"``: every method); a clear error for an unknown one."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["all"]:
        return list(METHODS.values())
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(
            f"--methods: unknown method(s) {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(METHODS)} (or 'all')"
        )
    if not names:
        raise ValueError("--methods: no method given; choose from " + ", ".join(METHODS))
    return [METHODS[n] for n in dict.fromkeys(names)]
