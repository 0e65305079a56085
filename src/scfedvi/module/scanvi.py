"""scANVI: the semi-supervised scVI of scvi-tools' ``SCANVAE``, pure torch.

The model adds to scVI (:class:`~scfedvi.module.vae.VAE`) a classifier ``q(y | z1)`` on the
latent space and a second latent layer: ``q(z2 | z1, y)`` (``encoder_z2_z1``) and
``p(z1 | z2, y)`` (``decoder_z1_z2``), with a prior ``p(y)`` (``y_prior``, uniform as in
scvi-tools). As scvi-tools 1.4, every cell of a minibatch (labelled or not) contributes the
ELBO with ``y`` marginalized under the classifier's probabilities, and a separate minibatch of
labelled cells contributes the classifier's cross-entropy, weighted by
``classification_ratio`` (50). Parameter names equal scvi-tools' so that weights load across.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Categorical
from torch.distributions import kl_divergence as kl_dist

from scfedvi.config import ModelConfig
from scfedvi.module.distributions import NonzeroCounts, kl_normal_standard
from scfedvi.module.layers import Encoder, FCLayers
from scfedvi.module.vae import VAE, LossOutput

#: scvi-tools' default weight of the classification loss (``SemiSupervisedTrainingPlan``).
CLASSIFICATION_RATIO = 50.0
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class ScanviLossOutput(LossOutput):
    """:class:`LossOutput` plus the classifier's cross-entropy on the labelled minibatch."""

    classification_loss: torch.Tensor | None = None


class Classifier(nn.Module):
    """scvi-tools' ``Classifier`` (``logits=True``): ``FCLayers -> Linear`` on ``z``.

    ``n_layers=0`` is the linear classifier (one ``Linear``).
    """

    def __init__(
        self,
        n_input: int,
        n_hidden: int,
        n_labels: int,
        n_layers: int,
        dropout_rate: float,
        norm: str,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if n_hidden > 0 and n_layers > 0:
            layers.append(
                FCLayers(n_input, n_hidden, 0, n_layers, n_hidden, dropout_rate, norm)  # type: ignore[arg-type]
            )
        else:
            n_hidden = n_input
        layers.append(nn.Linear(n_hidden, n_labels))
        self.classifier = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z)


