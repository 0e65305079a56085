"""Parameters travel as ``dict[str, numpy.ndarray]``: conversions and the parameter partition.

A module's state splits into *shared* entries (sent to the server and averaged) and, when
normalization statistics are site-local, *local* entries (BatchNorm running statistics, which
never leave the site).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from scfedvi.module.layers import FCLayers
from scfedvi.module.vae import VAE, norm_stat_keys

Params = dict[str, np.ndarray]


def get_state(module: nn.Module) -> Params:
    """All parameters and buffers as numpy arrays (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def set_state(module: nn.Module, params: Mapping[str, np.ndarray], *, strict: bool = False) -> None:
    """Load (a subset of) a state from numpy arrays."""
    own = module.state_dict()
    unknown = set(params) - set(own)
    if unknown:
        raise KeyError(f"parameters not in the model: {sorted(unknown)[:5]}")
    if strict and set(own) - set(params):
        raise KeyError(f"parameters missing: {sorted(set(own) - set(params))[:5]}")
    with torch.no_grad():
        for k, v in params.items():
            target = own[k]
            if tuple(target.shape) != tuple(np.shape(v)):
                raise ValueError(
                    f"parameter {k!r}: shape {np.shape(v)} != model's {tuple(target.shape)}"
                )
            target.copy_(torch.as_tensor(np.asarray(v)).to(target.dtype))


def local_keys(module: nn.Module, norm_stats: str) -> list[str]:
    """Entries that stay at the site: BatchNorm statistics when ``norm_stats == "local"``."""
    return norm_stat_keys(module) if norm_stats == "local" else []


def shared_keys(module: nn.Module, norm_stats: str) -> list[str]:
    """Entries sent to the server and averaged."""
    loc = set(local_keys(module, norm_stats))
    return [k for k in module.state_dict() if k not in loc]


def batch_owned_columns(module: VAE) -> dict[str, tuple[int, int]]:
    """Parameters tied to one batch: name -> (axis, first column of the one-hot block).

    Column ``first + b`` of the parameter along ``axis`` belongs to batch ``b``: the weight
    columns that multiply the batch one-hot in every layer that receives it, and the per-batch
    dispersion when ``dispersion == "gene-batch"``.
    """
    out: dict[str, tuple[int, int]] = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, FCLayers) and sub.n_cat:
            for i, block in enumerate(sub.fc_layers.children()):
                if sub._inject(i):
                    lin = next(iter(block.children()))
                    assert isinstance(lin, nn.Linear)
                    out[f"{prefix}.fc_layers.Layer {i}.0.weight"] = (1, lin.in_features - sub.n_cat)
    if module.config.dispersion == "gene-batch" and module.n_batch > 1:
        out["px_r"] = (1, 0)
    return out


def flat_norm(params: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all arrays together."""
    return float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in params.values()))
    )


def is_finite(params: Mapping[str, np.ndarray]) -> bool:
    return all(np.all(np.isfinite(v)) for v in params.values())
