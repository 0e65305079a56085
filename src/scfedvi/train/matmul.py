"""Float32 matrix products through oneDNN's AVX-512 kernels, where they stay float32.

PyTorch's CPU build sends a float32 ``linear`` or ``mm`` to MKL's ``sgemm``. On this kind of
machine (AMD EPYC, one thread) MKL's product of 128 x 2,000 by 2,000 x 128, the model's encoder
layer, takes 0.58 ms (about 113 GFLOP/s, the AVX2 rate), while oneDNN, also in every CPU build,
takes 0.28 ms with its AVX-512 kernel. PyTorch routes float32 products to oneDNN only when
``torch.backends.mkldnn.matmul.fp32_precision`` allows a lower internal precision (``"bf16"``).
oneDNN takes that as a permission, not an order: it computes in bfloat16 only where it has a
kernel that does (AMX), in float32 elsewhere. Here it picks its float32 kernel
(``brg_matmul:avx512_core`` in ``ONEDNN_VERBOSE``), whose results agree with MKL's to float32
rounding.

:func:`onednn_matmul` therefore allows it only after a probe, run once per process, shows that
oneDNN's products are float32-exact on the machine: every operand holds ``1 + 2**-10 + noise``,
which bfloat16 would round to 1 (a relative error near 1e-3), and every product, in the three
shapes of a linear layer's forward and backward pass, must match float64 to 1e-5. Where oneDNN
would compute in bfloat16, the probe fails and products stay with PyTorch's default.

The setting is process-wide. :func:`onednn_matmul` sets it for the duration of a training or
embedding call and restores it afterwards. It changes nothing where the caller has already
chosen a lower precision (``torch.set_float32_matmul_precision("medium")``, say), or where
``SCFEDVI_ONEDNN_MATMUL=0``. Measured with one thread on the cortex data split into 5 sites (4
local epochs at each, 12 alternating repeats in one process): 0.417 s against 0.486 s per pass
over the sites, 14% less.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

#: Environment variable that turns the oneDNN route off (``0``, ``false``, ``no``, ``off``).
ENV = "SCFEDVI_ONEDNN_MATMUL"
#: Largest relative error (against float64) a probe product may have: float32 gives about
#: 1e-7, bfloat16 inputs about 1e-3.
TOLERANCE = 1e-5
#: (m, k, n) of the probe products: the encoder's first layer (k = genes), a decoder head
#: (n = genes) and a weight gradient (m = genes), at a minibatch of 128 cells.
PROBE_SHAPES = ((128, 2000, 128), (128, 128, 2000), (2000, 128, 128))

_exact: bool | None = None


def _backend():
    """``torch.backends.mkldnn.matmul`` where this torch has it (2.9 and newer), else None."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    if mkldnn is None or not mkldnn.is_available():
        return None
    matmul = getattr(mkldnn, "matmul", None)
    if matmul is None or not hasattr(matmul, "fp32_precision"):
        return None
    return matmul


def _effective(backend) -> str:
    """The precision float32 products get now: the first setting that is not ``"none"`` of
    ``mkldnn.matmul``, ``mkldnn`` and ``torch.backends`` (each inherits from the next)."""
    chain = (backend, torch.backends.mkldnn, torch.backends)
    for setting in (getattr(obj, "fp32_precision", "none") for obj in chain):
        if setting != "none":
            return setting
    return "ieee"


def _disabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() in {"0", "false", "no", "off"}


def _probe(backend) -> bool:
    """Whether float32 products under ``fp32_precision = "bf16"`` are float32-exact here."""
    gen = torch.Generator().manual_seed(0)
    previous = backend.fp32_precision
    try:
        backend.fp32_precision = "bf16"
        for m, k, n in PROBE_SHAPES:
            a = 1 + 2**-10 + 2**-14 * torch.rand(m, k, generator=gen)
            b = 1 + 2**-10 + 2**-14 * torch.rand(n, k, generator=gen)
            bias = torch.rand(n, generator=gen)
            ref = a.double() @ b.double().T
            for got, want in (
                (torch.nn.functional.linear(a, b, bias), ref + bias.double()),
                (torch.mm(a, b.T), ref),
                (torch.mm(b, a.T).T, ref),
            ):
                err = ((got.double() - want).abs().max() / want.abs().max()).item()
                if not err <= TOLERANCE:
                    log.debug("oneDNN float32 products not exact (%.1e at %s)", err, (m, k, n))
                    return False
        return True
    except RuntimeError as exc:  # a build without a oneDNN matmul for this dtype
        log.debug("oneDNN matmul probe failed: %s", exc)
        return False
    finally:
        backend.fp32_precision = previous


def onednn_exact() -> bool:
    """Whether oneDNN computes float32 products in float32 on this machine (probed once)."""
    global _exact
    if _exact is None:
        backend = _backend()
        _exact = backend is not None and _probe(backend)
    return _exact


@contextlib.contextmanager
def onednn_matmul() -> Iterator[bool]:
    """Route float32 products to oneDNN inside the block where that keeps them float32.

    Yields whether the route is on. Also usable as a decorator.
    """
    backend = _backend()
    if backend is None or _disabled() or _effective(backend) != "ieee" or not onednn_exact():
        yield False
        return
    previous = backend.fp32_precision
    backend.fp32_precision = "bf16"
    try:
        yield True
    finally:
        backend.fp32_precision = previous
