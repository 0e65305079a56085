"""The site side of federated scANVI: labelled data, the labelled minibatch stream, prediction.

A site trains scANVI with the same local update as scFedVI (:func:`scfedvi.train.local.
local_update`): its module draws a labelled minibatch per step from the site's own labelled
training cells (:class:`LabelledStream`, the loss hook of :class:`~scfedvi.module.scanvi.
SCANVAE`), as scvi-tools' semi-supervised data loader pairs every minibatch with one of
labelled cells. Predictions are computed at the site with its own statistics; nothing but
parameters and scalar metrics leaves it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scfedvi.config import RunConfig
from scfedvi.federation.site import SiteWorker
from scfedvi.module.scanvi import SCANVAE
from scfedvi.train.local import SiteTensors, round_seed, train_validation_split

log = logging.getLogger(__name__)

#: A site needs this many labelled training cells to contribute the classification loss
#: (BatchNorm in training mode cannot normalize fewer).
MIN_LABELLED = 3
#: Draws from the pooled latent distribution on which the classifier's statistics are computed
#: (the first layer's mean and variance are those of the pooled moments to about 1%).
MOMENT_DRAWS, MOMENT_SEED = 20_000, 0


@dataclass
class LabelledSiteTensors(SiteTensors):
    """:class:`SiteTensors` with each cell's label index (``-1``: unlabelled)."""

    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.labels is None:
            self.labels = np.full(self.n_cells, -1, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (self.n_cells,):
            raise ValueError("labels and X have different numbers of cells")

    def n_labelled(self) -> int:
        assert self.labels is not None
        return int((self.labels >= 0).sum())


class LabelledStream:
    """Endless labelled minibatches of a site's labelled cells among ``cells``, reshuffled each
    pass (a last minibatch of fewer than 3 cells is dropped, unless it is the only one)."""

    def __init__(
        self, data: LabelledSiteTensors, cells: np.ndarray, batch_size: int, seed: int
    ) -> None:
        assert data.labels is not None
        self.data = data
        self.cells = cells[data.labels[cells] >= 0]
        self.batch_size = batch_size
        self.rng = np.random.default_rng([seed, 17])
        self._queue: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.cells)

    def __iter__(self) -> LabelledStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._queue:
            order = self.cells[self.rng.permutation(len(self.cells))]
            chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            if len(chunks) > 1 and len(chunks[-1]) < MIN_LABELLED:
                chunks.pop()
            self._queue = chunks[::-1]
        idx = self._queue.pop()
        x, b = self.data.minibatch(idx)
        assert self.data.labels is not None
        return x, b, torch.from_numpy(self.data.labels[idx])


