"""The result cache: stable keys, whole entries, and claims shared by processes."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pandas as pd

from scfedvi.benchmark.cache import ResultCache, hash_key
from scfedvi.benchmark.methods import MethodResult


def test_keys_are_stable_and_order_free():
    assert hash_key({"a": 1, "b": [1, 2]}) == hash_key({"b": [1, 2], "a": 1})
    assert hash_key({"a": 1}) != hash_key({"a": 2})


def test_entry_round_trip(tmp_path):
    cache = ResultCache(tmp_path)
    Z = np.arange(12, dtype=np.float32).reshape(6, 2)
    hist = pd.DataFrame({"round": [0, 1], "site": ["a", "a"], "loss": [2.0, 1.0]})
    res = MethodResult(Z, 1.5, 10.0, hist, [{"round": 1, "bytes": 5.0, "embedding": Z}], {"x": 1})
    assert not cache.has_embedding("k")
    cache.save_embedding("k", res, {"method": "m"})
    back = cache.load_embedding("k")
    assert np.array_equal(back.embedding, Z) and back.bytes == 10.0 and back.info == {"x": 1}
    assert np.array_equal(back.curve[0]["embedding"], Z) and back.history.equals(hist)
    cache.save_eval("k", "e", {"metrics": {"m": 1.0}, "curve": [], "umap": Z[:, :2]})
    assert cache.load_eval("k", "e")["metrics"] == {"m": 1.0}


def test_a_claim_blocks_others_until_released_or_its_process_ends(tmp_path):
    cache = ResultCache(tmp_path)
    assert cache.lock("k") and not cache.lock("k")  # held by this (live) process
    cache.unlock("k")
    assert cache.lock("k")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "k" / "lock").write_text(f"{socket.gethostname()} {gone.pid}")
    assert cache.lock("k")  # a dead process's claim is taken over
