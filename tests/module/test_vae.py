"""The VAE: architecture and loss oracle against ``scvi.module.VAE``, and smoke tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfedvi.config import ModelConfig
from scfedvi.module.vae import VAE, norm_stat_keys

N_CELLS, N_GENES, N_BATCH = 64, 40, 3


def _data(n_batch: int = N_BATCH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rate = torch.exp(torch.randn(N_CELLS, N_GENES, generator=g))
    x = torch.poisson(rate * 3.0, generator=g)
    x[:, 0] += 1.0  # no empty cells
    b = torch.randint(0, n_batch, (N_CELLS, 1), generator=g)
    return x, b


def _randomize(module: torch.nn.Module, seed: int = 1) -> None:
    """Perturb every parameter and BatchNorm statistic, so that loading them is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))


# -- oracle against scvi-tools ---------------------------------------------------------------
ORACLE_CONFIGS = {
    "defaults": ModelConfig(),
    "nb-genebatch-layernorm-enc-2layers": ModelConfig(
        likelihood="nb",
        dispersion="gene-batch",
        norm="layer",
        encode_covariates=True,
        n_layers=2,
        n_hidden=32,
        n_latent=5,
    ),
    "poisson-nonorm": ModelConfig(
        likelihood="poisson", norm="none", decoder_norm=None, n_hidden=16
    ),
    "batchnorm-encoder-layernorm-decoder": ModelConfig(norm="batch", decoder_norm="layer"),
    "layernorm-encoder-batchnorm-decoder": ModelConfig(
        norm="layer", decoder_norm="batch", n_hidden=32
    ),
}


@pytest.fixture(scope="module")
def scvi_vae():
    """Builds ``scvi.module.VAE`` for a config (scvi-tools imported once per module)."""
    from scvi.module import VAE as ScviVAE

    from scfedvi.export import scvi_module_kwargs

    def build(config: ModelConfig, n_batch: int = N_BATCH):
        return ScviVAE(N_GENES, n_batch, **scvi_module_kwargs(config))

    return build


@pytest.mark.scvi
@pytest.mark.parametrize("name", list(ORACLE_CONFIGS))
def test_matches_scvi_module(scvi_vae, name: str) -> None:
    from scvi import REGISTRY_KEYS

    config = ORACLE_CONFIGS[name]
    ours = VAE(N_GENES, N_BATCH, config)
    ref = scvi_vae(config)

    # the same names and shapes, but for the library-size encoder
    ref_shapes = {
        k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith("l_encoder.")
    }
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes

    _randomize(ours)
    result = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("l_encoder.") for k in result.missing_keys)
    ours.eval()
    ref.eval()
    x, b = _data()

    with torch.no_grad():
        inf = ref.inference(x, b)
        torch.testing.assert_close(ours.latent(x, b), inf["qz"].loc, rtol=1e-5, atol=1e-5)

        tensors = {
            REGISTRY_KEYS.X_KEY: x,
            REGISTRY_KEYS.BATCH_KEY: b,
            REGISTRY_KEYS.LABELS_KEY: torch.zeros_like(b),
        }
        # the same seed draws the same reparametrization noise in both
        torch.manual_seed(7)
        _, _, ref_loss = ref.forward(tensors, loss_kwargs={"kl_weight": 0.3})
        torch.manual_seed(7)
        out = ours.loss(x, b, kl_weight=0.3)
    torch.testing.assert_close(
        out.reconstruction,
        ref_loss.reconstruction_loss["reconstruction_loss"],
        rtol=1e-5,
        atol=1e-3,
    )
    torch.testing.assert_close(
        out.kl_local, ref_loss.kl_local["kl_divergence_z"], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(out.loss, ref_loss.loss, rtol=1e-5, atol=1e-3)


@pytest.mark.scvi
def test_one_batch_matches_scvi(scvi_vae) -> None:
    """With one batch category, neither adds a one-hot column."""
    ours, ref = VAE(N_GENES, 1), scvi_vae(ModelConfig(), n_batch=1)
    ref_shapes = {
        k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith("l_encoder.")
    }
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes


# -- without scvi-tools ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(n_hidden=16, n_latent=4),
        ModelConfig(n_hidden=16, n_latent=4, dispersion="gene-batch"),
        ModelConfig(n_hidden=16, n_latent=4, likelihood="nb"),
        ModelConfig(n_hidden=16, n_latent=4, likelihood="poisson"),
        ModelConfig(n_hidden=16, n_latent=4, norm="layer"),
        ModelConfig(n_hidden=16, n_latent=4, norm="none", dropout_rate=0.0),
        ModelConfig(n_hidden=16, n_latent=4, encode_covariates=True),
        ModelConfig(n_hidden=16, n_latent=4, n_layers=2),
    ],
    ids=["zinb", "gene-batch", "nb", "poisson", "layernorm", "nonorm", "enc-cov", "2layers"],
)
def test_variants_train_with_finite_losses(config: ModelConfig) -> None:
    torch.manual_seed(0)
    x, b = _data()
    vae = VAE(N_GENES, N_BATCH, config)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    vae.train()
    losses = []
    for _ in range(5):
        out = vae.loss(x, b, kl_weight=1.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        assert out.reconstruction.shape == (N_CELLS,)
        assert out.kl_local.shape == (N_CELLS,)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in vae.parameters())

    inf = vae.inference(x, b)
    gen = vae.generative(inf["z"], inf["library"], b)
    assert inf["qz_m"].shape == inf["qz_v"].shape == (N_CELLS, config.n_latent)
    assert (inf["qz_v"] > 0).all()
    for key in ("px_scale", "px_rate", "px_r", "px_dropout"):
        assert gen[key].shape[-1] == N_GENES
    if config.dispersion == "gene-batch":
        assert vae.px_r.shape == (N_GENES, N_BATCH)
        assert gen["px_r"].shape == (N_CELLS, N_GENES)
        # a cell's dispersion is its batch's column
        torch.testing.assert_close(gen["px_r"][0], torch.exp(vae.px_r[:, int(b[0])]))
    else:
        assert vae.px_r.shape == (N_GENES,)
    torch.testing.assert_close(gen["px_scale"].sum(-1), torch.ones(N_CELLS))
    torch.testing.assert_close(gen["px_rate"].sum(-1), x.sum(-1))
    assert vae.latent(x, b).shape == (N_CELLS, config.n_latent)


