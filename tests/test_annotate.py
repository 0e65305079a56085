"""Federated scANVI: label harmonization, training, predictions at each site, a new site."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest

from scfedvi import ScFedVI
from scfedvi.annotate import (
    CONFIDENCE_KEY,
    LABEL_KEY,
    LATENT_KEY,
    NOVELTY_KEY,
    AnnotateConfig,
    ScFedANVI,
    load_query_data,
)
from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig
from scfedvi.data.errors import SchemaMismatchError, SiteDataError, SiteDataWarning
from scfedvi.data.labels import harmonize_labels, site_label_counts
from synthetic import make_counts

FAST = RunConfig(
    model=ModelConfig(n_hidden=16, n_latent=4, encode_covariates=True),
    train=TrainConfig(batch_size=32, n_epochs_kl_warmup=2, local_epochs=2),
    federation=FederationConfig(n_rounds=3, balance_clusters=2, balance_rounds=1),
)
ANVI = AnnotateConfig(n_rounds=3, local_epochs=5)


def _sites():
    adata = make_counts(288, 40, n_batches=3, n_types=3, seed=1)
    adata.obs["truth"] = adata.obs["cell_type"].astype(str)
    lab = np.array(["a", "b", "c"])[np.arange(adata.n_obs) // 96]
    adata.obs["ct"] = adata.obs["truth"]
    adata.obs.loc[lab == "c", "ct"] = "Unknown"  # site c has no labels
    return {s: adata[lab == s].copy() for s in "abc"}


@pytest.fixture(scope="module")
def fitted():
    sites = _sites()
    base = ScFedVI.from_sites(sites, batch_key="batch", n_top_genes=None, config=FAST)
    base.train(progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ScFedANVI.from_scfedvi(base, label_key="ct", annotate=ANVI)
    assert any("site 'c'" in str(w.message) and "obs['ct']" in str(w.message) for w in caught)
    model.train()
    return base, model


def test_labels_are_the_union_without_the_unlabelled_category(fitted):
    _, model = fitted
    assert model.labels == ("t0", "t1", "t2")
    assert model.schema.labels == ("t0", "t1", "t2", "Unknown")
    # as from_scvi_model: the trained scVI weights are the starting point
    base, _ = fitted
    assert model.init_params is not None
    for k, v in base.params.items():
        np.testing.assert_array_equal(model.init_params[k], v)


def test_training_rounds_average_the_scanvi_layers_and_keep_local_statistics(fitted):
    _, model = fitted
    h = model.history
    assert len(h) == 3 * ANVI.n_rounds and np.isfinite(h["loss"]).all()
    assert any(k.startswith("classifier.") for k in model.params)
    assert not any(k.endswith("running_mean") for k in model.params)  # site-local


def test_predictions_at_each_site_with_confidence(fitted):
    _, model = fitted
    accs = {}
    for s in "abc":
        pred = model.predict(site=s)
        ad_ = model.sites[s]
        accs[s] = float((pred == ad_.obs["truth"].to_numpy()).mean())
        assert ad_.obsm[LATENT_KEY].shape == (ad_.n_obs, 4)
        conf = ad_.obs[CONFIDENCE_KEY].to_numpy()
        assert ((conf > 0) & (conf <= 1)).all()
        novel = ad_.obs[NOVELTY_KEY].to_numpy() > model.annotate.novelty_ratio
        low = (conf < model.annotate.confidence_threshold) | novel
        # low-confidence and novel cells get the unlabelled category, the others their top label
        assert (ad_.obs[LABEL_KEY][low] == "Unknown").all()
        assert (ad_.obs[LABEL_KEY][~low].to_numpy() == pred[~low]).all()
    assert accs["c"] > 0.6, accs  # the site without labels: three types, chance is 1/3
    soft = model.predict(site="c", soft=True, write=False)
    assert list(soft.columns) == ["t0", "t1", "t2"]
    np.testing.assert_allclose(soft.to_numpy().sum(1), 1.0, rtol=1e-5)


def test_saved_model_predicts_a_new_site_alone_and_query_tunes_its_batch(fitted, tmp_path):
    _, model = fitted
    model.save(tmp_path / "m")
    loaded = ScFedANVI.load(tmp_path / "m")
    site = model.sites["c"].copy()
    np.testing.assert_array_equal(loaded.predict(site, site="c"), model.predict(site="c"))
    new = site.copy()
    new.obs["batch"] = "b-new"
    # the encoder reads the batch here: an unseen batch needs query fine-tuning, and says so
    with pytest.raises(SchemaMismatchError, match=r"site 'lab-new'.*obs\['batch'\].*load_query"):
        loaded.predict(new, site="lab-new")
    q = load_query_data(loaded, new, site="lab-new", n_epochs=2)
    assert q.schema.batches[-1] == "b-new"
    extended = 0
    for k, v in loaded.params.items():  # only the new batch's columns moved
        t = q.params[k]
        if t.shape == v.shape:
            np.testing.assert_array_equal(t, v, err_msg=k)
        else:
            extended += 1
            assert t.shape[1] == v.shape[1] + 1
            np.testing.assert_array_equal(t[:, : v.shape[1]], v, err_msg=k)
    assert extended == 2  # the encoder's and the decoder's first layers
    pred = q.predict(new, site="lab-new")
    assert new.obsm[LATENT_KEY].shape == (new.n_obs, 4)
    assert float((pred == new.obs["truth"].to_numpy()).mean()) > 0.5


def test_new_site_missing_genes_is_named(fitted):
    _, model = fitted
    site = model.sites["a"]
    few = site[:, site.var_names[:10]].copy()
    with pytest.raises(SchemaMismatchError, match="site 'lab-x': var_names has only 10"):
        model.predict(few, site="lab-x")


# -- label harmonization ---------------------------------------------------------------------
def test_label_column_missing_or_all_unlabelled_is_named():
    sites = _sites()
    del sites["b"].obs["ct"]
    with pytest.raises(SiteDataError, match=r"site 'b': obs\['ct'\].*missing.*'Unknown'"):
        site_label_counts(sites["b"], site="b", label_key="ct", unlabeled_category="Unknown")
    with (
        pytest.warns(SiteDataWarning, match=r"site 'b': every cell of obs\['ct'\] is 'Unknown'"),
        pytest.warns(SiteDataWarning, match=r"site 'a': every cell of obs\['ct'\] is 'Unknown'"),
        pytest.raises(SiteDataError, match=r"no site has a labelled cell.*obs\['ct'\]"),
    ):
        harmonize_labels(
            {"a": {"Unknown": 5}, "b": {"Unknown": 3}}, label_key="ct", unlabeled_category="Unknown"
        )


def test_single_site_and_case_whitespace_labels_warn():
    counts = {"a": {"T cell": 4, "B": 2}, "b": {"t cell ": 3, "B": 5, "Unknown": 7}}
    with pytest.warns(SiteDataWarning) as rec:
        labels = harmonize_labels(counts, label_key="ct", unlabeled_category="Unknown")
    msgs = " | ".join(str(w.message) for w in rec)
    assert labels == ("B", "T cell", "t cell ")
    assert "differ only by case or whitespace: 'T cell' at ['a']; 't cell ' at ['b']" in msgs
    assert "label 'T cell' of obs['ct'] is held by site 'a' only" in msgs


# -- command line ----------------------------------------------------------------------------
def test_cli_annotate_then_embed_predict_a_new_site(fitted, tmp_path, capsys):
    from scfedvi.cli import main

    base, _ = fitted
    base.save(tmp_path / "run" / "model")
    paths = {}
    for s, a in _sites().items():
        paths[s] = tmp_path / f"{s}.h5ad"
        a.write_h5ad(paths[s])
    sites = [f"--site={s}={p}" for s, p in paths.items()]
    args = ["annotate", "--model", str(tmp_path / "run" / "model"), *sites, "--label-key", "ct"]
    args += ["--rounds", "1", "--local-epochs", "1", "--out", str(tmp_path / "ann")]
    with pytest.warns(SiteDataWarning, match="site 'c': every cell"):
        assert main(args) == 0
    import anndata as ad

    got = ad.read_h5ad(tmp_path / "ann" / "c.h5ad")
    assert {LABEL_KEY, CONFIDENCE_KEY} <= set(got.obs) and LATENT_KEY in got.obsm
    new = _sites()["c"]
    new.obs["batch"] = "b-new"
    new.write_h5ad(tmp_path / "new.h5ad")
    emb = [
        "embed",
        "--model",
        str(tmp_path / "ann" / "model"),
        "--input",
        str(tmp_path / "new.h5ad"),
    ]
    emb += ["--out", str(tmp_path / "new.out.h5ad"), "--predict"]
    assert main(emb) == 2  # an unseen batch and a batch-reading encoder: the fix is named
    assert "--query-epochs" in capsys.readouterr().err
    assert main([*emb, "--query-epochs", "1"]) == 0
    assert LABEL_KEY in ad.read_h5ad(tmp_path / "new.out.h5ad").obs
    # bad input: a site without the label column is named with the column and the fix
    bad = _sites()["b"]
    del bad.obs["ct"]
    bad.write_h5ad(paths["b"])
    args[-1] = str(tmp_path / "ann2")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "site 'b': obs['ct'] (the label column) is missing; add it" in err


def test_classifier_is_averaged_over_the_labelled_sites_only():
    """A site without labels does not pull the classifier back to the round's start; every
    other parameter is averaged by cells as in scFedVI."""
    from scfedvi.annotate.protocol import LabelCoordinator, use_module
    from scfedvi.federation.aggregate import SiteUpdate
    from scfedvi.module.scanvi import SCANVAE

    cfg = replace(FAST, model=ModelConfig(n_hidden=8, n_latent=3))
    coord = LabelCoordinator(20, 2, cfg)
    use_module(coord, SCANVAE(20, 2, 3, cfg.model), cfg)
    assert "y_prior" not in coord.params  # fixed at every site: DP noise would break it
    start = {k: v.copy() for k, v in coord.params.items()}
    moved = {k: v + 1.0 if v.dtype.kind == "f" else v for k, v in start.items()}
    ups = [
        SiteUpdate("a", moved, 30, {0: 30}, {"labelled_cells": 25.0}),
        SiteUpdate("b", start, 90, {1: 90}, {"labelled_cells": 0.0}),
    ]
    coord.aggregate(ups)
    clf = "classifier.classifier.1.weight"
    np.testing.assert_allclose(coord.params[clf], moved[clf], rtol=1e-6)
    shared = "decoder.px_decoder.fc_layers.Layer 0.0.bias"
    np.testing.assert_allclose(coord.params[shared], start[shared] + 0.25, rtol=1e-6)


def test_flower_run_config_keys_are_annotate_configs():
    """Every AnnotateConfig field is an ``annotate-*`` run-config key with its default (the
    app's pyproject section is generated from them: tests/test_docs_defaults.py), and a
    changed key reaches the Flower run's AnnotateConfig."""
    from dataclasses import fields

    from scfedvi.flower.settings import annotate_from_flower, default_run_config

    rc = default_run_config()
    keys = {k for k in rc if k.startswith("annotate-")}
    assert keys == {
        "annotate-from",
        "annotate-label-key",
        *(f"annotate-{'num-server-rounds' if f.name == 'n_rounds' else f.name.replace('_', '-')}"
          for f in fields(AnnotateConfig)),
    }  # fmt: skip
    assert annotate_from_flower(rc) == AnnotateConfig()
    rc.update({"annotate-num-server-rounds": 3, "annotate-classifier-stats": "site"})
    assert annotate_from_flower(rc) == AnnotateConfig(n_rounds=3, classifier_stats="site")


def test_label_counts_follow_the_site_policy_in_process(fitted):
    """In process as over Flower (tests/annotate/test_annotate_flower_loopback.py): a site's
    policy that does not allow the label column refuses its label counts."""
    from scfedvi.config import SitePolicy
    from scfedvi.privacy.policy import PolicyRefusal

    base, _ = fitted
    try:
        base.policy = SitePolicy()  # the scFedVI run had no label column of its own
        with pytest.raises(PolicyRefusal, match=r"site 'a' refuses.*obs\['ct'\].*allowed label"):
            ScFedANVI.from_scfedvi(base, label_key="ct", annotate=ANVI)
        base.policy = SitePolicy(allowed_label_keys=("ct",))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert ScFedANVI.from_scfedvi(base, label_key="ct").labels == ("t0", "t1", "t2")
    finally:
        base.policy = None
