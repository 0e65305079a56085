"""A site's projected counts, kept between Flower messages as memory-mapped arrays.

Flower starts a fresh ClientApp process for every message, so without a cache every training,
balancing and embedding message reads the site's whole ``.h5ad`` and projects it onto the
schema again. The setup round's schema message (which projects and validates the data anyway)
writes the result once into the site's ``state-dir``:

``<state-dir>/<site>.data-<schema hash[:16]>/`` holds ``data.npy``, ``indices.npy`` and
``indptr.npy`` (the CSR counts in schema gene order), ``batch_index.npy``,
``log_factorial.npy`` (each cell's sum of ``lgamma(x + 1)``, which the likelihood needs),
``obs_names.npy`` (and ``labels.npy`` if the site has labels), and ``manifest.json``: the key
the arrays were made for, and each array's dtype, shape, size in bytes and CRC-32 (for arrays
over 16 MiB, the CRC-32 of each 1-MiB block).

The key is everything the arrays depend on: the format version, the site's name, the data
file's path and identity (size, modification time in ns, and the SHA-256 of its first and last
MiB: an ``.h5ad`` rewritten in place with the same size and time still changes its header or
its tail), the schema hash, the layer, the federation's and the site's batch column and the
minibatch size (the validation needs that many cells). Later messages map the arrays
(``np.load(mmap_mode='r')``) after checking the key, every file's size, the small arrays'
CRC-32 and, of the counts' ``data`` and ``indices``, the first, the last and 16 random 1-MiB
blocks (a whole check of a 100,000 x 2,000 site's 1.2 GB took 2 s a message on a loaded
2-core machine; a damaged block is found with probability 18/blocks per message, and any
truncation by the size check); any mismatch rebuilds the cache from the ``.h5ad`` with a log
line saying why. A cache is written into a temporary folder and renamed into place, so a crashed writer
leaves no cache that looks whole. The folder name carries the site and the schema, and the key
is checked in full, so a cache never serves another site or another schema.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    from scfedvi.data.schema import SiteData

log = logging.getLogger(__name__)

#: Version of the cache's layout; a cache of another version is rebuilt.
FORMAT = 1
#: Bytes hashed at each end of the data file for its identity.
EDGE_BYTES = 1 << 20
MANIFEST = "manifest.json"

#: Why a site rebuilt its cache, as its reply says it (:meth:`DataCache.probe`).
NO_CACHE = "there was no cache"
SCHEMA_CHANGED = "the schema changed"
FILE_CHANGED = "the data file changed"
SETTINGS_CHANGED = "the layer, batch column or minibatch size changed"
DAMAGED = "the cache was damaged"
REBUILD_REASONS = (NO_CACHE, SCHEMA_CHANGED, FILE_CHANGED, SETTINGS_CHANGED, DAMAGED)


def file_identity(path: Path) -> dict[str, Any]:
    """Size, modification time (ns) and the SHA-256 of the first and last MiB of ``path``
    (the whole file when it is at most 2 MiB). Raises ``OSError`` if it cannot be read."""
    st = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(EDGE_BYTES))
        if st.st_size > 2 * EDGE_BYTES:
            f.seek(-EDGE_BYTES, os.SEEK_END)
        h.update(f.read(EDGE_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges_sha256": h.hexdigest()}


#: Arrays up to this many bytes are checked whole on every load; larger ones (the counts'
#: ``data`` and ``indices``) by blocks of this size.
BLOCK = 1 << 20
#: Blocks of a large array checked on each load, besides its first and last: chosen at random,
#: so that successive messages cover different parts of the array.
SAMPLED_BLOCKS = 16


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(cast(Any, np.ascontiguousarray(a))).cast("B")


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(_bytes(a))


def _block_crcs(a: np.ndarray) -> list[int]:
    b = _bytes(a)
    return [zlib.crc32(b[i : i + BLOCK]) for i in range(0, len(b), BLOCK)]


def _verify(a: np.ndarray, meta: dict[str, Any]) -> bool:
    """Check ``a`` against its manifest entry: whole, or (large arrays) its first, last and
    :data:`SAMPLED_BLOCKS` random blocks."""
    if "blocks" not in meta:
        return _crc(a) == meta["crc32"]
    blocks, b = meta["blocks"], _bytes(a)
    n = len(blocks)
    if n != -(-len(b) // BLOCK):
        return False
    rng = np.random.default_rng()
    picks = {0, n - 1, *rng.choice(n, size=min(n, SAMPLED_BLOCKS), replace=False).tolist()}
    return all(zlib.crc32(b[i * BLOCK : (i + 1) * BLOCK]) == blocks[i] for i in picks)


def log_factorial_sums(X: Any) -> np.ndarray:
    """Each cell's sum over genes of ``lgamma(x + 1)`` (float64 arithmetic, float32 result)
    for CSR counts ``X``: what :attr:`scfedvi.train.local.SiteTensors.log_factorial` computes,
    the same way (tested equal), without importing torch in the setup round."""
    from scipy.special import gammaln

    indptr, data = X.indptr, X.data
    n_cells = X.shape[0]
    per_cell = np.zeros(n_cells, dtype=np.float64)
    block = max(1, (1 << 22) // max(1, X.shape[1]))
    for r0 in range(0, n_cells, block):
        r1 = min(r0 + block, n_cells)
        lg = gammaln(data[indptr[r0] : indptr[r1]].astype(np.float64) + 1.0)
        csum = np.concatenate([[0.0], np.cumsum(lg)])
        starts = indptr[r0 : r1 + 1] - indptr[r0]
        per_cell[r0:r1] = csum[starts[1:]] - csum[starts[:-1]]
    return per_cell.astype(np.float32)


@dataclass(frozen=True)
class CachedSite:
    """A site's data mapped from its cache."""

    data: SiteData
    log_factorial: np.ndarray


