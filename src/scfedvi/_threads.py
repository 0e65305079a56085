"""Keep torch's thread count where the caller set it.

numba (behind UMAP and pynndescent) sets OpenMP's thread count to the number of cores when it
first runs a parallel function; torch, built on the same OpenMP runtime, then runs its kernels
on that many threads. Two single-threaded benchmark workers on two cores became four threads
spinning at OpenMP barriers, and training ran up to 40 times slower. Code that may run numba
runs inside :func:`torch_threads_kept`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's intra-op thread count on exit (if torch is imported at all)."""
    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        # (torch imported inside the block starts at its own default: nothing to restore)
        if torch is not None and n is not None and torch.get_num_threads() != n:
            torch.set_num_threads(n)
