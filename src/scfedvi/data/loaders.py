"""Loaders: a site's own ``.h5ad`` (:func:`read_site_h5ad`, with an error naming the site and
the path when the file is not one), the real datasets beside the project, and the public scIB
human pancreas collection (downloaded once into a cache, verified by checksum)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scfedvi._constants import DATA_DIR_ENV
from scfedvi.data.errors import (
    DatasetChecksumError,
    DatasetUnavailableError,
    SiteDataError,
    site_prefix,
)

if TYPE_CHECKING:
    from anndata import AnnData

#: Environment variable naming the download cache (default ``~/.cache/scfedvi``).
CACHE_ENV = "SCFEDVI_CACHE"
#: scIB human pancreas (Luecken et al. 2022), figshare file 24539828,
#: ``human_pancreas_norm_complexBatch.h5ad``: about 16,000 cells, 9 technology batches
#: (``obs['tech']``), labels ``obs['celltype']``, raw counts in ``layers['counts']``.
SCIB_PANCREAS_URL = "https://figshare.com/ndownloader/files/24539828"
SCIB_PANCREAS_FILE = "human_pancreas_norm_complexBatch.h5ad"
#: sha256 of the file as published. It could not be computed here (no network); while it
#: is ``None``, the first download records its checksum beside the file (``.sha256``) and
#: later loads verify against that record (trust on first use). Pin it once known.
SCIB_PANCREAS_SHA256: str | None = None

_PROJECT_ROOT = Path(__file__).resolve().parents[3]


#: File endings of formats that are often passed by mistake, and how to convert them.
_OTHER_FORMATS = {
    ".csv": "anndata.read_csv",
    ".tsv": "anndata.read_csv(path, delimiter='\\t')",
    ".txt": "anndata.read_text",
    ".mtx": "scanpy.read_10x_mtx (its folder)",
    ".loom": "anndata.read_loom",
    ".h5": "scanpy.read_10x_h5",
    ".zarr": "anndata.read_zarr",
    ".rds": "a conversion from R (e.g. zellkonverter or SeuratDisk)",
}


def read_site_h5ad(path: str | os.PathLike, site: str | None = None) -> AnnData:
    """Read a site's ``.h5ad``; a file that is not one gets an error naming the site and path.

    Parameters
    ----------
    path
        The site's file.
    site
        The site's name, for the messages.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    SiteDataError
        When it is a folder, not an HDF5 file (a text file, a CSV, ...), truncated, or an HDF5
        file that anndata cannot read as AnnData. The message says what to do instead.
    """
    import anndata as ad
    import h5py

    p = Path(path)
    where = site_prefix(site)
    if not p.exists():
        raise FileNotFoundError(f"{where}{p}: no such file")
    if p.is_dir():
        raise SiteDataError(f"{where}{p} is a folder, not an .h5ad file; pass the file itself")
    convert = _OTHER_FORMATS.get(p.suffix.lower())
    how = (
        f"read it with {convert} and save it with adata.write_h5ad(...)"
        if convert
        else "pass the file written by adata.write_h5ad(...)"
    )
    if not h5py.is_hdf5(p):
        raise SiteDataError(f"{where}{p} is not an .h5ad file (no HDF5 signature): {how}")
    try:
        return ad.read_h5ad(p)
    except (OSError, KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "truncated" in reason:
            what = "is truncated (an interrupted copy or write?)"
            fix = "copy or write it again"
        else:
            what = "is an HDF5 file that anndata cannot read as AnnData"
            fix = how
        raise SiteDataError(f"{where}{p} {what}: {fix} ({type(err).__name__}: {reason})") from err


@dataclass(frozen=True)
class DatasetInfo:
    """A real dataset shipped beside the project.

    Parameters
    ----------
    file
        File name in :func:`data_dir`.
    sha256
        Checksum of the file (from ``shared/data/README.md``).
    batch_key
        Default batch column.
    label_key
        Default label column (shared across batches).
    """

    file: str
    sha256: str
    batch_key: str
    label_key: str


DATASETS: dict[str, DatasetInfo] = {
    "pancreas": DatasetInfo(
        file="pancreas_neuca.h5ad",
        sha256="c84fd29903c3903fd0f6eff9de1da27c7d3f417d609d31b326763019d5090b58",
        batch_key="donor",
        label_key="cell_type",
    ),
    "cortex": DatasetInfo(
        file="cortex_interneurons_mn.h5ad",
        sha256="f9074540a916acd531ad75d6ff1bad65242bbd3fa283e51a50b0b336c131b6e4",
        batch_key="batch",
        label_key="cell_class",
    ),
}


def data_dir() -> Path:
    """Directory of the real datasets: ``$SCFEDVI_DATA_DIR``, else ``<project root>/../shared/data``.

    Raises
    ------
    DatasetUnavailableError
        When neither exists.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DatasetUnavailableError(
                f"{DATA_DIR_ENV}={env} is not a directory; point it at the folder holding "
                "pancreas_neuca.h5ad and cortex_interneurons_mn.h5ad"
            )
        return path
    default = _PROJECT_ROOT.parent / "shared" / "data"
    if default.is_dir():
        return default
    raise DatasetUnavailableError(
        f"no data directory: set {DATA_DIR_ENV} to the folder holding the datasets "
        f"(default {default} does not exist)"
    )


