"""Loaders: the data directory, the real files, and the cached, verified download."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scfedvi.data import (
    DATASETS,
    DatasetChecksumError,
    DatasetUnavailableError,
    data_dir,
    load_dataset,
    load_scib_pancreas,
)
from scfedvi.data.loaders import SCIB_PANCREAS_FILE, default_cache_dir, sha256sum

from .conftest import tiny


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def h5ad_file(tmp_path) -> Path:
    path = tmp_path / "src" / "small.h5ad"
    path.parent.mkdir()
    tiny(20, 5).write_h5ad(path)
    return path


@pytest.fixture
def server(h5ad_file):
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(h5ad_file.parent)
    )
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/{h5ad_file.name}"
    httpd.shutdown()
    httpd.server_close()


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SCFEDVI_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.setenv("SCFEDVI_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DatasetUnavailableError, match=r"SCFEDVI_DATA_DIR=.*is not a directory"):
        data_dir()
    with pytest.raises(DatasetUnavailableError, match=r"pancreas_neuca\.h5ad does not exist"):
        load_dataset("pancreas", directory=tmp_path)
    with pytest.raises(KeyError, match="unknown dataset 'lung'"):
        load_dataset("lung")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SCFEDVI_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("SCFEDVI_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "scfedvi"


@pytest.mark.parametrize(
    ("name", "shape", "batch_key", "label_key"),
    [
        ("pancreas", (3514, 1194), "donor", "cell_type"),
        ("cortex", (1051, 3157), "batch", "cell_class"),
    ],
)
def test_load_real_datasets(data_dir, monkeypatch, name, shape, batch_key, label_key):
    monkeypatch.setenv("SCFEDVI_DATA_DIR", str(data_dir))
    a = load_dataset(name, verify=True)
    assert a.shape == shape
    info = DATASETS[name]
    assert (info.batch_key, info.label_key) == (batch_key, label_key)
    assert {batch_key, label_key} <= set(a.obs.columns)


def test_real_checksum_mismatch_is_reported(data_dir, tmp_path):
    (tmp_path / "cortex_interneurons_mn.h5ad").write_bytes(b"not the file")
    with pytest.raises(DatasetChecksumError, match=r"sha256 is .*expected f9074540"):
        load_dataset("cortex", verify=True, directory=tmp_path)


def test_scib_loads_from_cache_without_network(tmp_path, h5ad_file):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / SCIB_PANCREAS_FILE).write_bytes(h5ad_file.read_bytes())
    url = f"http://127.0.0.1:{_closed_port()}/x"
    a = load_scib_pancreas(cache, url=url, sha256=sha256sum(h5ad_file))
    assert a.shape == (20, 5)
    with pytest.raises(DatasetChecksumError, match="expected 000"):
        load_scib_pancreas(cache, url=url, sha256="0" * 64)
    assert (cache / SCIB_PANCREAS_FILE).exists()  # a cached file is never deleted


def test_scib_offline_error_says_where_to_put_the_file(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/x"
    with pytest.raises(
        DatasetUnavailableError, match=rf"cannot download {url}.*put it at .*{SCIB_PANCREAS_FILE}"
    ):
        load_scib_pancreas(tmp_path, url=url, sha256="0" * 64, timeout=5)
    assert list(tmp_path.iterdir()) == []  # no partial file left


def test_scib_download_verifies_and_caches(tmp_path, h5ad_file, server, monkeypatch):
    monkeypatch.setenv("SCFEDVI_CACHE", str(tmp_path / "c1"))
    a = load_scib_pancreas(url=server, sha256=sha256sum(h5ad_file))
    assert a.shape == (20, 5) and (tmp_path / "c1" / SCIB_PANCREAS_FILE).exists()
    with pytest.raises(DatasetChecksumError):
        load_scib_pancreas(tmp_path / "c2", url=server, sha256="f" * 64)
    assert not (tmp_path / "c2" / SCIB_PANCREAS_FILE).exists()  # bad download removed
    # trust on first use: the checksum of the first download is recorded and enforced
    b = load_scib_pancreas(tmp_path / "c3", url=server, sha256=None)
    np.testing.assert_array_equal(b.X.toarray(), a.X.toarray())
    record = tmp_path / "c3" / (SCIB_PANCREAS_FILE + ".sha256")
    assert record.read_text().strip() == sha256sum(h5ad_file)
    ad.AnnData(np.ones((2, 2), dtype=np.float32)).write_h5ad(tmp_path / "c3" / SCIB_PANCREAS_FILE)
    with pytest.raises(DatasetChecksumError):
        load_scib_pancreas(tmp_path / "c3", url=server, sha256=None)


def test_read_site_h5ad_errors_name_the_site_and_the_path(tmp_path):
    from scfedvi.data import SiteDataError
    from scfedvi.data.loaders import read_site_h5ad

    good = tmp_path / "lab_a.h5ad"
    tiny().write_h5ad(good)
    assert read_site_h5ad(good, "lab-a").n_obs == 40
    csv = tmp_path / "counts.csv"
    csv.write_text("gene,c1\nACTB,1\n")
    with pytest.raises(
        SiteDataError, match=r"site 'lab-b': .*counts\.csv is not an \.h5ad file.*anndata\.read_csv"
    ):
        read_site_h5ad(csv, "lab-b")
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(SiteDataError, match=r"site 'lab-c': .*cut\.h5ad is truncated"):
        read_site_h5ad(cut, "lab-c")
    with pytest.raises(SiteDataError, match="is a folder"):
        read_site_h5ad(tmp_path, "lab-d")
    with pytest.raises(FileNotFoundError, match=r"site 'lab-e': .*missing\.h5ad: no such file"):
        read_site_h5ad(tmp_path / "missing.h5ad", "lab-e")
    with pytest.raises(SiteDataError, match=r"^/|^[A-Za-z]:"):  # no site: the path leads
        read_site_h5ad(csv)
