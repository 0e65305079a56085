"""The attacks of issue 16 (findings 1 and 4), performed against a site: each is shown to work
when the site's policy allows it, and to be refused by the default :class:`SitePolicy`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scfedvi.config import FederationConfig, ModelConfig, RunConfig, SitePolicy, TrainConfig
from scfedvi.data import _hvg
from scfedvi.data.summary import site_summary
from scfedvi.federation.site import SiteWorker
from scfedvi.privacy.policy import PolicyRefusal, QueryLedger
from scfedvi.train.local import SiteTensors, build_module, train_validation_split
from scfedvi.train.params import get_state
from synthetic import make_counts

N_CELLS, N_GENES, HIDDEN = 40, 30, 8
FIRST_W = "z_encoder.encoder.fc_layers.Layer 0.0.weight"
FIRST_B = "z_encoder.encoder.fc_layers.Layer 0.0.bias"

#: what a site would accept if it trusted the coordinator (the code before the policy)
PERMISSIVE = SitePolicy(
    min_train_cells=1,
    min_batch_size=2,
    lr_range=(0.0, 1e12),
    eps_range=(0.0, 1e12),
    weight_decay_range=(0.0, 1.0),
    allowed_encoder_norms=("batch", "layer", "none"),
)

#: finding 1: normalization off, one training cell, one step, huge lr and eps, no decay
ATTACK = RunConfig(
    model=ModelConfig(n_hidden=HIDDEN, n_latent=2, norm="none"),
    train=TrainConfig(
        batch_size=2,
        lr=1e8,
        eps=1e6,
        weight_decay=0.0,
        local_steps=1,
        train_size=1 / N_CELLS,
        n_epochs_kl_warmup=1,
    ),
    federation=FederationConfig(n_rounds=1, seed=3),
)


@pytest.fixture(scope="module")
def site_data():
    a = make_counts(N_CELLS, N_GENES, seed=5)
    X = a.X.tocsr().astype(np.float32)
    return SiteTensors(X, a.obs["batch"].cat.codes.to_numpy())


def _crafted_params(config: RunConfig) -> dict[str, np.ndarray]:
    """Global parameters of the coordinator's choosing: first encoder layer W = 0, b = 1 (every
    hidden unit passes the cell's input through its gradient, the same for every cell)."""
    params = get_state(build_module(N_GENES, 2, config.model))
    params[FIRST_W] = np.zeros_like(params[FIRST_W])
    params[FIRST_B] = np.ones_like(params[FIRST_B])
    return params


def _extract(update_params: dict[str, np.ndarray]) -> np.ndarray:
    """The coordinator's reading of one training reply: dW[i] / db[i] = log1p(x) of the cell."""
    dw = update_params[FIRST_W].astype(np.float64)
    db = update_params[FIRST_B].astype(np.float64) - 1.0
    i = int(np.argmax(np.abs(db)))
    return np.expm1(dw[i] / db[i])


def test_finding_1_one_reply_gives_back_a_cells_counts_unless_the_policy_refuses(site_data):
    worker = SiteWorker("lab-a", site_data, N_GENES, 2, ATTACK, policy=PERMISSIVE)
    upd = worker.fit(_crafted_params(ATTACK), 0)
    cell = train_validation_split(N_CELLS, ATTACK.train.train_size, ATTACK.federation.seed)[0]
    assert len(cell) == 1  # the coordinator's train_size left one training cell
    truth = site_data.X[cell].toarray().ravel()
    got = _extract(upd.params)
    assert np.abs(got - truth).max() < 0.05 * max(1.0, truth.max())  # the attack is real
    np.testing.assert_array_equal(np.rint(got), truth)
    # the default policy refuses the same query before training, naming the setting
    guarded = SiteWorker("lab-a", site_data, N_GENES, 2, ATTACK)
    with pytest.raises(
        PolicyRefusal, match=r"site 'lab-a' refuses: train\.train_size=.*1 training"
    ):
        guarded.fit(_crafted_params(ATTACK), 0)
    # and each of the attack's other settings alone
    enough = TrainConfig(batch_size=16, lr=1e-3, train_size=0.9, local_steps=1)
    for change, setting in (
        ({"model": ModelConfig(n_hidden=HIDDEN, n_latent=2, norm="none")}, r"model\.norm='none'"),
        ({"train": TrainConfig(batch_size=2, train_size=0.9)}, r"train\.batch_size=2"),
        ({"train": TrainConfig(batch_size=16, lr=1e8, train_size=0.9)}, r"train\.lr=1"),
        ({"train": TrainConfig(batch_size=16, eps=1e6, train_size=0.9)}, r"train\.eps=1"),
    ):
        cfg = RunConfig(
            **{"model": ModelConfig(n_hidden=HIDDEN, n_latent=2), "train": enough, **change}
        )
        with pytest.raises(PolicyRefusal, match=setting):
            SiteWorker(
                "lab-a", site_data, N_GENES, 2, cfg, policy=SitePolicy(min_train_cells=20)
            ).fit(_crafted_params(cfg), 0)