def test_norm_variants_and_covariate_columns() -> None:
    cfg = ModelConfig(n_hidden=16, n_latent=4)
    assert cfg.norms == ("batch", "layer")  # the default: BatchNorm encoder, LayerNorm decoder
    assert norm_stat_keys(VAE(N_GENES, N_BATCH, cfg))
    assert ModelConfig(decoder_norm=None).norms == ("batch", "batch")  # scVI's
    for norm in ("layer", "none"):
        one = ModelConfig(n_hidden=16, n_latent=4, norm=norm, decoder_norm=None)
        vae = VAE(N_GENES, N_BATCH, one)
        assert norm_stat_keys(vae) == []
        has_ln = any(isinstance(m, torch.nn.LayerNorm) for m in vae.modules())
        assert has_ln == (norm == "layer")
    split = VAE(N_GENES, N_BATCH, ModelConfig(n_hidden=16, n_latent=4, decoder_norm="layer"))
    assert split.config.norms == ("batch", "layer")
    assert all(k.startswith("z_encoder.") for k in norm_stat_keys(split))
    assert norm_stat_keys(split)
    assert any(isinstance(m, torch.nn.LayerNorm) for m in split.decoder.modules())
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in split.z_encoder.modules())
    with pytest.raises(ValueError, match="decoder_norm"):
        ModelConfig(decoder_norm="group")  # type: ignore[arg-type]
    first = "z_encoder.encoder.fc_layers.Layer 0.0.weight"
    dec = "decoder.px_decoder.fc_layers.Layer 0.0.weight"
    plain = VAE(N_GENES, N_BATCH, cfg).state_dict()
    assert plain[first].shape == (16, N_GENES)  # the encoder sees counts only
    assert plain[dec].shape == (16, 4 + N_BATCH)  # the decoder sees the batch one-hot
    enc = VAE(N_GENES, N_BATCH, ModelConfig(n_hidden=16, n_latent=4, encode_covariates=True))
    assert enc.state_dict()[first].shape == (16, N_GENES + N_BATCH)
    deep = VAE(N_GENES, N_BATCH, ModelConfig(n_hidden=16, n_latent=4, n_layers=2))
    assert deep.state_dict()["decoder.px_decoder.fc_layers.Layer 1.0.weight"].shape == (
        16,
        16 + N_BATCH,
    )


def test_one_batch_adds_no_input_column() -> None:
    cfg = ModelConfig(n_hidden=16, n_latent=4, encode_covariates=True)
    one = VAE(N_GENES, 1, cfg).state_dict()
    assert one["z_encoder.encoder.fc_layers.Layer 0.0.weight"].shape == (16, N_GENES)
    assert one["decoder.px_decoder.fc_layers.Layer 0.0.weight"].shape == (16, 4)
    x, _ = _data()
    out = VAE(N_GENES, 1, cfg).loss(x, torch.zeros(N_CELLS, dtype=torch.long))
    assert torch.isfinite(out.loss)


def test_eval_latent_is_deterministic_and_batch_size_free() -> None:
    torch.manual_seed(0)
    x, b = _data()
    vae = VAE(N_GENES, N_BATCH, ModelConfig(n_hidden=16, n_latent=4)).eval()
    whole = vae.latent(x, b)
    halves = torch.cat([vae.latent(x[:20], b[:20]), vae.latent(x[20:], b[20:])])
    torch.testing.assert_close(whole, halves)
