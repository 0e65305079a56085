"""Federated scANVI on the deployment engine: SuperLink + three SuperNodes on loopback.

A scFedVI model trained in process (one round) is annotated by one ``flwr run`` with
``annotate-from`` and ``annotate-label-key`` (as ``scfedvi annotate --model`` continues a trained
run): the schema step, label counts, one scANVI round, balancing, summaries and predictions,
one site without labels. The scANVI model equals the in-process run's
(:class:`~scfedvi.annotate.ScFedANVI`, the same orchestration) within float rounding; every site wrote its predictions at the site, equal to
the in-process ones; the saved model labels a new site (``scfedvi embed --predict``); and no
reply of the stage carries more than counts, parameters and label or latent sums.
"""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pytest
from flower_harness import wait_result
from flower_sites import N_TOP, SITES, flower_run_config, run_config

from scfedvi.annotate import (
    CONFIDENCE_KEY,
    LABEL_KEY,
    LATENT_KEY,
    NOVELTY_KEY,
    AnnotateConfig,
    ScFedANVI,
)
from scfedvi.flower.annotate import MODEL_DIR
from scfedvi.flower.settings import write_app_dir
from scfedvi.model import ScFedVI

pytestmark = pytest.mark.flower

#: One scVI round (in process) and one scANVI round, without balancing (its messages over
#: Flower are those of scVI's balancing, tested in test_deployment.py; the scANVI stage's
#: balancing through them: tests/annotate/test_annotate_flower_loopback.py): 5 exchanges.
SETTINGS = {"num-server-rounds": 1, "balance-clusters": 0}
ANNOTATE = {"annotate-num-server-rounds": 1, "annotate-local-epochs": 1}
UNLABELLED = "site-c"


def _sites(site_files, d):
    """The test sites, with every cell of site-c unlabelled."""
    d.mkdir()
    paths, data = {}, {}
    for s in SITES:
        a = ad.read_h5ad(site_files.paths[s])
        if s == UNLABELLED:
            a.obs["cell_type"] = "Unknown"
        paths[s], data[s] = d / f"{s}.h5ad", a
        a.write_h5ad(paths[s])
    return paths, data


def _in_process(data, model_dir):
    cfg = run_config(n_rounds=1, balance_clusters=0)
    sites = dict(sorted(data.items()))
    base = ScFedVI.from_sites(sites, batch_key="batch", n_top_genes=N_TOP, config=cfg)
    base.train(progress=False)
    base.save(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        anvi = ScFedANVI.from_scfedvi(
            base, label_key="cell_type", annotate=AnnotateConfig(n_rounds=1, local_epochs=1)
        )
    anvi.train()
    return anvi


def test_annotate_deployment_equals_in_process(cluster, site_files, tmp_path):
    paths, data = _sites(site_files, tmp_path / "data")
    out, payloads = tmp_path / "server-out", tmp_path / "payloads.jsonl"
    anvi = _in_process(data, tmp_path / "model")
    cluster.start_superlink()
    for s in SITES:  # the label column is the site's own (its policy allows it)
        cluster.start_supernode(s, paths[s], **{"label-key": "cell_type"})
    extra = {
        **SETTINGS,
        **ANNOTATE,
        "annotate-from": str(tmp_path / "model"),
        "annotate-label-key": "cell_type",
        "payload-log": str(payloads),
    }
    run_id = cluster.run_app(write_app_dir(tmp_path / "app"), flower_run_config(out, **extra))
    result = wait_result(cluster, out, run_id, timeout=600)
    assert result["status"] == "completed", f"{result}\n{cluster.logs()}"
    stage = result
    assert stage["sites"] == list(SITES)
    assert stage["labels"] == ["type-0", "type-1", "type-2", "Unknown"]
    assert any(UNLABELLED in w and "unlabelled" in w for w in stage["warnings"])

    model = ScFedANVI.load(out / MODEL_DIR)
    assert model.schema.hash == anvi.schema.hash and set(model.params) == set(anvi.params)
    for k, v in anvi.params.items():
        np.testing.assert_allclose(model.params[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(model.latent_moments[1], anvi.latent_moments[1], atol=1e-4)
    np.testing.assert_allclose(model.label_centroids[0], anvi.label_centroids[0], atol=1e-4)

    for s in SITES:  # each site's predictions, written at the site, as in process
        got = ad.read_h5ad(tmp_path / "sites" / f"{s}.annotated.h5ad")
        anvi.predict(site=s)
        want = anvi.sites[s]
        assert stage["predicted"][s]["n-predicted"] == want.n_obs == got.n_obs
        assert (got.obs[LABEL_KEY].astype(str) == want.obs[LABEL_KEY].astype(str)).mean() > 0.99
        np.testing.assert_allclose(got.obs[CONFIDENCE_KEY], want.obs[CONFIDENCE_KEY], atol=1e-4)
        np.testing.assert_allclose(got.obs[NOVELTY_KEY], want.obs[NOVELTY_KEY], rtol=1e-3)
        np.testing.assert_allclose(got.obsm[LATENT_KEY], want.obsm[LATENT_KEY], atol=1e-4)

    from scfedvi.cli import main  # a new site, labelled with the saved model alone

    new = tmp_path / "new.h5ad"
    assert main(["embed", "--model", str(out / MODEL_DIR), "--input", str(paths["site-a"]),
                 "--predict", "--out", str(new)]) == 0  # fmt: skip
    assert ad.read_h5ad(new).obs[LABEL_KEY].notna().all()

    check_annotate_payloads(payloads, set(site_files.n_cells.values()))


def check_annotate_payloads(path, n_cells: set[int]) -> None:
    """The stage's replies: label counts, parameters, label and latent sums; no cell axis."""
    replies = [json.loads(line) for line in path.read_text().splitlines()]
    mine = [r for r in replies if r["type"] == "query.annotate"]
    assert not [r for r in replies if "error" in r]
    assert len(mine) == 4 * len(SITES)  # labels, one round, summary, predict
    assert {r["type"] for r in replies} == {"query.schema", "query.annotate"}
    allowed = {"site", "labels", "counts", "schema-hash", "round", "batch-counts"}
    allowed |= {"n-predicted", "n-low-confidence", "n-novel"}
    for r in mine:
        for name, rec in r["records"].items():
            if rec["kind"] == "config":
                assert set(rec["items"]) <= allowed, set(rec["items"]) - allowed
                for key, v in rec["items"].items():
                    assert not (v["type"].startswith("list") and v["len"] in n_cells), key
            elif rec["kind"] == "array":
                assert name in ("arrays", "summary"), name
                for key, a in rec["items"].items():
                    assert not (a["shape"] and a["shape"][0] in n_cells), (key, a)
