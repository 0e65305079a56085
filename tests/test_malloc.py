"""glibc's malloc thresholds: set once by training, left alone when the user says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

GLIBC = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")

# A fresh process allocates one 2 MiB block and reports where it came from: glibc serves a
# block above its (adaptive, initially 128 KiB) mmap threshold by mmap, one below from the heap.
PROBE = """
import ctypes, json, sys
from scfedvi._malloc import tune_malloc

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = tune_malloc() if sys.argv[1] == "tune" else None
before = libc.mallinfo2()
p = libc.malloc(2 << 20)
after = libc.mallinfo2()
libc.free(p)
freed = libc.mallinfo2()
print(json.dumps({
    "applied": applied,
    "mmapped": after.hblkhd - before.hblkhd,
    "heap_in_use": after.uordblks - before.uordblks,
    "heap_free_after_free": freed.fordblks,
}))
"""


def _probe(mode: str, **env: str) -> dict:
    import json

    e = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "SCFEDVI_TUNE"))}
    e.update(env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=e, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="the tuning applies to glibc only")
def test_tuned_blocks_come_from_the_heap_and_stay_there():
    plain = _probe("plain")
    assert plain["mmapped"] >= 2 << 20  # glibc's default: a 2 MiB block is mmapped
    tuned = _probe("tune")
    assert tuned["applied"] is True
    assert tuned["mmapped"] == 0
    assert tuned["heap_in_use"] >= 2 << 20
    assert tuned["heap_free_after_free"] >= 2 << 20  # kept, not trimmed back to the kernel


@pytest.mark.skipif(not GLIBC, reason="the tuning applies to glibc only")
@pytest.mark.parametrize(
    "env", [{"SCFEDVI_TUNE_MALLOC": "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}]
)
def test_the_user_can_keep_their_own_malloc_settings(env):
    out = _probe("tune", **env)
    assert out["applied"] is False
    assert out["mmapped"] >= 2 << 20


def test_the_commands_that_train_apply_it_once_and_the_benchmark_does_not(monkeypatch, tmp_path):
    import scfedvi
    from scfedvi import _malloc, cli

    calls: list[int] = []
    monkeypatch.setattr(_malloc, "_applied", None)
    monkeypatch.setattr(_malloc, "_tune", lambda: calls.append(1) or True)
    args = ["embed", "--model", str(tmp_path / "none"), "--input", str(tmp_path / "x.h5ad")]
    for _ in range(2):  # a missing model: exit 2, after the tuning
        assert cli.main([*args, "--out", str(tmp_path / "y.h5ad")]) == 2
    assert calls == [1]
    assert scfedvi.tune_malloc is _malloc.tune_malloc and scfedvi.tune_malloc() is True
    assert {"train", "embed", "demo"} <= set(cli.MALLOC_TUNED)
    assert "benchmark" not in cli.MALLOC_TUNED
