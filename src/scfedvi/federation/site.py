"""The site side of a round: one object per site, the same in every runtime.

A site trains from the global parameters on its own cells and answers with parameters, its
cell counts and scalar metrics; its normalization statistics, optimizer moments and control
variates stay with it (in memory, or in its own state file between Flower messages).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from scfedvi.config import RunConfig, SitePolicy, TrainConfig
from scfedvi.federation.aggregate import SiteUpdate
from scfedvi.federation.balance import BalanceStep, balanced_statistics
from scfedvi.federation.schedule import site_train_config
from scfedvi.privacy.dp import site_reply
from scfedvi.privacy.policy import QueryLedger, check_training, n_train_cells
from scfedvi.train.local import (
    LocalState,
    SiteTensors,
    build_module,
    calibrate_norm_stats,
    config_device,
    embed,
    local_update,
    round_seed,
)
from scfedvi.train.params import Params, set_state


class SiteWorker:
    """A site: its data, its model replica and its private training state."""

    def __init__(
        self,
        name: str,
        data: SiteTensors,
        n_genes: int,
        n_batches: int,
        config: RunConfig,
        *,
        policy: SitePolicy | None = None,
        ledger: QueryLedger | None = None,
    ) -> None:
        """``policy`` is the site's own (default ``SitePolicy()``); ``ledger`` counts the
        queries it answered this run (default: in memory, for the worker's life)."""
        if data.X.shape[1] != n_genes:
            raise ValueError(
                f"site {name!r}: data has {data.X.shape[1]} genes, the schema {n_genes}; "
                "project the site's AnnData onto the federation schema first"
            )
        self.name = name
        self.data = data
        self.config = config
        self.module = build_module(n_genes, n_batches, config.model)
        self.state = LocalState()
        self.policy = SitePolicy() if policy is None else policy
        self.ledger = QueryLedger() if ledger is None else ledger

    def check_policy(self, round_idx: int, train: TrainConfig) -> None:
        """Refuse a training round with settings ``train`` that the site's policy does not
        allow (its settings, the round, the run's budget of rounds) with a
        :class:`~scfedvi.privacy.policy.PolicyRefusal`."""
        cfg = dataclasses.replace(self.config, train=train)
        n_train = n_train_cells(self.data.n_cells, train.train_size)
        check_training(self.policy, self.name, cfg, n_train, round_idx)
        self.ledger.spend(  # also admits the run and charges its epsilon (run_budget)
            self.name, "train", self.policy.max_rounds, privacy=cfg.privacy, policy=self.policy
        )

    def fit(
        self,
        global_params: Params,
        round_idx: int,
        control: Params | None = None,
        work: tuple[int | None, int | None] | None = None,
    ) -> SiteUpdate:
        """Local update for one round; ``work`` is the schedule's ``(local_epochs,
        local_steps)`` for this site (:meth:`Schedule.work`; ``None``: the configuration's).
        The site's policy is checked first (:meth:`check_policy`)."""
        train = self.config.train if work is None else site_train_config(self.config.train, *work)
        self.check_policy(round_idx, train)
        seed = round_seed(self.config.federation.seed, round_idx)
        result, self.state = local_update(
            self.module,
            global_params,
            self.data,
            train,
            self.state,
            norm_stats=self.config.federation.norm_stats,
            seed=seed,
            global_control=control,
            split_seed=self.config.federation.seed,
        )
        update = SiteUpdate(
            site=self.name,
            params=result.params,
            num_examples=result.num_examples,
            batch_counts=self.data.batch_counts(),
            metrics=result.metrics,
            control_delta=result.control_delta,
        )
        # under DP: clipped here with clip_at="site", and no losses (scfedvi.privacy.dp)
        return site_reply(update, global_params, self.config.privacy)

    def embed(self, global_params: Params, balance: Sequence[BalanceStep] = ()) -> np.ndarray:
        """The site's cells in the global latent space, computed at the site.

        With site-local statistics, the site computes them on its own cells, then applies the
        federation's ``balance`` steps (:mod:`scfedvi.federation.balance`) to them.
        """
        self.module.to(config_device(self.config.train))
        set_state(self.module, global_params)
        if not self.config.local_batchnorm:
            if balance:
                raise ValueError(
                    f"site {self.name!r}: balancing steps need site-local BatchNorm statistics"
                )
            return embed(self.module, self.data)
        calibrate_norm_stats(self.module, self.data)
        z = embed(self.module, self.data)
        return balanced_statistics(self.module, self.data, balance, z=z) if balance else z

    # -- private state on disk (the site's own storage) -------------------------------------
    def save_state(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "local_params": self.state.local_params,
                "optimizer": self.state.optimizer,
                "control": self.state.control,
                "epochs_done": self.state.epochs_done,
            },
            tmp,
        )
        os.replace(tmp, path)

    def load_state(self, path: str | os.PathLike) -> None:
        d = torch.load(Path(path), weights_only=False)
        self.state = LocalState(d["local_params"], d["optimizer"], d["control"], d["epochs_done"])
