"""The membership-inference attack: it finds members of an overfit model, says ~0.5 for a
model that never saw the cells and for random scores, and reports a correct low-FPR TPR."""

from __future__ import annotations

import numpy as np
import pytest

from scfedvi.benchmark.mia import attack_metrics, membership_inference
from scfedvi.config import FederationConfig, ModelConfig, RunConfig, TrainConfig


def test_attack_metrics_on_known_scores():
    rng = np.random.default_rng(0)
    same = attack_metrics(rng.normal(size=4000), rng.normal(size=4000))
    assert same["mia_auc"] == pytest.approx(0.5, abs=0.03)
    assert same["mia_tpr_at_1fpr"] == pytest.approx(0.01, abs=0.01)
    apart = attack_metrics(rng.normal(3, 1, 2000), rng.normal(0, 1, 2000))
    # AUC of N(3,1) vs N(0,1) is Phi(3/sqrt 2) = 0.983; TPR at 1% FPR is Phi(3 - 2.326) = 0.75
    assert apart["mia_auc"] == pytest.approx(0.983, abs=0.01)
    assert apart["mia_tpr_at_1fpr"] == pytest.approx(0.75, abs=0.06)
    assert attack_metrics([1.0, 2.0], [0.0, 0.5])["mia_auc"] == 1.0
    assert attack_metrics([1.0], [1.0])["mia_auc"] == 0.5
    assert np.isnan(attack_metrics([1.0], [])["mia_auc"])


def test_the_attack_finds_the_members_of_an_overfit_model(small_adata):
    """A VAE trained hard on half of a site's cells (full-batch Adam, no dropout, weak KL) has
    lower losses on them than on the other half: the attack sees it; before training it does
    not."""
    import torch

    from scfedvi.train.local import SiteTensors, build_module, train_validation_split
    from scfedvi.train.params import get_state

    cfg = RunConfig(
        model=ModelConfig(
            n_hidden=256, n_latent=10, dropout_rate=0.0, norm="none", decoder_norm="none"
        ),
        train=TrainConfig(train_size=0.5),
        federation=FederationConfig(seed=0),
    )
    data = SiteTensors(small_adata.X[:120], np.zeros(120, np.int64))
    train, _ = train_validation_split(data.n_cells, 0.5, 0)
    torch.manual_seed(0)
    module = build_module(data.X.shape[1], 1, cfg.model)
    before = get_state(module)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    x, b, nonzero = data.training_minibatch(train)
    for _ in range(500):
        opt.zero_grad()
        module.loss(x, b, kl_weight=0.1, nonzero=nonzero).loss.backward()
        opt.step()
    out = membership_inference(get_state(module), [("a", data)], data.X.shape[1], 1, cfg)
    assert out["mia_members"] == 60 and out["mia_nonmembers"] == 60
    assert out["mia_auc"] > 0.7
    assert membership_inference(before, [("a", data)], data.X.shape[1], 1, cfg)[
        "mia_auc"
    ] == pytest.approx(0.5, abs=0.2)
