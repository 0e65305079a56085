"""The scVI variational autoencoder: ``inference -> generative -> loss``, pure torch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scfedvi.config import ModelConfig
from scfedvi.module.distributions import (
    NonzeroCounts,
    kl_normal_standard,
    log_nb_positive,
    log_poisson,
    zinb_log_likelihood_cells,
)
from scfedvi.module.layers import DecoderSCVI, Encoder, one_hot


@dataclass
class LossOutput:
    """Minibatch loss: ``loss`` is the mean negative ELBO (with the KL weight) over cells."""

    loss: torch.Tensor
    reconstruction: torch.Tensor  # per cell, summed over genes
    kl_local: torch.Tensor  # per cell

    @property
    def elbo(self) -> torch.Tensor:
        """Mean negative ELBO (KL weight 1)."""
        return (self.reconstruction + self.kl_local).mean()


class VAE(nn.Module):
    """scVI: encoder ``q(z | x)``, decoder ``p(x | z, s, l)`` with observed library size ``l``.

    Parameters
    ----------
    n_input
        Number of genes.
    n_batch
        Number of batch categories (the decoder is conditioned on the batch one-hot).
    config
        The architecture and likelihood.
    """

    def __init__(self, n_input: int, n_batch: int, config: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = config or ModelConfig()
        self.config = cfg
        self.n_input = n_input
        self.n_batch = n_batch
        if cfg.dispersion == "gene":
            self.px_r = nn.Parameter(torch.randn(n_input))
        else:
            self.px_r = nn.Parameter(torch.randn(n_input, n_batch))
        self.z_encoder = Encoder(
            n_input,
            cfg.n_latent,
            n_cat=n_batch if cfg.encode_covariates else 0,
            n_layers=cfg.n_layers,
            n_hidden=cfg.n_hidden,
            dropout_rate=cfg.dropout_rate,
            norm=cfg.norm,
        )
        self.decoder = DecoderSCVI(
            cfg.n_latent,
            n_input,
            n_cat=n_batch,
            n_layers=cfg.n_layers,
            n_hidden=cfg.n_hidden,
            norm=cfg.norms[1],
        )

    def inference(
        self, x: torch.Tensor, batch_index: torch.Tensor, n_samples: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Posterior mean/variance of ``z``, a reparametrized sample, and the log library."""
        library = torch.log(x.sum(dim=1, keepdim=True))
        qz_m, qz_v = self.z_encoder(torch.log1p(x), batch_index)
        z = qz_m + qz_v.sqrt() * torch.randn_like(qz_m)
        return {"qz_m": qz_m, "qz_v": qz_v, "z": z, "library": library}

    def generative(
        self, z: torch.Tensor, library: torch.Tensor, batch_index: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Parameters of ``p(x | z, s, l)``."""
        px_scale, px_rate, px_dropout = self.decoder(z, library, batch_index)
        px_r: torch.Tensor
        if self.config.dispersion == "gene":
            px_r = self.px_r
        else:
            px_r = nn.functional.linear(one_hot(batch_index, self.n_batch), self.px_r)
        return {
            "px_scale": px_scale,
            "px_rate": px_rate,
            "px_r": torch.exp(px_r),
            "px_dropout": px_dropout,
        }

    def reconstruction_loss(
        self,
        x: torch.Tensor,
        gen: dict[str, torch.Tensor],
        nonzero: NonzeroCounts | None = None,
    ) -> torch.Tensor:
        """Negative log likelihood of the counts, summed over genes (one value per cell).

        ``nonzero``: the nonzero entries of ``x``, when the caller has them from sparse storage.
        """
        lik = self.config.likelihood
        if lik == "zinb":
            return -zinb_log_likelihood_cells(
                x, gen["px_rate"], gen["px_r"], gen["px_dropout"], nonzero
            )
        if lik == "nb":
            ll = log_nb_positive(x, gen["px_rate"], gen["px_r"])
        else:
            ll = log_poisson(x, gen["px_rate"])
        return -ll.sum(dim=-1)

    def loss(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        kl_weight: float = 1.0,
        nonzero: NonzeroCounts | None = None,
    ) -> LossOutput:
        """Mean over cells of ``reconstruction + kl_weight * KL(q(z|x) || p(z))``."""
        inf = self.inference(x, batch_index)
        gen = self.generative(inf["z"], inf["library"], batch_index)
        rec = self.reconstruction_loss(x, gen, nonzero)
        kl = kl_normal_standard(inf["qz_m"], inf["qz_v"])
        return LossOutput(loss=(rec + kl_weight * kl).mean(), reconstruction=rec, kl_local=kl)

    forward = loss

    @torch.no_grad()
    def latent(self, x: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """Posterior mean of ``z`` (what scvi-tools' ``get_latent_representation`` returns)."""
        qz_m, _ = self.z_encoder(torch.log1p(x), batch_index)
        return qz_m


def norm_stat_keys(module: nn.Module) -> list[str]:
    """Names of the normalization buffers (BatchNorm running statistics) of a module."""
    return [
        name
        for name, _ in module.named_buffers()
        if name.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
