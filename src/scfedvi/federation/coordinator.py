"""The server side of a round: initial model, aggregation, history and checkpoints.

A round reads as the paper's algorithm: ``broadcast -> local_update (at each site) ->
aggregate``. The coordinator owns the first and the last; runtimes (in process, Flower) carry
the messages.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scfedvi.config import RunConfig
from scfedvi.federation.aggregate import ServerOptimizer, SiteUpdate, fedavg, reject_invalid
from scfedvi.federation.schedule import Schedule, resolve_schedule
from scfedvi.privacy.accountant import gaussian_epsilon
from scfedvi.privacy.dp import dp_average, require_expected_sites
from scfedvi.train.local import build_module
from scfedvi.train.params import Params, batch_owned_columns, get_state, shared_keys

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint"


class RoundFailedError(RuntimeError):
    """Fewer valid site updates than ``FederationConfig.min_sites``."""


def nbytes(params: Params | None) -> int:
    return int(sum(np.asarray(v).nbytes for v in (params or {}).values()))


class Coordinator:
    """Holds the global model and aggregates the sites' updates.

    Parameters
    ----------
    n_genes, n_batches
        Dimensions fixed by the federation schema.
    config
        The run's configuration.
    schema_hash
        Hash of the federation schema; checkpoints of another schema are refused.
    checkpoint_dir
        Where a checkpoint is written after every round (``None``: no checkpoints).
    """

    def __init__(
        self,
        n_genes: int,
        n_batches: int,
        config: RunConfig,
        *,
        schema_hash: str = "",
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> None:
        self.config = config
        if config.privacy.enabled:
            require_expected_sites(config.privacy)
        self.schema_hash = schema_hash
        self.n_genes, self.n_batches = n_genes, n_batches
        torch.manual_seed(config.federation.seed)
        module = build_module(n_genes, n_batches, config.model)
        full = get_state(module)
        self.keys = shared_keys(module, config.federation.norm_stats)
        self.params: Params = {k: full[k] for k in self.keys}
        self.initial_local: Params = {k: v for k, v in full.items() if k not in set(self.keys)}
        self.batch_owned = batch_owned_columns(module) if config.federation.batch_owned else {}
        fed = config.federation
        self.server_opt = ServerOptimizer(fed.server_optimizer, fed.server_lr, fed.server_momentum)
        self.control: Params | None = None
        if config.train.scaffold:
            self.control = {
                n: np.zeros(tuple(p.shape), np.float32) for n, p in module.named_parameters()
            }
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.schedule: Schedule | None = None

    # -- schedule and early stopping ---------------------------------------------------------
    def resolve_schedule(self, n_cells: Mapping[str, int]) -> Schedule:
        """Resolve the run's schedule from each site's number of cells (see
        :mod:`scfedvi.federation.schedule`) and keep it."""
        self.schedule = resolve_schedule(self.config, n_cells)
        log.info("%s", self.schedule.describe())
        return self.schedule

    def work(self, site: str) -> tuple[int | None, int | None]:
        """``(local_epochs, local_steps)`` of ``site`` this round (the resolved schedule)."""
        if self.schedule is None:
            raise RuntimeError("resolve the schedule first (Coordinator.resolve_schedule)")
        return self.schedule.work(site)

    def validation_curve(self) -> list[tuple[int, float]]:
        """Per round: the validation loss over the sites' held-out cells, weighted by the
        sites' training cells (each site's held-out share is the same ``1 - train_size``)."""
        rounds: dict[int, list[tuple[float, float]]] = {}
        for h in self.history:
            v = h.get("validation_loss")
            if h.get("status") == "ok" and v is not None and np.isfinite(v):
                rounds.setdefault(int(h["round"]), []).append((float(v), float(h["n_train"])))
        return [
            (r, sum(v * w for v, w in vw) / sum(w for _, w in vw))
            for r, vw in sorted(rounds.items())
        ]

    @property
    def early_stopped(self) -> bool:
        """Whether early stopping (``FederationConfig.early_stopping``) ends the run now: the
        weighted validation loss has not improved by ``min_delta`` on its best for
        ``patience`` rounds."""
        fed = self.config.federation
        if not fed.early_stopping:
            return False
        losses = [v for _, v in self.validation_curve()]
        best, since = float("inf"), 0
        for v in losses:
            if v < best - fed.early_stopping_min_delta:
                best, since = v, 0
            else:
                since += 1
        return since >= fed.early_stopping_patience

    # -- broadcast ---------------------------------------------------------------------------
    @property
    def epsilon(self) -> float | None:
        """The (epsilon, delta)-DP guarantee spent so far (``None`` without DP)."""
        priv = self.config.privacy
        if not priv.enabled:
            return None
        return gaussian_epsilon(priv.noise_multiplier, self.round, priv.delta, priv.adjacency)

    def broadcast(self) -> tuple[Params, Params | None]:
        """What every site receives this round: the global parameters (and SCAFFOLD's control)."""
        return self.params, self.control

    # -- aggregate ---------------------------------------------------------------------------
    def aggregate(self, updates: Sequence[SiteUpdate], dropped: Sequence[str] = ()) -> None:
        """Aggregate one round's updates into the global model and record the round."""
        kept, rejected = reject_invalid(updates)
        r = self.round
        down = nbytes(self.params) + nbytes(self.control)
        for u in updates:
            row = {"round": r, "site": u.site, "status": "rejected" if u.site in rejected else "ok"}
            row.update({k: float(v) for k, v in u.metrics.items()})
            row["n_train"] = int(u.num_examples)
            row.update(bytes_up=nbytes(u.params) + nbytes(u.control_delta), bytes_down=down)
            row["reason"] = rejected.get(u.site, "")
            self.history.append(row)
        for s in dropped:
            self.history.append({"round": r, "site": s, "status": "dropped", "bytes_down": down})
        if len(kept) < self.config.federation.min_sites:
            raise RoundFailedError(
                f"round {r}: {len(kept)} valid site updates, fewer than min_sites="
                f"{self.config.federation.min_sites} (rejected: {rejected}, dropped: {list(dropped)})"
            )
        priv = self.config.privacy
        if priv.clip_norm is not None:
            # noise from the OS CSPRNG, never from the run's seed (which every site knows)
            avg, info = dp_average(
                kept,
                self.params,
                clip_norm=priv.clip_norm,
                noise_multiplier=priv.noise_multiplier,
                divisor=require_expected_sites(priv),
            )
            info["dp_epsilon"] = gaussian_epsilon(
                priv.noise_multiplier, r + 1, priv.delta, priv.adjacency
            )
            self.history.append({"round": r, "site": "(server)", "status": "dp", **info})
        else:
            pool = self.config.federation.norm_stats == "global"
            avg = fedavg(kept, self.params, self.batch_owned, pool_variances=pool)
        self.params = self.server_opt.step(self.params, avg)
        if self.control is not None:
            deltas = [u.control_delta for u in kept if u.control_delta is not None]
            for k in self.control:
                if deltas:
                    self.control[k] = self.control[k] + np.mean([d[k] for d in deltas], axis=0)
        self.round += 1
        if self.checkpoint_dir is not None:
            self.save_checkpoint(self.checkpoint_dir)

    def aggregate_secure(
        self, result: Any, updates: Sequence[SiteUpdate], *, bound: int, dropped: Sequence[str] = ()
    ) -> None:
        """Aggregate one round under secure aggregation: ``result`` is the unmasked sum
        (:class:`~scfedvi.privacy.secagg_protocol.SecureSum`) of the survivors' vectors,
        ``updates`` the sites' counts and metrics (no parameters), ``bound`` the public bound
        the sites pre-scaled with (:func:`~scfedvi.privacy.secagg.secagg_bound`). Under DP
        the coordinator adds the noise to the unmasked sum (see ``docs/privacy.md``)."""
        from scfedvi.privacy.dp import secure_gaussian
        from scfedvi.privacy.secagg import decode_sum, secure_average

        priv, r = self.config.privacy, self.round
        assert priv.clip_norm is not None
        alive = set(result.survivors)
        down = nbytes(self.params)
        for u in updates:
            ok = u.site in alive
            row = {"round": r, "site": u.site, "status": "ok" if ok else "dropped"}
            row.update({k: float(v) for k, v in u.metrics.items()})
            row["n_train"] = int(u.num_examples)
            row.update(bytes_up=int(result.total.nbytes) if ok else 0, bytes_down=down)
            row["reason"] = "" if ok else f"secure aggregation: {result.dropped.get(u.site, '')}"
            self.history.append(row)
        for s in sorted(set(dropped) - {u.site for u in updates}):
            self.history.append({"round": r, "site": s, "status": "dropped", "bytes_down": down})
        if len(alive) < self.config.federation.min_sites:
            raise RoundFailedError(
                f"round {r}: {len(alive)} sites in the secure sum, fewer than min_sites="
                f"{self.config.federation.min_sites} (dropped: {sorted(set(dropped))})"
            )
        sums, counts = decode_sum(
            result.total, self.params, self.n_batches, clip_norm=priv.clip_norm, bound=bound
        )
        weighted = priv.noise_multiplier == 0
        divisor = None if weighted else require_expected_sites(priv)
        avg = secure_average(sums, counts, self.params, self.batch_owned, divisor=divisor)
        if not weighted:
            std = priv.noise_multiplier * priv.clip_norm / float(divisor or 1)
            for k in sums:  # from the OS CSPRNG, added to the unmasked sum
                g = np.asarray(avg[k])
                avg[k] = (g.astype(np.float64) + secure_gaussian(g.shape, std)).astype(g.dtype)
            info = {"dp_noise_std": std, "dp_divisor": float(divisor or 1), "dp_sites": len(alive)}
            info["dp_epsilon"] = gaussian_epsilon(
                priv.noise_multiplier, r + 1, priv.delta, priv.adjacency
            )
            self.history.append({"round": r, "site": "(server)", "status": "dp", **info})
        self.params = self.server_opt.step(self.params, avg)
        self.round += 1
        if self.checkpoint_dir is not None:
            self.save_checkpoint(self.checkpoint_dir)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {f"global/{k}": v for k, v in self.params.items()}
        arrays.update({f"server/{k}": v for k, v in self.server_opt.state_arrays().items()})
        arrays.update({f"control/{k}": v for k, v in (self.control or {}).items()})
        meta = {
            "round": self.round,
            "schema_hash": self.schema_hash,
            "config": self.config.to_dict(),
            "history": self.history,
            "schedule": None if self.schedule is None else self.schedule.to_dict(),
        }
        _atomic_npz(directory / f"{CHECKPOINT}.npz", arrays)
        _atomic_text(directory / f"{CHECKPOINT}.json", json.dumps(meta, indent=1))

    def load_checkpoint(self, directory: Path) -> bool:
        """Resume from ``directory`` if it holds a checkpoint; returns whether it did."""
        meta_path = directory / f"{CHECKPOINT}.json"
        if not meta_path.exists():
            return False
        meta = json.loads(meta_path.read_text())
        if meta["schema_hash"] != self.schema_hash:
            raise ValueError(
                f"checkpoint in {directory} belongs to schema {meta['schema_hash']!r}, this run's "
                f"is {self.schema_hash!r}; use another checkpoint directory or delete it"
            )
        if meta["config"] != self.config.to_dict():
            raise ValueError(
                f"checkpoint in {directory} was written with another configuration; "
                "resume with the same settings or use another checkpoint directory"
            )
        with np.load(directory / f"{CHECKPOINT}.npz") as z:
            arrays = {k: z[k] for k in z.files}
        self.params = {k[7:]: v for k, v in arrays.items() if k.startswith("global/")}
        self.server_opt.load_state_arrays(
            {k[7:]: v for k, v in arrays.items() if k.startswith("server/")}
        )
        if self.control is not None:
            self.control = {k[8:]: v for k, v in arrays.items() if k.startswith("control/")}
        self.round = int(meta["round"])
        self.history = list(meta["history"])
        log.info("resumed from %s at round %d", directory, self.round)
        return True


def _atomic_npz(path: Path, arrays: Params) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
