"""glibc's malloc thresholds for training: keep a step's freed tensors in the heap.

A training step allocates and frees dozens of tensors of one minibatch's size (cells x genes
floats: 1 MB at 128 cells and 2,000 genes). Under glibc's default, adaptive thresholds, the
heap's free top is handed back to the kernel when a step's tensors are freed, and the next step
faults the same pages in again (zero-filled by the kernel). :func:`tune_malloc` raises two
thresholds so that blocks below 4 MiB come from the heap and up to 32 MiB of free heap is kept.
Measured here (one thread): ``scfedvi train`` on the cortex data (2 sites, the defaults) trained
in 39-41 s instead of 47-49 s; a 200,000-cell site's peak memory was 1,773 MB instead of
1,796 MB. Larger blocks (the embedding's 8 MiB minibatches) still go back to the kernel when
freed: with a 16 MiB threshold they fragmented the heap and that site peaked at 2,158 MB.

The setting is process-wide and stays for the process's life (glibc has no way back to its
adaptive default), so the library does not apply it behind a caller's back: the ``scfedvi``
commands that train or embed (``train``, ``embed``, ``demo``) and every Flower site process
(a fresh one per message) call :func:`tune_malloc` first; Python users call
``scfedvi.tune_malloc()`` themselves. ``scfedvi benchmark`` leaves glibc's defaults, under which
its published figures were measured. It is skipped where the C library is not glibc, where
the user set ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_TOP_PAD_``
(their settings win), and where ``SCFEDVI_TUNE_MALLOC=0``. It changes no number computed,
only where memory comes from.

A process that has already freed large blocks (a long session that loaded and dropped big
arrays) may have raised glibc's adaptive thresholds by itself and gains little.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

#: ``mallopt`` parameters (glibc's ``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap (glibc's adaptive default starts at 128 KiB).
MMAP_THRESHOLD = 4 << 20
#: Free heap kept before it is returned to the kernel.
TRIM_THRESHOLD = 32 << 20
#: Environment variable that turns the tuning off (``0``, ``false``, ``no``, ``off``).
ENV = "SCFEDVI_TUNE_MALLOC"
#: The user's own glibc settings, which are left alone.
USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_applied: bool | None = None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; return whether they are set.

    Later calls return the first call's outcome and change nothing.
    """
    global _applied
    if _applied is None:
        _applied = _tune()
    return _applied


def _tune() -> bool:
    if os.environ.get(ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    if any(os.environ.get(v) for v in USER_VARS):
        return False
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):  # not a GNU system
        libc = ""
    if not libc.startswith("glibc"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    log.debug("malloc thresholds (mmap %d, trim %d) set: %s", MMAP_THRESHOLD, TRIM_THRESHOLD, ok)
    return ok
