"""A site's normalization statistics and its embedding, with the global weights.

Both run at the site on its own cells; the statistics and the embedding never leave it (the
statistics may be pooled under ``norm_stats="global"``, and composition balancing recomputes
them on a resample: :mod:`scfedvi.federation.balance`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scfedvi._constants import LATENT_KEY
from scfedvi.module.vae import VAE, norm_stat_keys
from scfedvi.train.data import SiteTensors
from scfedvi.train.device import module_device, to_device
from scfedvi.train.matmul import onednn_matmul
from scfedvi.train.params import Params, get_state

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["calibrate_norm_stats", "embed", "write_embedding"]


@onednn_matmul()
@torch.no_grad()
def calibrate_norm_stats(
    module: VAE, data: SiteTensors, batch_size: int = 1024, device: torch.device | None = None
) -> Params:
    """Recompute BatchNorm statistics on a site's cells with the current weights.

    The statistics are cumulative averages over minibatches of the site's cells in a fixed
    random order (a stored order sorted by batch or cell type would leave out the variance
    between minibatches), with dropout off; the decoder sees the posterior means. They are the
    site's own and never leave it. Returns the new statistics.
    """
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    if not bns:
        return {}
    saved = {m: m.momentum for m in bns}
    module.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    decoder_bn = any(isinstance(m, torch.nn.BatchNorm1d) for m in module.decoder.modules())
    device = device or module_device(module)
    for x, b in data.iter_minibatches(batch_size, np.random.default_rng(0), drop_small=True):
        x, b, _ = to_device(device, x, b, None)
        inf = module.inference(x, b)
        if decoder_bn:  # the decoder's pass changes no statistic otherwise
            module.generative(inf["qz_m"], inf["library"], b)
    for m in bns:
        m.momentum = saved[m]
        m.eval()
    state = get_state(module)
    return {k: state[k] for k in norm_stat_keys(module)}


@onednn_matmul()
@torch.no_grad()
def embed(
    module: VAE, data: SiteTensors, batch_size: int = 1024, device: torch.device | None = None
) -> np.ndarray:
    """Posterior means of the site's cells (eval mode: running statistics, no dropout), on
    ``device`` (default: where the module is)."""
    device = device or module_device(module)
    module.to(device)
    module.eval()
    out = [
        module.latent(*to_device(device, x, b, None)[:2]).cpu().numpy()
        for x, b in data.iter_minibatches(batch_size, None, drop_small=False)
    ]
    return np.concatenate(out, axis=0)


def write_embedding(
    adata: AnnData, z: np.ndarray, obs_names: Any, key: str = LATENT_KEY
) -> np.ndarray:
    """Store a site's embedding in ``adata.obsm[key]`` (both runtimes write it this way).

    ``z`` holds the cells named ``obs_names`` (those the projection kept: cells with counts); the
    site's other cells get NaN rows. Returns the stored array.
    """
    import pandas as pd

    if z.shape[0] == adata.n_obs and adata.obs_names.equals(pd.Index(obs_names)):
        full = z
    else:
        full = np.full((adata.n_obs, z.shape[1]), np.nan, dtype=z.dtype)
        full[adata.obs_names.get_indexer(obs_names)] = z
    adata.obsm[key] = full
    return full
