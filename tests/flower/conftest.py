"""Fixtures of the Flower tests: three tiny sites on disk, the in-process reference, a cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flower_certs import make_tls
from flower_harness import Cluster
from flower_sites import SiteFiles, make_site_files, reference


@pytest.fixture(scope="session")
def site_files(tmp_path_factory: pytest.TempPathFactory) -> SiteFiles:
    return make_site_files(tmp_path_factory.mktemp("site-data"))


@pytest.fixture(scope="session")
def in_process(site_files: SiteFiles) -> tuple[str, dict[str, np.ndarray]]:
    return reference(site_files)


@pytest.fixture
def cluster(tmp_path: Path):
    """A cluster of this test; every process it started is stopped afterwards."""
    c = Cluster(tmp_path)
    yield c
    c.stop_all()


@pytest.fixture
def secure_cluster(tmp_path: Path):
    """A cluster whose SuperLink serves TLS (a test CA, a certificate for 127.0.0.1) and
    admits only SuperNodes whose public keys were registered."""
    c = Cluster(tmp_path, tls=make_tls(tmp_path / "certs"), auth=True)
    yield c
    c.stop_all()
