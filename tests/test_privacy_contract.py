"""Every payload a site sends in process is recorded and checked against the whitelist."""

from __future__ import annotations

import numpy as np
import pytest

from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig
from scfedvi.data.harmonize import gene_universe, site_genes, site_summary
from scfedvi.federation.aggregate import SiteUpdate
from scfedvi.federation.payload import (
    PayloadViolation,
    check_balance_reply,
    check_summary,
    check_update,
)
from scfedvi.federation.site import SiteWorker
from scfedvi.model import ScFedVI
from scfedvi.module.vae import VAE


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"fed": {"norm_stats": "averaged", "batch_owned": False}},
        {"train": {"scaffold": True}},
    ],
)
def test_every_round_payload_is_whitelisted(small_adata, monkeypatch, variant):
    cfg = RunConfig(
        model=ModelConfig(n_hidden=16, n_latent=3),
        train=TrainConfig(batch_size=32, local_epochs=1, **variant.get("train", {})),
        federation=FederationConfig(n_rounds=2, **variant.get("fed", {})),
    )
    sites = {"a": small_adata[:100].copy(), "b": small_adata[100:].copy()}
    model = ScFedVI.from_sites(sites, batch_key="batch", n_top_genes=None, config=cfg)
    sent: list[SiteUpdate] = []
    real_fit = SiteWorker.fit

    def recording_fit(self, *a, **k):
        upd = real_fit(self, *a, **k)
        sent.append(upd)
        return upd

    monkeypatch.setattr(SiteWorker, "fit", recording_fit)
    model.train(progress=False)
    assert len(sent) == 4
    shapes = {k: v.shape for k, v in model.params.items()}
    ctrl = {
        n: tuple(p.shape) for n, p in VAE(model.schema.n_genes, 2, cfg.model).named_parameters()
    }
    for upd in sent:
        assert "validation_loss" in upd.metrics  # 10% of each site's cells held out
        check_update(upd, shapes, control_shapes=ctrl)
        n_cells = model.site_data[upd.site].n_cells
        for k, v in upd.params.items():
            assert n_cells not in np.shape(v), k  # no cell dimension
    if cfg.federation.norm_stats == "local":
        assert not any("running" in k for k in shapes)


def test_harmonization_summaries_are_whitelisted(small_adata):
    sites = {"a": small_adata[:100].copy(), "b": small_adata[100:].copy()}
    genes = gene_universe([site_genes(a) for a in sites.values()])
    for name, adata in sites.items():
        d = site_summary(adata, site=name, batch_key="batch", genes=genes).to_dict()
        check_summary(d, adata.n_obs, site=name)
        text = str(d)
        assert not any(c in text for c in adata.obs_names[:5])  # no cell names


def test_the_checker_can_fail():
    shapes = {"w": (2, 3)}
    good = SiteUpdate("a", {"w": np.zeros((2, 3))}, 5, {0: 5}, {"loss": 1.0})
    check_update(good, shapes)
    with pytest.raises(PayloadViolation, match="shape"):
        check_update(SiteUpdate("a", {"w": np.zeros((5, 3))}, 5, {0: 5}), shapes)
    with pytest.raises(PayloadViolation, match="names differ"):
        check_update(SiteUpdate("a", {"w": np.zeros((2, 3)), "z": np.zeros(5)}, 5, {0: 5}), shapes)
    with pytest.raises(PayloadViolation, match="metric"):
        check_update(SiteUpdate("a", {"w": np.zeros((2, 3))}, 5, {0: 5}, {"cell_ids": 3.0}), shapes)
    genes = ["g1", "g2", "g3"]
    ok = {
        "site": "a",
        "genes": genes,
        "batch_counts": {"b": 7},
        "stats": {"b": {"mean": [1.0, 2.0, 3.0], "n": 7}},
    }
    check_summary(ok, 3)  # as many cells as genes: per-gene lists are still fine
    with pytest.raises(PayloadViolation, match="outside the whitelist"):
        check_summary({**ok, "per_cell": list(range(7))}, 7)
    with pytest.raises(PayloadViolation, match="one entry per cell"):
        check_summary({**ok, "stats": {"b": {"x": list(range(7))}}}, 7)
    with pytest.raises(PayloadViolation, match="distinct"):
        check_summary({**ok, "labels": ["t", "t", "u"]}, 7)


def test_every_balancing_reply_is_whitelisted(small_adata, monkeypatch):
    """In process, every reply a site computes for balancing (its local summary, then
    per-cluster sums, with counts) passes the site's own check."""
    import scfedvi.federation.balance as balance
    import scfedvi.federation.balance_site as balance_site

    cfg = RunConfig(
        model=ModelConfig(n_hidden=16, n_latent=3),
        train=TrainConfig(batch_size=32, local_epochs=1),
        federation=FederationConfig(n_rounds=1, balance_rounds=2),  # the policy's most
    )
    sites = {"a": small_adata[:100].copy(), "b": small_adata[100:].copy()}
    model = ScFedVI.from_sites(sites, batch_key="batch", n_top_genes=None, config=cfg)
    model.train(progress=False)
    sent = []
    for name in ("local_summary", "cluster_sums"):
        real = getattr(balance_site, name)

        def recording(*a, _real=real, _phase=name, **k):
            out = _real(*a, **k)
            sent.append((_phase, out))
            return out

        monkeypatch.setattr(balance_site, name, recording)
    steps = model.balance_steps()
    assert len(steps) == 2
    assert [p for p, _ in sent].count("local_summary") == 2 * 2  # 2 sites x 2 passes
    assert [p for p, _ in sent].count("cluster_sums") == 2 * 2 * 2  # x 2 rounds
    for phase, (values, counts) in sent:
        kind, rows = (
            (balance.CENTROIDS, balance.LOCAL_PER_CLUSTER * 8)
            if phase == "local_summary"
            else (balance.SUMS, 8)
        )
        check_balance_reply("a", kind, values, counts, n_clusters=rows, n_latent=3)


def test_the_balancing_checker_can_fail():
    ok = np.ones((2, 3)), np.array([12, 20])
    check_balance_reply("a", "centroids", *ok, n_clusters=8, n_latent=3)
    with pytest.raises(PayloadViolation, match="fewer than 10 cells"):
        check_balance_reply("a", "centroids", ok[0], np.array([3, 20]), n_clusters=8, n_latent=3)
    with pytest.raises(PayloadViolation, match="a sum over fewer"):
        check_balance_reply("a", "sums", ok[0], np.array([3, 20]), n_clusters=8, n_latent=3)
    check_balance_reply("a", "sums", np.array([[0.0] * 3, [1.0] * 3]), np.array([3, 20]),
                        n_clusters=8, n_latent=3)  # fmt: skip
    with pytest.raises(PayloadViolation, match="at most 8 rows"):
        check_balance_reply(
            "a", "sums", np.ones((50, 3)), np.full(50, 20), n_clusters=8, n_latent=3
        )
    with pytest.raises(PayloadViolation, match="one integer per cluster"):
        check_balance_reply("a", "sums", *ok[:1], np.array([12.5, 20]), n_clusters=8, n_latent=3)
