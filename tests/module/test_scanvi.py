"""scANVI: loss oracle against ``scvi.module.SCANVAE`` on the same weights and minibatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfedvi.config import ModelConfig
from scfedvi.module.scanvi import SCANVAE, label_layer_keys
from scfedvi.module.vae import VAE

N_CELLS, N_GENES, N_BATCH, N_LABELS = 48, 30, 3, 4


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.exp(torch.randn(N_CELLS, N_GENES, generator=g)) * 3.0, generator=g)
    x[:, 0] += 1.0
    b = torch.randint(0, N_BATCH, (N_CELLS, 1), generator=g)
    y = torch.randint(0, N_LABELS, (N_CELLS, 1), generator=g)
    return x, b, y


def _randomize(module: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name == "y_prior":
                t.copy_(torch.softmax(torch.randn(t.shape, generator=g), -1))  # non-uniform
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))


CONFIGS = {
    "defaults": (ModelConfig(n_hidden=32, n_latent=6), False),
    "nb-2layers-batchnorm-both-linear": (
        ModelConfig(n_hidden=16, n_latent=5, n_layers=2, likelihood="nb", decoder_norm=None),
        True,
    ),
}


@pytest.mark.scvi
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_terms_match_scvi_scanvae(name: str) -> None:
    from scvi import REGISTRY_KEYS
    from scvi.module import SCANVAE as ScviSCANVAE

    from scfedvi.export import scvi_module_kwargs

    config, linear = CONFIGS[name]
    ours = SCANVAE(N_GENES, N_BATCH, N_LABELS, config, linear_classifier=linear)
    ref = ScviSCANVAE(
        N_GENES,
        N_BATCH,
        N_LABELS,
        linear_classifier=linear,
        **scvi_module_kwargs(config),
    )
    ref_shapes = {
        k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith("l_encoder.")
    }
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    _randomize(ours)
    res = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not res.unexpected_keys and all(k.startswith("l_encoder.") for k in res.missing_keys)
    ours.eval()  # no dropout, running statistics: the same deterministic function
    ref.eval()
    x, b, y = _data()
    xl, bl, yl = x[:20], b[:20], y[:20]
    tensors = {REGISTRY_KEYS.X_KEY: x, REGISTRY_KEYS.BATCH_KEY: b, REGISTRY_KEYS.LABELS_KEY: y}
    labelled = {REGISTRY_KEYS.X_KEY: xl, REGISTRY_KEYS.BATCH_KEY: bl, REGISTRY_KEYS.LABELS_KEY: yl}
    with torch.no_grad():
        torch.manual_seed(3)  # the same draws of z and z2 in both
        _, _, ref_out = ref.forward(
            tensors,
            loss_kwargs={
                "kl_weight": 0.4,
                "labelled_tensors": labelled,
                "classification_ratio": 50,
            },
        )
        torch.manual_seed(3)
        out = ours.loss(x, b, kl_weight=0.4, labelled=(xl, bl, yl), classification_ratio=50)
        torch.testing.assert_close(ours.classify(x, b), ref.classify(x, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out.reconstruction,
        ref_out.reconstruction_loss["reconstruction_loss"],
        rtol=1e-5,
        atol=1e-3,
    )
    torch.testing.assert_close(
        out.kl_local, next(iter(ref_out.kl_local.values())), rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(out.classification_loss, ref_out.classification_loss)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-3)
    # the terms are not trivially equal: labels and the z2 layers matter
    assert float(out.classification_loss) > 0.1
    with torch.no_grad():
        torch.manual_seed(3)
        unlabelled = ours.loss(x, b, kl_weight=0.4)
    torch.testing.assert_close(out.loss - unlabelled.loss, 50 * out.classification_loss)


def test_from_scvi_weights_and_training() -> None:
    """Initialised from scVI weights (as ``SCANVI.from_scvi_model``): the scVI entries equal,
    the latent is scVI's; a few steps on labelled cells lower the loss."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_hidden=16, n_latent=4)
    vae = VAE(N_GENES, N_BATCH, cfg)
    scanvi = SCANVAE(N_GENES, N_BATCH, N_LABELS, cfg)
    scanvi.load_state_dict(vae.state_dict(), strict=False)
    assert set(scanvi.state_dict()) - set(vae.state_dict()) == set(label_layer_keys(scanvi))
    x, b, y = _data()
    vae.eval()
    scanvi.eval()
    torch.testing.assert_close(scanvi.latent(x, b), vae.latent(x, b))
    scanvi.train()
    opt = torch.optim.Adam([p for p in scanvi.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        out = scanvi.loss(x, b, labelled=(x, b, y))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert scanvi.y_prior.grad is None  # the prior is fixed
    probs = scanvi.predict_proba(scanvi.latent(x, b))
    torch.testing.assert_close(probs.sum(-1), torch.ones(N_CELLS))
