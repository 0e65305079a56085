"""Client-level differential privacy: clipping, Gaussian noise, and its accountant."""

from scfedvi.privacy.accountant import gaussian_epsilon
from scfedvi.privacy.dp import dp_average

__all__ = ["dp_average", "gaussian_epsilon"]
