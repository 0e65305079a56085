"""The result cache: one folder per embedding under ``<out>/cache/``, keyed by a hash.

The key of an embedding hashes the data fingerprint (counts, cells, genes, batch and label),
the partition (for methods that use one), the method and its configuration, the seed, the genes
used, and the versions of scfedvi and of the method's tool. The key of an evaluation adds the
metric settings. A rerun computes only the entries whose key is new. Files are written to a
temporary name and renamed, so an interrupted or parallel run never leaves half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scfedvi.benchmark.methods import MethodResult

#: Key parts that hash scfedvi's own code: a result computed with other code may still be
#: reported (``--report-only``), flagged.
CODE_PARTS = ("code", "runner")

#: Bump when the stored format or the meaning of an entry changes.
CACHE_FORMAT = 1


def hash_key(parts: dict[str, Any]) -> str:
    """A short, stable hash of a JSON-serializable dict."""
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, obj: Any) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(obj, indent=1, sort_keys=True, default=_jsonable))

    _atomic_write(path, write)


def _holder_alive(path: Path) -> bool:
    """Whether the process named in a lock file still runs (another host's: assumed so)."""
    try:
        host, pid = path.read_text().split()
    except (OSError, ValueError):
        return True  # being written right now
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


class ResultCache:
    """Embeddings and their evaluations on disk.

    Parameters
    ----------
    root
        The cache folder (``<out>/cache``).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _dir(self, key: str) -> Path:
        return self.root / key

    # -- a claim on an entry, so that processes sharing a cache never compute it twice --------
    def lock(self, key: str) -> bool:
        """Claim ``key`` for this process; False while another live process holds it.

        The claim is a file ``lock`` (host and pid) created exclusively; a claim left by a
        process of this host that no longer runs is taken over.
        """
        path = self._dir(key) / "lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if _holder_alive(path):
                    return False
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}")
            return True
        return False

    def unlock(self, key: str) -> None:
        """Release this process's claim on ``key``."""
        (self._dir(key) / "lock").unlink(missing_ok=True)

    # -- embeddings --------------------------------------------------------------------------
    def has_embedding(self, key: str) -> bool:
        return (self._dir(key) / "meta.json").exists()

    def save_embedding(self, key: str, result: MethodResult, parts: dict[str, Any]) -> None:
        d = self._dir(key)
        arrays: dict[str, Any] = {"embedding": result.embedding}
        arrays.update({f"curve_{i}": p["embedding"] for i, p in enumerate(result.curve)})

        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        _atomic_write(d / "embedding.npz", write_npz)
        if result.history is not None:
            _atomic_write(d / "history.csv", lambda tmp: result.history.to_csv(tmp, index=False))
        meta = {
            "key_parts": parts,
            "seconds": result.seconds,
            "bytes": result.bytes,
            "info": result.info,
            "curve": [{k: v for k, v in p.items() if k != "embedding"} for p in result.curve],
        }
        _write_json(d / "meta.json", meta)  # written last: its presence marks a whole entry

    def load_embedding(self, key: str) -> MethodResult:
        d = self._dir(key)
        meta = json.loads((d / "meta.json").read_text())
        with np.load(d / "embedding.npz") as z:
            Z = z["embedding"]
            curve = [dict(p, embedding=z[f"curve_{i}"]) for i, p in enumerate(meta["curve"])]
        history = pd.read_csv(d / "history.csv") if (d / "history.csv").exists() else None
        b = meta["bytes"]
        return MethodResult(
            embedding=Z,
            seconds=float(meta["seconds"]),
            bytes=float("nan") if b is None else float(b),
            history=history,
            curve=curve,
            info=meta["info"],
        )

    # -- evaluations -------------------------------------------------------------------------
    def has_eval(self, key: str, eval_key: str) -> bool:
        return (self._dir(key) / f"eval-{eval_key}.json").exists()

    def save_eval(self, key: str, eval_key: str, evaluation: dict[str, Any]) -> None:
        d = self._dir(key)
        if evaluation.get("umap") is not None:

            def write_npy(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    np.save(f, evaluation["umap"])

            _atomic_write(d / f"umap-{eval_key}.npy", write_npy)
        body = {"metrics": evaluation["metrics"], "curve": evaluation["curve"]}
        _write_json(d / f"eval-{eval_key}.json", body)

    def load_eval(self, key: str, eval_key: str) -> dict[str, Any]:
        d = self._dir(key)
        body = json.loads((d / f"eval-{eval_key}.json").read_text())
        umap = d / f"umap-{eval_key}.npy"
        body["umap"] = np.load(umap) if umap.exists() else None
        return body

    def load_history(self, key: str) -> pd.DataFrame | None:
        path = self._dir(key) / "history.csv"
        return pd.read_csv(path) if path.exists() else None

    def meta(self, key: str) -> dict[str, Any]:
        return json.loads((self._dir(key) / "meta.json").read_text())

    # -- results of an earlier code version (``--report-only``) ------------------------------
    def find_other_code(self, parts: dict[str, Any]) -> str | None:
        """An entry whose key parts equal ``parts`` but for the code hashes (the newest), or
        None."""
        want = {k: v for k, v in parts.items() if k not in CODE_PARTS}
        want = json.loads(json.dumps(want, default=str))
        found = []
        for meta in self.root.glob("*/meta.json"):
            got = json.loads(meta.read_text()).get("key_parts", {})
            if {k: v for k, v in got.items() if k not in CODE_PARTS} == want:
                found.append((meta.stat().st_mtime, meta.parent.name))
        return max(found)[1] if found else None

    def any_eval(self, key: str, scib: bool) -> str | None:
        """The newest evaluation of an entry (with scIB metrics if ``scib``), or None."""
        found = []
        for path in self._dir(key).glob("eval-*.json"):
            metrics = json.loads(path.read_text())["metrics"]
            if not scib or any(k.startswith("scib: ") for k in metrics):
                found.append((path.stat().st_mtime, path.stem[len("eval-") :]))
        return max(found)[1] if found else None