def _sites_summary(adata, **kw):
    return site_summary(adata, site="lab-a", batch_key="batch", genes=None, **kw)


def test_finding_4_label_key_of_per_cell_identifiers_is_refused():
    a = make_counts(60, 20)
    a.obs["donor_id"] = [f"d{i}" for i in range(a.n_obs)]  # one identifier per cell
    leaked = _sites_summary(
        a, label_key="donor_id", policy=SitePolicy(allowed_label_keys=("donor_id",))
    )
    assert leaked.labels is not None and len(leaked.labels) == a.n_obs  # the attack is real
    with pytest.raises(PolicyRefusal, match=r"label_key='donor_id' is not among .*allowed"):
        _sites_summary(a, label_key="donor_id", policy=SitePolicy())
    # the site's own label key is allowed implicitly
    ok = _sites_summary(
        a, label_key="cell_type", policy=SitePolicy().allowing_label_key("cell_type")
    )
    assert ok.labels == ("t0", "t1", "t2")


def _small_batch_site(n_small: int):
    a = make_counts(60, 20, seed=2)
    a.obs["batch"] = pd.Categorical(["big"] * (60 - n_small) + ["small"] * n_small)
    return a


def test_finding_4_chosen_clip_values_would_give_every_cell_of_a_small_batch():
    a = _small_batch_site(3)
    x = a[a.obs["batch"] == "small"].X.tocsr().astype(np.float64)
    # what a site that applied any clip values would answer: sum_i min(x_i, c) per gene;
    # one query per threshold reveals the sorted values of the 3 cells of every gene
    cuts = np.arange(0, int(x.max()) + 2, dtype=np.float64)
    answers = np.array([_hvg.clipped_sums(x, np.full(x.shape[1], c))[0] for c in cuts])
    # answers[c] - answers[c-1] = number of cells with value >= c, per gene
    above = np.diff(answers, axis=0)
    recovered = np.array(
        [[int((above[:, g] >= k).sum()) for k in (3, 2, 1)] for g in range(x.shape[1])]
    )
    truth = np.sort(x.toarray(), axis=0).T
    np.testing.assert_array_equal(recovered, truth)  # the attack is real
    # the site refuses clip values for a batch nobody else holds ...
    big = {"big": np.full(20, 5.0).tolist()}
    with pytest.raises(PolicyRefusal, match=r"clip values were sent for batch 'big' without"):
        _sites_summary(a, clip_values=big)
    # ... and never summarises the 3-cell batch at all
    s = _sites_summary(a)
    assert s.batch_counts == {"big": 57, "small": 3} and set(s.stats) == {"big"}


def test_finding_4_an_honest_summary_of_a_two_cell_batch_is_never_sent():
    a = _small_batch_site(2)
    x = a[a.obs["batch"] == "small"].X.toarray().astype(np.float64)
    s = _sites_summary(a, policy=SitePolicy(min_batch_cells=2))
    st = s.stats["small"]
    # both cells' values from the sum and the sum of squares, per gene
    mean, half = st["sum"] / 2, np.sqrt(np.maximum(st["sum_sq"] / 2 - (st["sum"] / 2) ** 2, 0))
    np.testing.assert_allclose(np.sort([mean - half, mean + half], axis=0), np.sort(x, axis=0))
    assert "small" not in _sites_summary(a).stats  # default policy: 10 cells at least


def test_finding_4_one_summary_pass_per_run():
    a = _small_batch_site(20)
    ledger = QueryLedger()
    _sites_summary(a, ledger=ledger)
    with pytest.raises(PolicyRefusal, match=r"query 2 of kind 'summary' exceeds .*budget of 1"):
        _sites_summary(a, ledger=ledger)
