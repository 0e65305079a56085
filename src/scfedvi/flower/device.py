"""A site's own device: ``accelerator``/``device`` in its SuperNode's node config.

Where a site trains is the site's decision (its hardware), not the federation's: a
``--node-config "accelerator='gpu' device='0'"`` overrides the run config's
``TrainConfig.accelerator``/``device`` for that site alone. Light: no torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from scfedvi.config import RunConfig

ACCELERATOR, DEVICE = "accelerator", "device"


def node_device(cfg: RunConfig, node_config: Mapping[str, Any]) -> RunConfig:
    """``cfg`` with the node config's ``accelerator`` and ``device`` (when given) applied;
    a bad value is an error naming the node-config key and the choices."""
    changes: dict[str, Any] = {}
    for key in (ACCELERATOR, DEVICE):
        if key in node_config and str(node_config[key]) != "":
            changes[key] = str(node_config[key])
    if not changes:
        return cfg
    try:
        return replace(cfg, train=replace(cfg.train, **changes))
    except ValueError as e:
        raise ValueError(f"node config {sorted(changes)}: {e}") from None
