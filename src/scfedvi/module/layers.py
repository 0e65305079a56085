"""Fully connected layers, encoder and decoder with scvi-tools' layout and parameter names.

The names of parameters and buffers equal those of ``scvi.module.VAE`` so that a trained model
exports to scvi-tools by loading its state dict.
"""

from __future__ import annotations

import collections
import itertools

import torch
from torch import nn

from scfedvi.config import Norm


def one_hot(index: torch.Tensor, n: int) -> torch.Tensor:
    """One-hot encoding of an ``(n_cells,)`` or ``(n_cells, 1)`` integer tensor."""
    return nn.functional.one_hot(index.reshape(-1).long(), n).float()


class FCLayers(nn.Module):
    """A stack of ``Linear -> Norm -> ReLU -> Dropout`` with the batch one-hot injected.

    As scvi-tools, a covariate with one category adds no input column.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_cat: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        norm: Norm = "batch",
        inject_covariates: bool = True,
    ) -> None:
        super().__init__()
        self.n_cat = n_cat if n_cat > 1 else 0
        self.inject_covariates = inject_covariates
        dims = [n_in] + (n_layers - 1) * [n_hidden] + [n_out]
        layers = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            extra = self.n_cat if self._inject(i) else 0
            layers.append(
                (
                    f"Layer {i}",
                    nn.Sequential(  # None slots keep scvi-tools' indices (and parameter names)
                        nn.Linear(d_in + extra, d_out),
                        nn.BatchNorm1d(d_out, momentum=0.01, eps=0.001)  # type: ignore[arg-type]
                        if norm == "batch"
                        else None,
                        nn.LayerNorm(d_out, elementwise_affine=False) if norm == "layer" else None,  # type: ignore[arg-type]
                        nn.ReLU(),
                        nn.Dropout(p=dropout_rate) if dropout_rate > 0 else None,  # type: ignore[arg-type]
                    ),
                )
            )
        self.fc_layers = nn.Sequential(collections.OrderedDict(layers))

    def _inject(self, i: int) -> bool:
        return i == 0 or self.inject_covariates

    def forward(self, x: torch.Tensor, batch_index: torch.Tensor | None = None) -> torch.Tensor:
        cov = one_hot(batch_index, self.n_cat) if self.n_cat and batch_index is not None else None
        for i, block in enumerate(self.fc_layers.children()):
            if cov is not None and self._inject(i):
                x = torch.cat((x, cov), dim=-1)
            for layer in block.children():
                if layer is not None:
                    x = layer(x)
        return x


class Encoder(nn.Module):
    """Maps (log1p) counts to the mean and variance of a Gaussian posterior."""

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        norm: Norm = "batch",
        var_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.var_eps = var_eps
        self.encoder = FCLayers(n_input, n_hidden, n_cat, n_layers, n_hidden, dropout_rate, norm)
        self.mean_encoder = nn.Linear(n_hidden, n_output)
        self.var_encoder = nn.Linear(n_hidden, n_output)

    def forward(
        self, x: torch.Tensor, batch_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.encoder(x, batch_index)
        qz_m = self.mean_encoder(q)
        qz_v = torch.exp(self.var_encoder(q)) + self.var_eps
        return qz_m, qz_v


class DecoderSCVI(nn.Module):
    """Maps a latent code and the batch to the expression scale, dispersion and dropout."""

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        norm: Norm = "batch",
    ) -> None:
        super().__init__()
        self.px_decoder = FCLayers(n_input, n_hidden, n_cat, n_layers, n_hidden, 0.0, norm)
        self.px_scale_decoder = nn.Sequential(nn.Linear(n_hidden, n_output), nn.Softmax(dim=-1))
        self.px_r_decoder = nn.Linear(n_hidden, n_output)
        self.px_dropout_decoder = nn.Linear(n_hidden, n_output)

    def forward(
        self, z: torch.Tensor, library: torch.Tensor, batch_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        px = self.px_decoder(z, batch_index)
        px_scale = self.px_scale_decoder(px)
        px_dropout = self.px_dropout_decoder(px)
        px_rate = torch.exp(library) * px_scale
        return px_scale, px_rate, px_dropout