@dataclass(frozen=True)
class DataCache:
    """One site's cache for one schema (see the module docstring).

    Parameters
    ----------
    directory
        ``<state-dir>/<site>.data-<schema hash[:16]>``.
    key
        What the arrays depend on; compared in full on load.
    """

    directory: Path
    key: dict[str, Any]

    @classmethod
    def for_site(
        cls,
        state_dir: Path,
        site: str,
        data_path: Path,
        schema_hash: str,
        **config: Any,
    ) -> DataCache:
        """The cache of ``site`` for ``schema_hash``; ``config``: the settings that shape the
        projection (layer, batch columns, minibatch size). Raises ``OSError`` if the data file
        cannot be read."""
        key = {
            "format": FORMAT,
            "site": site,
            "data_path": str(data_path),
            "file": file_identity(data_path),
            "schema_hash": schema_hash,
            "config": {k: config[k] for k in sorted(config)},
        }
        return cls(state_dir / f"{site}.data-{schema_hash[:16]}", key)

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    # -- reading -----------------------------------------------------------------------------
    def load(self) -> CachedSite | None:
        """The mapped arrays if the cache is whole and made for this key; else ``None``, with
        a log line saying why it will be rebuilt."""
        return self.probe()[0]

    def probe(self) -> tuple[CachedSite | None, str]:
        """:meth:`load`, and why the cache cannot be used: ``""`` when it can, else one of
        :data:`REBUILD_REASONS` (a fixed phrase, without paths: what a site's reply may carry;
        the details go to the site's own log)."""
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if self._others():
                return self._miss("it was made for another schema", SCHEMA_CHANGED)
            log.info("site %r: no data cache yet in %s", self.key["site"], self.directory)
            return None, NO_CACHE
        except (OSError, ValueError) as e:
            return self._miss(f"its manifest is unreadable ({e})", DAMAGED)
        if manifest.get("key") != self.key:
            why, status = self._why_stale(manifest.get("key"))
            return self._miss(why, status)
        arrays: dict[str, np.ndarray] = {}
        for name, meta in manifest.get("arrays", {}).items():
            path = self.directory / f"{name}.npy"
            try:
                if path.stat().st_size != meta["file_bytes"]:
                    return self._miss(f"{path.name} has the wrong size (partial write?)", DAMAGED)
                a = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, KeyError) as e:
                return self._miss(f"{path.name} is unreadable ({e})", DAMAGED)
            if a.dtype.str != meta["dtype"] or list(a.shape) != meta["shape"]:
                return self._miss(f"{path.name} has dtype/shape {a.dtype.str}{a.shape}", DAMAGED)
            if not _verify(a, meta):
                return self._miss(f"{path.name} fails its checksum (corrupt)", DAMAGED)
            arrays[name] = a
        try:
            return self._site(manifest, arrays), ""
        except (KeyError, ValueError) as e:
            return self._miss(f"its arrays do not fit together ({e})", DAMAGED)

    def _site(self, manifest: dict[str, Any], a: dict[str, np.ndarray]) -> CachedSite:
        from scipy import sparse

        from scfedvi.data.schema import SiteData

        n_cells, n_genes = int(manifest["n_cells"]), int(manifest["n_genes"])
        if a["indptr"].shape != (n_cells + 1,) or int(a["indptr"][-1]) != a["data"].shape[0]:
            raise ValueError("indptr does not match data")
        X = sparse.csr_matrix((a["data"], a["indices"], a["indptr"]), shape=(n_cells, n_genes))
        sd = SiteData(
            site=str(self.key["site"]),
            X=X,
            batch_index=a["batch_index"],
            labels=a.get("labels"),
            obs_names=a["obs_names"],
            missing_genes=tuple(manifest["missing_genes"]),
        )
        if a["log_factorial"].shape != (n_cells,):
            raise ValueError("log_factorial has one value per cell")
        return CachedSite(sd, a["log_factorial"])

    def _miss(self, why: str, status: str) -> tuple[None, str]:
        log.warning(
            "site %r: data cache %s is not usable: %s; rebuilding it from %s",
            self.key["site"],
            self.directory,
            why,
            self.key["data_path"],
        )
        return None, status

    def _why_stale(self, old: Any) -> tuple[str, str]:
        """Why a cache with key ``old`` does not serve this key: (detail, status)."""
        if not isinstance(old, dict):
            return "it has no key", DAMAGED
        for part, what, status in (
            ("format", "it has another format version", SETTINGS_CHANGED),
            ("site", "it belongs to another site", SETTINGS_CHANGED),
            ("schema_hash", "it was made for another schema", SCHEMA_CHANGED),
            ("data_path", "it was made from another data file", FILE_CHANGED),
            ("file", "the data file changed (size, modification time or content)", FILE_CHANGED),
            ("config", "the layer, batch column or minibatch size changed", SETTINGS_CHANGED),
        ):
            if old.get(part) != self.key.get(part):
                return what, status
        return "its key differs", DAMAGED

    # -- writing -----------------------------------------------------------------------------
    def write(self, sd: SiteData, log_factorial: np.ndarray) -> None:
        """Write the arrays and the manifest into a temporary folder, then rename it into place
        (replacing an older cache of this site and schema). Raises ``OSError`` if the state
        folder is not writable."""
        X = sd.X.tocsr()
        arrays = {
            "data": np.asarray(X.data, dtype=np.float32),
            "indices": X.indices,
            "indptr": X.indptr,
            "batch_index": np.asarray(sd.batch_index, dtype=np.int64),
            "log_factorial": np.asarray(log_factorial, dtype=np.float32),
            "obs_names": np.asarray(sd.obs_names, dtype=str),
        }
        if sd.labels is not None:
            arrays["labels"] = np.asarray(sd.labels, dtype=str)
        parent = self.directory.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.tmp-", dir=parent))
        try:
            meta = {}
            for name, a in arrays.items():
                path = tmp / f"{name}.npy"
                np.save(path, a, allow_pickle=False)
                meta[name] = {
                    "dtype": a.dtype.str,
                    "shape": list(a.shape),
                    "file_bytes": path.stat().st_size,
                    **({"crc32": _crc(a)} if a.nbytes <= BLOCK * 16 else {}),
                    **({"blocks": _block_crcs(a)} if a.nbytes > BLOCK * 16 else {}),
                }
            manifest = {
                "key": self.key,
                "n_cells": int(X.shape[0]),
                "n_genes": int(X.shape[1]),
                "missing_genes": list(sd.missing_genes),
                "arrays": meta,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            old = None
            if self.directory.exists():
                old = parent / f".{self.directory.name}.old-{os.getpid()}"
                self.directory.rename(old)
            tmp.rename(self.directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _others(self) -> list[Path]:
        """This site's caches for other schemas."""
        site = str(self.key["site"])
        return [
            p
            for p in self.directory.parent.glob(f"{site}.data-*")
            if p != self.directory and p.is_dir() and p.name[len(site) + 6 :].isalnum()
        ]

    def remove_others(self) -> None:
        """Delete this site's caches for other schemas (a site keeps one)."""
        for p in self._others():
            shutil.rmtree(p, ignore_errors=True)
