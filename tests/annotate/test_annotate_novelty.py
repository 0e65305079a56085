"""Federated scANVI does not invent a label: a population no site labelled is reported as such;
the classifier's statistics pooled over the federation; the summaries behind both."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from scfedvi import ScFedVI
from scfedvi.annotate import LABEL_KEY, NOVELTY_KEY, AnnotateConfig, ScFedANVI
from scfedvi.annotate.site import (
    calibrate_classifier,
    label_centroids,
    label_summary,
    latent_moments,
    pooled_moments,
)
from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig
from scfedvi.module.scanvi import SCANVAE
from synthetic import make_counts

FAST = RunConfig(
    model=ModelConfig(n_hidden=32, n_latent=6, encode_covariates=True),
    train=TrainConfig(batch_size=32, n_epochs_kl_warmup=4, local_epochs=3),
    federation=FederationConfig(n_rounds=5, balance_clusters=3, balance_rounds=1, n_jobs=1),
)


@pytest.fixture(scope="module")
def novel_at_c():
    """Four cell types; type t3 lives only at site c, which has no labels."""
    adata = make_counts(480, 40, n_batches=3, n_types=4, seed=0)
    adata.obs["truth"] = adata.obs["cell_type"].astype(str)
    site = np.array(["a", "b", "c"])[np.arange(adata.n_obs) % 3]
    keep = (adata.obs["truth"] != "t3").to_numpy() | (site == "c")
    adata.obs["ct"] = np.where(site == "c", "Unknown", adata.obs["truth"])
    sites = {s: adata[(site == s) & keep].copy() for s in "abc"}
    base = ScFedVI.from_sites(sites, batch_key="batch", n_top_genes=None, config=FAST)
    base.train(progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ScFedANVI.from_scfedvi(
            base, label_key="ct", annotate=AnnotateConfig(n_rounds=3, local_epochs=5)
        )
    model.train()
    return model


def test_a_population_no_site_labelled_is_not_given_a_label(novel_at_c):
    model = novel_at_c
    assert model.labels == ("t0", "t1", "t2")
    c = model.sites["c"]
    novel = (c.obs["truth"] == "t3").to_numpy()
    # the attack on the answer: without the distance check, the classifier's probability alone
    model.annotate = replace(model.annotate, novelty_ratio=1e12)
    model.predict(site="c")
    by_probability = float((c.obs[LABEL_KEY][novel] == "Unknown").mean())
    model.annotate = replace(model.annotate, novelty_ratio=AnnotateConfig().novelty_ratio)
    model.predict(site="c")
    lab = c.obs[LABEL_KEY].astype(str).to_numpy()
    flagged, kept = (lab[novel] == "Unknown").mean(), (lab[~novel] != "Unknown").mean()
    ratio = c.obs[NOVELTY_KEY].to_numpy()
    assert np.median(ratio[novel]) > 3 * np.median(ratio[~novel])
    info = (flagged, by_probability, kept, np.quantile(ratio[novel], [0.1, 0.25, 0.5]))
    info += (np.quantile(ratio[~novel], [0.5, 0.75, 0.9, 0.95]),)
    assert flagged >= 0.8, info
    assert flagged > by_probability + 0.3, (flagged, by_probability)
    assert kept >= 0.5, kept  # cells of labelled types keep most of their labels


def test_saved_model_keeps_the_centroids_and_moments(novel_at_c, tmp_path):
    model = novel_at_c
    model.save(tmp_path / "m")
    loaded = ScFedANVI.load(tmp_path / "m")
    for a, b in ((model.label_centroids, loaded.label_centroids),):
        np.testing.assert_allclose(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1])
    np.testing.assert_allclose(model.latent_moments[1], loaded.latent_moments[1])
    site = model.sites["c"].copy()
    np.testing.assert_array_equal(loaded.predict(site, site="c"), model.predict(site="c"))
    (tmp_path / "vi").mkdir()  # an scFedVI model's directory: weights, no annotate.json
    np.savez(tmp_path / "vi" / "model.npz", w=np.zeros(1))
    with pytest.raises(FileNotFoundError, match=r"no saved scFedANVI model in .*annotate\.json"):
        ScFedANVI.load(tmp_path / "vi")


def test_label_summary_sends_nothing_for_a_label_under_the_policy_minimum():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 3))
    labels = np.array([0] * 25 + [1] * 9 + [-1] * 6)
    counts, sums, squares = label_summary(z, labels, 3, min_cells=10)
    np.testing.assert_array_equal(counts, [25, 0, 0])
    np.testing.assert_allclose(sums[0], z[:25].sum(0))
    assert not sums[1].any() and squares[1] == 0  # 9 cells: below the minimum, only zeros
    c, spread = label_centroids([(counts, sums, squares), label_summary(z, labels, 3, 5)])
    both = np.concatenate([z[:25], z[:25]])
    np.testing.assert_allclose(c[0], both.mean(0))
    np.testing.assert_allclose(spread[0], ((both - both.mean(0)) ** 2).sum(1).mean())
    assert np.isnan(c[2]).all()


def test_pooled_moments_equal_the_pooled_cells_and_set_the_classifier_statistics():
    rng = np.random.default_rng(1)
    parts = [rng.normal(i, 1 + i, size=(50 + 30 * i, 4)) for i in range(3)]
    mean, cov = pooled_moments([latent_moments(p, 10) for p in parts])
    allz = np.concatenate(parts)
    np.testing.assert_allclose(mean, allz.mean(0))
    np.testing.assert_allclose(cov, np.cov(allz.T, bias=True), atol=1e-10)
    assert latent_moments(parts[0][:5], 10)[0] == 0.0  # under the policy's minimum
    # the classifier's first BatchNorm gets the pooled distribution's mean and variance
    module = SCANVAE(20, 2, 3, ModelConfig(n_hidden=8, n_latent=4))
    draws = rng.multivariate_normal(mean, cov, size=20_000)
    calibrate_classifier(module, draws.astype(np.float32), torch.device("cpu"))
    lin, bn = module.classifier.classifier[0].fc_layers[0][:2]
    w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    np.testing.assert_allclose(bn.running_mean.numpy(), w @ mean + b, atol=0.05)
    np.testing.assert_allclose(bn.running_var.numpy(), np.diag(w @ cov @ w.T), rtol=0.05)


def test_annotate_config_names_a_bad_setting():
    with pytest.raises(ValueError, match="classifier_stats must be 'pooled' or 'site'"):
        AnnotateConfig(classifier_stats="global")
    with pytest.raises(ValueError, match="novelty_ratio must be > 0"):
        AnnotateConfig(novelty_ratio=0)
