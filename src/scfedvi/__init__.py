"""scfedvi: single-cell federated variational inference (scFedVI).

An scVI model trained by federated averaging across sites that cannot share their data.
The import is kept light: heavy parts (torch models, Flower, scvi-tools) load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "ScFedVI": "scfedvi.model",
    "ModelConfig": "scfedvi.config",
    "TrainConfig": "scfedvi.config",
    "FederationConfig": "scfedvi.config",
    "PrivacyConfig": "scfedvi.config",
    "SitePolicy": "scfedvi.config",
    "FederationSchema": "scfedvi.data.schema",
    "tune_malloc": "scfedvi._malloc",
}

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi._malloc import tune_malloc  # noqa: F401
    from scfedvi.config import (  # noqa: F401
        FederationConfig,
        ModelConfig,
        PrivacyConfig,
        SitePolicy,
        TrainConfig,
    )
    from scfedvi.data.schema import FederationSchema  # noqa: F401
    from scfedvi.model import ScFedVI  # noqa: F401

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scfedvi' has no attribute {name!r}")