def sha256sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Return the sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, expected: str) -> None:
    got = sha256sum(path)
    if got != expected:
        raise DatasetChecksumError(
            f"{path}: sha256 is {got}, expected {expected}; the file is corrupt or another "
            "version: delete it and download it again"
        )


def load_dataset(
    name: str, *, verify: bool = False, directory: str | Path | None = None
) -> AnnData:
    """Load a dataset of :data:`DATASETS` (``"pancreas"`` or ``"cortex"``).

    Parameters
    ----------
    name
        Dataset name.
    verify
        Check the file's sha256 first.
    directory
        Where the file is; default :func:`data_dir`.
    """
    import anndata as ad

    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    info = DATASETS[name]
    path = Path(directory) if directory is not None else data_dir()
    path = path / info.file
    if not path.exists():
        raise DatasetUnavailableError(
            f"{path} does not exist; put {info.file} there or set {DATA_DIR_ENV}"
        )
    if verify:
        _verify(path, info.sha256)
    return ad.read_h5ad(path)


def default_cache_dir() -> Path:
    """Download cache: ``$SCFEDVI_CACHE``, else ``~/.cache/scfedvi``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scfedvi"


def fetch(url: str, path: Path, *, timeout: float = 60.0) -> None:
    """Download ``url`` to ``path`` (atomically: a partial download never lands at ``path``).

    Raises
    ------
    DatasetUnavailableError
        When the download fails (offline, refused, HTTP error).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError) as e:
        raise DatasetUnavailableError(
            f"cannot download {url} ({e}); without network, download it elsewhere and put it "
            f"at {path} (or set {CACHE_ENV} to the folder holding {path.name})"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_scib_pancreas(
    cache_dir: str | Path | None = None,
    url: str = SCIB_PANCREAS_URL,
    sha256: str | None = SCIB_PANCREAS_SHA256,
    *,
    timeout: float = 60.0,
) -> AnnData:
    """Load the scIB human pancreas collection, downloading it once into the cache.

    Parameters
    ----------
    cache_dir
        Folder of the cached file; default :func:`default_cache_dir` (``$SCFEDVI_CACHE`` or
        ``~/.cache/scfedvi``).
    url
        Where to download it from.
    sha256
        Expected checksum, verified after download and on every load. ``None``: trust on
        first use (the checksum of the first download is recorded in ``<file>.sha256``).
    timeout
        Network timeout in seconds.

    Raises
    ------
    DatasetUnavailableError
        When the file is not cached and cannot be downloaded.
    DatasetChecksumError
        When the file does not have the expected checksum.
    """
    import anndata as ad

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / SCIB_PANCREAS_FILE
    record = path.with_name(path.name + ".sha256")
    downloaded = not path.exists()
    if downloaded:
        fetch(url, path, timeout=timeout)
        if sha256 is None:
            record.write_text(sha256sum(path) + "\n")
    expected = sha256 or (record.read_text().strip() if record.exists() else None)
    if expected is not None:
        try:
            _verify(path, expected)
        except DatasetChecksumError:
            if downloaded:  # never keep a bad download in the cache
                path.unlink()
            raise
    return ad.read_h5ad(path)
