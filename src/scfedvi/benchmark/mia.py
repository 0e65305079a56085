"""Measured leakage: a loss-threshold membership-inference attack on the global model.

The attacker holds the released global model and a cell, and guesses that the cell was trained
on when the model's loss on it is low (Yeom et al. 2018). Members are each site's training
cells, non-members its held-out cells (``1 - TrainConfig.train_size`` of them, chosen by the
run's seed as training chose them). The score of a cell is minus its negative ELBO (KL weight 1)
under the global parameters with the site's own normalization statistics, as the site embeds;
one threshold serves all sites. Reported: the ROC AUC of the score (0.5: no better than a coin)
and the true-positive rate at a 1% false-positive rate.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from scipy import stats

from scfedvi.config import RunConfig
from scfedvi.train.local import (
    SiteTensors,
    build_module,
    calibrate_norm_stats,
    train_validation_split,
)
from scfedvi.train.params import Params, set_state

#: The false-positive rate at which the true-positive rate is reported.
LOW_FPR = 0.01


@torch.no_grad()
def per_cell_loss(module, data: SiteTensors, cells: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Negative ELBO (reconstruction + KL, weight 1) of each of ``cells``; eval mode, one
    posterior sample per cell drawn from a fixed seed."""
    module.eval()
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        out = []
        for start in range(0, len(cells), 1024):
            idx = np.asarray(cells[start : start + 1024])
            x, b, nonzero = data.training_minibatch(idx)
            loss = module.loss(x, b, kl_weight=1.0, nonzero=nonzero)
            out.append((loss.reconstruction + loss.kl_local).cpu().numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, float]:
    """AUC of "member" scores against non-member scores (higher: more member-like) and the
    true-positive rate at :data:`LOW_FPR`.

    The AUC is the Mann-Whitney statistic (ties count one half). The TPR is the share of
    members scoring above the threshold that at most ``LOW_FPR`` of the non-members exceed.
    """
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if len(m) == 0 or len(n) == 0:
        return {"mia_auc": float("nan"), "mia_tpr_at_1fpr": float("nan")}
    ranks = stats.rankdata(np.concatenate([m, n]))
    auc = (ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(n))
    k = int(np.floor(LOW_FPR * len(n)))  # non-members allowed above the threshold
    thr = np.sort(n)[::-1][k] if k < len(n) else -np.inf
    return {"mia_auc": float(auc), "mia_tpr_at_1fpr": float(np.mean(m > thr))}


def membership_inference(
    params: Params,
    sites: Iterable[tuple[str, SiteTensors]],
    n_genes: int,
    n_batches: int,
    config: RunConfig,
) -> dict[str, float]:
    """The loss-threshold attack on ``params`` over every site's training and held-out cells.

    Returns ``mia_auc``, ``mia_tpr_at_1fpr``, ``mia_members`` and ``mia_nonmembers``; NaN
    metrics when no cell is held out (``train_size == 1``).
    """
    members, nonmembers = [], []
    for _name, data in sites:
        module = build_module(n_genes, n_batches, config.model)
        set_state(module, params)
        if config.local_batchnorm:
            calibrate_norm_stats(module, data)
        train, held = train_validation_split(
            data.n_cells, config.train.train_size, config.federation.seed
        )
        members.append(-per_cell_loss(module, data, train))
        nonmembers.append(-per_cell_loss(module, data, held))
    m, n = np.concatenate(members), np.concatenate(nonmembers)
    return attack_metrics(m, n) | {"mia_members": float(len(m)), "mia_nonmembers": float(len(n))}