class AnnotateSite(SiteWorker):
    """A site of federated scANVI: :class:`SiteWorker` with a :class:`SCANVAE` replica."""

    def __init__(
        self,
        name: str,
        data: LabelledSiteTensors,
        n_genes: int,
        n_batches: int,
        n_labels: int,
        config: RunConfig,
        *,
        linear_classifier: bool = False,
        classification_ratio: float = 50.0,
        policy: Any = None,
        ledger: Any = None,
    ) -> None:
        super().__init__(name, data, n_genes, n_batches, config, policy=policy, ledger=ledger)
        self.n_labels = n_labels
        self.module = SCANVAE(
            n_genes,
            n_batches,
            n_labels,
            config.model,
            linear_classifier=linear_classifier,
            classification_ratio=classification_ratio,
        )
        self.labelled_data = data

    def fit(self, global_params: Any, round_idx: int, *args: Any, **kwargs: Any) -> Any:
        """A local update with the scANVI loss: the round's labelled stream is set, then
        :meth:`SiteWorker.fit` runs the common local update."""
        fed = self.config.federation
        cells, _ = train_validation_split(self.data.n_cells, self.config.train.train_size, fed.seed)
        stream = LabelledStream(
            self.labelled_data, cells, self.config.train.batch_size, round_seed(fed.seed, round_idx)
        )
        if len(stream) < MIN_LABELLED and self.labelled_data.n_labelled():
            log.warning(
                "site %r: %d labelled training cells, fewer than %d: no classification loss",
                self.name,
                len(stream),
                MIN_LABELLED,
            )
        used = len(stream) >= MIN_LABELLED
        self.module.labelled_stream = stream if used else None  # type: ignore[assignment]
        try:
            update = super().fit(global_params, round_idx, *args, **kwargs)
        finally:
            self.module.labelled_stream = None  # type: ignore[assignment]
        # a count, as the batch counts: it weights the classifier's average at the server
        update.metrics["labelled_cells"] = float(len(stream) if used else 0)
        return update

    def predict(
        self,
        global_params: Any,
        balance: Any = (),
        moments: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The site's cells: (latent, label probabilities), computed at the site.

        The classifier's BatchNorm statistics: with ``moments`` (the mean and covariance of
        the latent codes pooled over the federation's cells, :func:`pooled_moments`), those of
        the pooled latent distribution, the same at every site; without, and with site-local
        statistics, the site's own, computed on its latent codes resampled as the last
        balancing step weights them.
        """
        z = self.embed(global_params, balance)
        module = self.module
        assert isinstance(module, SCANVAE)
        device = next(module.parameters()).device
        if moments is not None:
            mean, cov = moments
            rng = np.random.default_rng(MOMENT_SEED)
            draws = rng.multivariate_normal(mean, cov, size=MOMENT_DRAWS, method="eigh")
            calibrate_classifier(module, draws.astype(np.float32), device)
        elif self.config.local_batchnorm:
            zc = z
            if balance:
                from scfedvi.federation.balance import (
                    OVERSAMPLE,
                    RESAMPLE_SEED,
                    assign,
                    resample_weights,
                )

                step = balance[-1]
                w = resample_weights(assign(z, step.centroids), step.composition)
                rng = np.random.default_rng(RESAMPLE_SEED)
                zc = z[rng.choice(len(w), size=OVERSAMPLE * len(w), replace=True, p=w / w.sum())]
            calibrate_classifier(module, zc, device)
        module.eval()
        with torch.no_grad():
            probs = [
                module.predict_proba(torch.from_numpy(z[i : i + 4096]).to(device)).cpu().numpy()
                for i in range(0, len(z), 4096)
            ]
        return z, np.concatenate(probs)


@torch.no_grad()
def calibrate_classifier(
    module: SCANVAE, z: np.ndarray, device: torch.device, batch_size: int = 1024
) -> None:
    """The classifier's BatchNorm statistics as cumulative averages over minibatches of ``z``
    (dropout off), as :func:`scfedvi.train.local.calibrate_norm_stats` does for the encoder."""
    bns = [m for m in module.classifier.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    if not bns:
        return
    module.eval()
    saved = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    order = np.random.default_rng(0).permutation(len(z))
    chunks = [order[i : i + batch_size] for i in range(0, len(z), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) < batch_size:
        chunks.pop()  # the cumulative average weights minibatches equally: a short last one
    for idx in chunks:  # would count as much as a full one
        if len(idx) >= 2:
            module.classifier(torch.from_numpy(z[idx]).to(device))
    for m in bns:
        m.momentum = saved[m]
        m.eval()


def label_summary(
    z: np.ndarray, labels: np.ndarray, n_labels: int, min_cells: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A site's per-label sums of its labelled cells' latent codes, computed at the site.

    Returns ``(counts, sums, squares)``: cells, sum of ``z`` and sum of ``|z|^2`` per label.
    A label with fewer than ``min_cells`` of the site's cells (its policy's
    ``min_cluster_cells``, as for balancing's clusters) sends only its count: its sums are 0.
    """
    counts = np.bincount(labels[labels >= 0], minlength=n_labels).astype(np.float64)
    sums = np.zeros((n_labels, z.shape[1]))
    squares = np.zeros(n_labels)
    for k in np.flatnonzero(counts >= min_cells):
        zk = z[labels == k].astype(np.float64)
        sums[k], squares[k] = zk.sum(0), float((zk**2).sum())
    counts[counts < min_cells] = 0.0
    return counts, sums, squares


def label_centroids(
    summaries: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """The coordinator's side: each label's centroid and mean squared distance to it over
    every site's (summarised) cells; labels without cells get NaN."""
    n = np.sum([s[0] for s in summaries], axis=0)
    sums = np.sum([s[1] for s in summaries], axis=0)
    sq = np.sum([s[2] for s in summaries], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids = sums / n[:, None]
        spread = sq / n - (centroids**2).sum(1)
    return centroids, np.maximum(spread, 1e-12)


def novelty(z: np.ndarray, best: np.ndarray, centroids: np.ndarray, spread: np.ndarray):
    """Each cell's squared distance to its predicted label's centroid over that label's mean
    squared distance (1: a typical cell of the label; NaN: the label has no centroid)."""
    d2 = ((z - centroids[best]) ** 2).sum(1)
    return d2 / spread[best]


def latent_moments(z: np.ndarray, min_cells: int) -> tuple[float, np.ndarray, np.ndarray]:
    """A site's ``(cells, sum of z, sum of z z^T)`` over all its cells, computed at the site
    (nothing from a site with fewer than ``min_cells`` cells, its policy's
    ``min_cluster_cells``)."""
    if len(z) < min_cells:
        return 0.0, np.zeros(z.shape[1]), np.zeros((z.shape[1], z.shape[1]))
    z = z.astype(np.float64)
    return float(len(z)), z.sum(0), z.T @ z


def pooled_moments(
    summaries: list[tuple[float, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray] | None:
    """The coordinator's side: the mean and covariance of the latent codes of every site's
    cells from the sites' :func:`latent_moments`."""
    n = float(sum(s[0] for s in summaries))
    if n < 2:
        return None
    mean = np.sum([s[1] for s in summaries], axis=0) / n
    cov = np.sum([s[2] for s in summaries], axis=0) / n - np.outer(mean, mean)
    return mean, (cov + cov.T) / 2
