"""Privacy: the site's policy (:mod:`scfedvi.privacy.policy`), client-level differential
privacy (clipping, Gaussian noise) and its accountant.

Imports are lazy: a site that only checks its policy does not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "gaussian_epsilon": "scfedvi.privacy.accountant",
    "noise_for_epsilon": "scfedvi.privacy.accountant",
    "dp_average": "scfedvi.privacy.dp",
    "secure_gaussian": "scfedvi.privacy.dp",
    "site_reply": "scfedvi.privacy.dp",
    "PolicyRefusal": "scfedvi.privacy.policy",
    "QueryLedger": "scfedvi.privacy.policy",
    "check_summary": "scfedvi.privacy.policy",
    "check_training": "scfedvi.privacy.policy",
    "policy_from_node_config": "scfedvi.privacy.policy",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scfedvi.privacy' has no attribute {name!r}")