class DecoderZ1(nn.Module):
    """scvi-tools' ``Decoder``: the mean and variance of ``p(z1 | z2, y)``."""

    def __init__(self, n_latent: int, n_labels: int, n_layers: int, n_hidden: int, norm: str):
        super().__init__()
        self.decoder = FCLayers(n_latent, n_hidden, n_labels, n_layers, n_hidden, 0.0, norm)  # type: ignore[arg-type]
        self.mean_decoder = nn.Linear(n_hidden, n_latent)
        self.var_decoder = nn.Linear(n_hidden, n_latent)

    def forward(self, z2: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.decoder(z2, y)
        return self.mean_decoder(p), torch.exp(self.var_decoder(p))


def _normal_log_prob(x: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Normal(m, sqrt(v)).log_prob(x)`` as torch computes it."""
    return -((x - m) ** 2) / (2 * v) - torch.log(v.sqrt()) - _HALF_LOG_2PI


class SCANVAE(VAE):
    """scANVI with scvi-tools' ``SCANVAE`` semantics and parameter names.

    Parameters
    ----------
    n_input, n_batch, config
        As :class:`~scfedvi.module.vae.VAE`.
    n_labels
        Number of known labels (the unlabelled category excluded).
    linear_classifier
        A single linear layer as classifier (scvi-tools' ``linear_classifier``).
    classification_ratio
        Weight of the cross-entropy on labelled cells (scvi-tools' training plan: 50).
    """

    semi_supervised = True
    #: The loss hook of federated training: an iterator of labelled minibatches ``(x, batch,
    #: y)`` that a site sets for a round (:class:`scfedvi.annotate.site.LabelledStream`).
    #: In training mode, :meth:`loss` called without ``labelled`` draws the next one, so the
    #: generic local update trains scANVI as scvi-tools' semi-supervised data loader does.
    labelled_stream: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def __init__(
        self,
        n_input: int,
        n_batch: int,
        n_labels: int,
        config: ModelConfig | None = None,
        *,
        linear_classifier: bool = False,
        classification_ratio: float = CLASSIFICATION_RATIO,
    ) -> None:
        super().__init__(n_input, n_batch, config)
        if n_labels < 1:
            raise ValueError(f"SCANVAE needs at least one label; got n_labels={n_labels}")
        cfg = self.config
        enc_norm, dec_norm = cfg.norms
        self.n_labels = n_labels
        self.classification_ratio = float(classification_ratio)
        self.classifier = Classifier(
            cfg.n_latent,
            0 if linear_classifier else cfg.n_hidden,
            n_labels,
            0 if linear_classifier else cfg.n_layers,
            cfg.dropout_rate,
            enc_norm,
        )
        self.encoder_z2_z1 = Encoder(
            cfg.n_latent,
            cfg.n_latent,
            n_cat=n_labels,
            n_layers=cfg.n_layers,
            n_hidden=cfg.n_hidden,
            dropout_rate=cfg.dropout_rate,
            norm=enc_norm,
        )
        self.decoder_z1_z2 = DecoderZ1(cfg.n_latent, n_labels, cfg.n_layers, cfg.n_hidden, dec_norm)
        self.y_prior = nn.Parameter(torch.ones(1, n_labels) / n_labels, requires_grad=False)

    # -- classification ----------------------------------------------------------------------
    def classify(self, x: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """Logits of ``q(y | z)`` at the posterior mean of ``z`` (scvi-tools' ``classify``)."""
        qz_m, _ = self.z_encoder(torch.log1p(x), batch_index)
        return self.classifier(qz_m)

    def classification_loss(
        self, x: torch.Tensor, batch_index: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Mean cross-entropy of the labelled cells."""
        return nn.functional.cross_entropy(self.classify(x, batch_index), y.reshape(-1).long())

    # -- the ELBO ----------------------------------------------------------------------------
    def loss(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        kl_weight: float = 1.0,
        nonzero: NonzeroCounts | None = None,
        labelled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        classification_ratio: float | None = None,
    ) -> ScanviLossOutput:
        """scvi-tools' ``SCANVAE.loss``: the ELBO with ``y`` marginalized for every cell, plus
        ``classification_ratio`` times the cross-entropy on ``labelled = (x, batch, y)``."""
        if labelled is None and self.training and self.labelled_stream is not None:
            labelled = tuple(t.to(x.device) for t in next(self.labelled_stream))  # type: ignore[assignment]
        inf = self.inference(x, batch_index)
        gen = self.generative(inf["z"], inf["library"], batch_index)
        rec = self.reconstruction_loss(x, gen, nonzero)
        z1, qz_m, qz_v = inf["z"], inf["qz_m"], inf["qz_v"]
        n, k = z1.shape[0], self.n_labels
        ys = torch.arange(k, device=z1.device).repeat_interleave(n)
        z1s = z1.repeat(k, 1)
        qz2_m, qz2_v = self.encoder_z2_z1(z1s, ys)
        z2 = qz2_m + qz2_v.sqrt() * torch.randn_like(qz2_m)
        pz1_m, pz1_v = self.decoder_z1_z2(z2, ys)
        kl_z2 = kl_normal_standard(qz2_m, qz2_v).view(k, n).t()
        loss_z1_unweight = -_normal_log_prob(z1s, pz1_m, pz1_v).sum(-1).view(k, n).t()
        loss_z1_weight = _normal_log_prob(z1, qz_m, qz_v).sum(-1)
        probs = nn.functional.softmax(self.classifier(z1), dim=-1)
        rec = rec + loss_z1_weight + (loss_z1_unweight * probs).sum(-1)
        kl = (kl_z2 * probs).sum(-1) + kl_dist(
            Categorical(probs=probs), Categorical(probs=self.y_prior.repeat(n, 1))
        )
        loss = torch.mean(rec + kl * kl_weight)
        ce = None
        if labelled is not None:
            ratio = (
                self.classification_ratio if classification_ratio is None else classification_ratio
            )
            ce = self.classification_loss(*labelled)
            loss = loss + ce * ratio
        return ScanviLossOutput(loss=loss, reconstruction=rec, kl_local=kl, classification_loss=ce)

    forward = loss

    @torch.no_grad()
    def predict_proba(self, z: torch.Tensor) -> torch.Tensor:
        """Label probabilities of latent codes (softmax of the classifier's logits)."""
        return nn.functional.softmax(self.classifier(z), dim=-1)


def label_layer_keys(module: nn.Module) -> list[str]:
    """Entries of the scANVI-only layers (classifier, ``z2`` encoder and decoder, prior)."""
    return [
        k
        for k in module.state_dict()
        if k.startswith(("classifier.", "encoder_z2_z1.", "decoder_z1_z2.", "y_prior"))
    ]
