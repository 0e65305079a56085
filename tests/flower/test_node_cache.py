"""A site's data cache between Flower messages (:mod:`scfedvi.flower.data_cache`), without
Flower processes: reuse, rebuilds (changed file, schema, corruption), isolation, errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flower_sites import N_TOP, SiteFiles, run_config

from scfedvi.data.errors import SiteDataError
from scfedvi.data.harmonize import harmonize
from scfedvi.data.schema import FederationSchema, project
from scfedvi.flower.data_cache import DataCache
from scfedvi.flower.node import NodeSettings
from scfedvi.train.local import SiteTensors

BATCH = run_config().train.batch_size


@pytest.fixture(scope="module")
def schema(site_files: SiteFiles) -> FederationSchema:
    import anndata as ad

    sites = {s: ad.read_h5ad(p) for s, p in sorted(site_files.paths.items())}
    return harmonize(sites, batch_key="batch", n_top_genes=N_TOP)


def _node(site_files: SiteFiles, tmp_path: Path, site: str = "site-a") -> NodeSettings:
    data = tmp_path / f"{site}.h5ad"
    shutil.copy(site_files.paths[site], data)
    return NodeSettings(site, data, tmp_path / "state")


class Reads:
    """Counts the node's reads of its ``.h5ad``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        read = NodeSettings.read

        def counting(node, batch_key):
            self.n += 1
            return read(node, batch_key)

        monkeypatch.setattr(NodeSettings, "read", counting)


def _mapped(a: np.ndarray) -> bool:
    """Whether ``a`` is (a view of) a memory-mapped file."""
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base
    return False


def _fresh(node: NodeSettings, schema: FederationSchema):
    import anndata as ad

    sd = project(ad.read_h5ad(node.data_path), schema, site=node.site, batch_size=BATCH)
    return sd, SiteTensors(sd.X, sd.batch_index).log_factorial


def _same(got, want) -> None:
    (sd, lf), (ref, ref_lf) = got, want
    assert sd.X.shape == ref.X.shape
    for part in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(sd.X, part), getattr(ref.X, part))
    np.testing.assert_array_equal(sd.batch_index, ref.batch_index)
    np.testing.assert_array_equal(np.asarray(sd.obs_names, dtype=str), ref.obs_names.astype(str))
    np.testing.assert_array_equal(lf, ref_lf)
    assert sd.missing_genes == ref.missing_genes


def test_setup_round_writes_the_cache_and_later_messages_map_it(
    site_files, schema, tmp_path, monkeypatch
):
    node = _node(site_files, tmp_path)
    node.project(schema, BATCH)  # the schema round
    reads = Reads(monkeypatch)
    got = node.site_data(schema, BATCH)
    assert reads.n == 0  # no .h5ad read
    assert _mapped(got[0].X.data) and _mapped(got[0].X.indices) and _mapped(got[1])
    assert not got[0].X.data.flags.writeable  # mapped read-only, not copied
    _same(got, _fresh(node, schema))
    tensors = SiteTensors(got[0].X, got[0].batch_index)
    assert np.shares_memory(tensors.X.data, got[0].X.data)  # training uses the mapped arrays


def test_changed_data_file_is_detected_and_rebuilt(site_files, schema, tmp_path, caplog):
    node = _node(site_files, tmp_path)
    node.project(schema, BATCH)
    st = node.data_path.stat()
    os.utime(node.data_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched
    with caplog.at_level(logging.WARNING, "scfedvi.flower.data_cache"):
        node.site_data(schema, BATCH)
    assert "the data file changed" in caplog.text

    # other counts in a file of the same size, with the modification time put back
    import anndata as ad

    a = ad.read_h5ad(node.data_path)
    a.X.data = a.X.data[::-1].copy()
    st = node.data_path.stat()
    other = tmp_path / "other.h5ad"
    a.write_h5ad(other)
    assert other.stat().st_size == st.st_size  # only the content differs
    other.replace(node.data_path)
    os.utime(node.data_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "scfedvi.flower.data_cache"):
        got = node.site_data(schema, BATCH)
    assert "the data file changed" in caplog.text
    _same(got, _fresh(node, schema))


def test_another_schema_or_batch_size_rebuilds(site_files, schema, tmp_path, caplog, monkeypatch):
    node = _node(site_files, tmp_path)
    node.project(schema, BATCH)
    first = DataCache.for_site(node.state_dir, node.site, node.data_path, schema.hash).directory
    other = FederationSchema(
        genes=schema.genes[:30], batches=schema.batches, batch_key=schema.batch_key
    )
    reads = Reads(monkeypatch)
    with caplog.at_level(logging.WARNING, "scfedvi.flower.data_cache"):
        got = node.site_data(other, BATCH)
    assert reads.n == 1 and "made for another schema" in caplog.text
    assert got[0].X.shape[1] == 30
    assert not first.exists()  # a site keeps one cache
    _same(node.site_data(other, BATCH), _fresh(node, other))
    assert reads.n == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, "scfedvi.flower.data_cache"):
        node.site_data(other, BATCH // 2)
    assert reads.n == 2 and "minibatch size changed" in caplog.text


@pytest.mark.parametrize(
    "damage", ["flip", "flip-block", "truncate", "no-manifest", "bad-manifest"]
)
def test_corrupt_cache_is_rebuilt(site_files, schema, tmp_path, caplog, monkeypatch, damage):
    from scfedvi.flower import data_cache

    if damage == "flip-block":  # large arrays are checked by 1-MiB blocks: small blocks here
        monkeypatch.setattr(data_cache, "BLOCK", 256)
        monkeypatch.setattr(data_cache, "SAMPLED_BLOCKS", 10**6)  # every block is sampled
    node = _node(site_files, tmp_path)
    node.project(schema, BATCH)
    (cache,) = node.state_dir.glob("site-a.data-*")
    data = cache / "data.npy"
    if damage.startswith("flip"):
        raw = bytearray(data.read_bytes())
        raw[-5 if damage == "flip" else len(raw) // 2] ^= 0xFF  # one value, not the header
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-64])
    elif damage == "no-manifest":  # a writer that died before its last file
        (cache / "manifest.json").unlink()
    else:
        (cache / "manifest.json").write_text("{not json")
    if damage == "flip-block":
        assert "blocks" in json.loads((cache / "manifest.json").read_text())["arrays"]["data"]
    reads = Reads(monkeypatch)
    with caplog.at_level(logging.INFO, "scfedvi.flower.data_cache"):
        got = node.site_data(schema, BATCH)
    assert reads.n == 1 and caplog.records
    if damage.startswith("flip"):
        assert "fails its checksum" in caplog.text
    _same(got, _fresh(node, schema))
    node.site_data(schema, BATCH)
    assert reads.n == 1  # whole again


def test_cache_never_serves_another_site(site_files, schema, tmp_path, caplog, monkeypatch):
    a = _node(site_files, tmp_path, "site-a")
    b = _node(site_files, tmp_path, "site-b")  # the same state folder
    a.project(schema, BATCH)
    b.project(schema, BATCH)
    (ca,) = a.state_dir.glob("site-a.data-*")
    (cb,) = b.state_dir.glob("site-b.data-*")
    shutil.rmtree(cb)
    shutil.copytree(ca, cb)  # site-a's arrays under site-b's name
    reads = Reads(monkeypatch)
    with caplog.at_level(logging.WARNING, "scfedvi.flower.data_cache"):
        got = b.site_data(schema, BATCH)
    assert reads.n == 1 and "belongs to another site" in caplog.text
    _same(got, _fresh(b, schema))
    _same(a.site_data(schema, BATCH), _fresh(a, schema))
    assert reads.n == 1


def test_unwritable_state_dir_fails_the_schema_round_naming_state_dir(site_files, schema, tmp_path):
    from flwr.app import ConfigRecord, RecordDict

    from scfedvi._constants import SCHEMA_HASH
    from scfedvi.flower import client_app
    from scfedvi.flower import messages as m
    from scfedvi.flower.settings import AppSettings

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the state folder should be")
    node = NodeSettings("site-a", site_files.paths["site-a"], blocker / "state")
    content = {"schema": schema.to_json(), SCHEMA_HASH: schema.hash}
    msg = SimpleNamespace(content=RecordDict({m.CONFIG: ConfigRecord(content)}))
    with pytest.raises(SiteDataError, match=r"site 'site-a'.*state-dir.*--node-config state-dir"):
        client_app.schema.__wrapped__(msg, node, run_config(), AppSettings())
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs a user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        node = NodeSettings("site-a", site_files.paths["site-a"], locked)
        with pytest.raises(SiteDataError, match="state-dir"):
            client_app.schema.__wrapped__(msg, node, run_config(), AppSettings())


def test_disappeared_data_file_is_a_clear_error(site_files, schema, tmp_path):
    node = _node(site_files, tmp_path)
    node.project(schema, BATCH)
    node.data_path.unlink()  # the cache is whole, but the site's file is gone
    with pytest.raises(SiteDataError, match=rf"site 'site-a'.*{node.data_path}.*data-path"):
        node.site_data(schema, BATCH)


def test_worker_maps_for_training_and_reads_the_anndata_only_to_embed(
    site_files, schema, tmp_path, monkeypatch
):
    from flwr.app import ConfigRecord, RecordDict

    from scfedvi._constants import SCHEMA_HASH
    from scfedvi.flower import client_app
    from scfedvi.flower import messages as m

    node = _node(site_files, tmp_path)
    node.project(schema, BATCH)
    node.save_schema(schema)
    reads = Reads(monkeypatch)
    content = RecordDict({m.CONFIG: ConfigRecord({SCHEMA_HASH: schema.hash})})
    for kind, n_reads in ((m.TRAIN, 0), (m.BALANCE, 0), (m.EMBED, 1)):
        msg = SimpleNamespace(content=content, metadata=SimpleNamespace(message_type=kind))
        worker, adata, sd, _ = client_app._worker(msg, node, run_config())
        assert reads.n == n_reads and (adata is None) == (kind != m.EMBED)
        lf = _fresh(node, schema)[1]
        np.testing.assert_array_equal(worker.data.log_factorial, lf)
        assert np.shares_memory(worker.data.X.data, sd.X.data)


def test_setup_round_writes_the_cache_without_torch(site_files, schema, tmp_path):
    """The setup handlers stay light: writing the cache (log-factorial sums included) does not
    import torch (only the handlers that train or embed do)."""
    import subprocess
    import sys

    schema_file = tmp_path / "schema.json"
    schema.save(schema_file)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from scfedvi.data.schema import FederationSchema\n"
        "from scfedvi.flower.node import NodeSettings\n"
        f"node = NodeSettings('site-a', Path({str(site_files.paths['site-a'])!r}), "
        f"Path({str(tmp_path / 'state')!r}))\n"
        f"node.project(FederationSchema.load(Path({str(schema_file)!r})), {BATCH})\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"
    assert list((tmp_path / "state").glob("site-a.data-*/log_factorial.npy"))


class Handlers:
    """The coordinator's :class:`~scfedvi.flower.exchange.Exchange`, answered by the site's
    ClientApp handlers in this process (no Flower processes): node id 1 is ``node``."""

    def __init__(self, node: NodeSettings, cfg) -> None:
        self.node, self.cfg = node, cfg

    def online(self) -> set[int]:
        return {1}

    def ask(self, targets, message_type, timeout, group_id=""):
        from scfedvi.flower import client_app
        from scfedvi.flower import messages as m
        from scfedvi.flower.exchange import Replies
        from scfedvi.flower.settings import AppSettings

        handler = {m.TRAIN: client_app.train, m.EMBED: client_app.embed}[message_type]
        out = Replies()
        for n, content in targets.items():
            meta = SimpleNamespace(run_id=1, message_type=message_type)
            msg = SimpleNamespace(content=content, metadata=meta)
            rd = handler.__wrapped__(msg, self.node, self.cfg, AppSettings())
            out.ok[n] = SimpleNamespace(content=rd)
        return out


def test_a_rebuild_is_a_line_in_the_coordinators_log(site_files, schema, tmp_path, caplog):
    """A site that rebuilds its cache says why in its reply (a fixed phrase, no paths); the
    coordinator logs it, for a training round and for the embedding."""
    from flwr.app import ConfigRecord, RecordDict

    from scfedvi._constants import SCHEMA_HASH
    from scfedvi.federation.coordinator import Coordinator
    from scfedvi.flower import client_app, server_app
    from scfedvi.flower import messages as m
    from scfedvi.flower.data_cache import DAMAGED, FILE_CHANGED
    from scfedvi.flower.progress import DATA_CACHE
    from scfedvi.flower.settings import AppSettings
    from scfedvi.flower.setup import Federation

    node = _node(site_files, tmp_path)
    cfg = run_config(min_sites=1)
    content = {"schema": schema.to_json(), SCHEMA_HASH: schema.hash}
    msg = SimpleNamespace(content=RecordDict({m.CONFIG: ConfigRecord(content)}))
    reply = client_app.schema.__wrapped__(msg, node, cfg, AppSettings())
    n_cells = int(reply.config_records[m.CONFIG][m.N_CELLS])
    fed = Federation(schema, {1: node.site}, {node.site: n_cells})
    coord = Coordinator(schema.n_genes, schema.n_batches, cfg, schema_hash=schema.hash)
    coord.resolve_schedule(fed.n_cells)
    ex = Handlers(node, cfg)
    logger = "scfedvi.flower.server_app"

    def coordinator_log() -> str:  # the coordinator's lines only (not the site's own log)
        return "\n".join(r.getMessage() for r in caplog.records if r.name == logger)

    with caplog.at_level(logging.INFO, logger):
        updates, failed = server_app.train_round(ex, coord, fed, 0, 60.0)
    assert not failed and "rebuilt" not in coordinator_log()  # the setup round's cache
    coord.aggregate(updates)

    st = node.data_path.stat()  # the site's file changes between two rounds
    os.utime(node.data_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger):
        updates, failed = server_app.train_round(ex, coord, fed, 1, 60.0)
    assert not failed
    line = f"round 2: site 'site-a' rebuilt its data cache from its data file ({FILE_CHANGED})"
    assert line in coordinator_log(), caplog.text
    assert str(tmp_path) not in coordinator_log()  # the reply names no path of the site
    coord.aggregate(updates)

    (cache,) = node.state_dir.glob("site-a.data-*")
    raw = bytearray((cache / "data.npy").read_bytes())
    raw[-5] ^= 0xFF  # a damaged value
    (cache / "data.npy").write_bytes(bytes(raw))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger):
        embedded = server_app.embed(ex, coord, fed, 60.0, skip=set())
    assert embedded == {"site-a": n_cells}
    line = f"embedding: site 'site-a' rebuilt its data cache from its data file ({DAMAGED})"
    assert line in coordinator_log(), caplog.text
    # and a message that maps the cache says nothing
    msg = SimpleNamespace(
        content=RecordDict(
            {
                m.ARRAYS: m.params_to_record(coord.broadcast()[0]),
                m.CONFIG: m.round_config(schema.hash, 2, **m.work_to_config(coord.work("site-a"))),
            }
        ),
        metadata=SimpleNamespace(run_id=1, message_type=m.TRAIN),
    )
    fresh = NodeSettings(node.site, node.data_path, node.state_dir)
    out = client_app.train.__wrapped__(msg, fresh, cfg, AppSettings())
    assert DATA_CACHE not in out.config_records[m.CONFIG]


def test_balance_answer_from_the_kept_embedding_imports_no_torch(site_files, schema, tmp_path):
    """The second message of a balancing pass answers from the embedding the first one kept:
    a fresh process (as Flower starts for every message) that imports no torch."""
    import subprocess
    import sys

    from flwr.app import RecordDict

    from scfedvi.federation.balance import CENTROIDS
    from scfedvi.federation.coordinator import Coordinator
    from scfedvi.flower import client_app
    from scfedvi.flower import messages as m
    from scfedvi.flower.settings import AppSettings

    node = _node(site_files, tmp_path)
    node.project(schema, BATCH)
    node.save_schema(schema)
    cfg = run_config()
    params, _ = Coordinator(schema.n_genes, schema.n_batches, cfg).broadcast()
    np.savez(tmp_path / "params.npz", **params)
    extra = {m.PHASE: CENTROIDS, m.N_CLUSTERS: 8, m.SEED: 0}
    content = RecordDict(
        {
            m.ARRAYS: m.params_to_record(params),
            m.CONFIG: m.round_config(schema.hash, 2, **extra),
        }
    )
    meta = SimpleNamespace(run_id=None, message_type=m.BALANCE)
    first = client_app.balance.__wrapped__(
        SimpleNamespace(content=content, metadata=meta), node, cfg, AppSettings()
    )
    assert node.balance_cache_path.exists()
    code = f"""
import sys
from pathlib import Path
from types import SimpleNamespace
import numpy as np
from flwr.app import RecordDict
from flower_sites import run_config
from scfedvi.flower import client_app, messages as m
from scfedvi.flower.node import NodeSettings
from scfedvi.flower.settings import AppSettings
with np.load({str(tmp_path / "params.npz")!r}) as f:
    params = {{k: f[k] for k in f.files}}
extra = {{m.PHASE: {CENTROIDS!r}, m.N_CLUSTERS: 8, m.SEED: 0}}
content = RecordDict({{m.ARRAYS: m.params_to_record(params),
                      m.CONFIG: m.round_config({schema.hash!r}, 2, **extra)}})
msg = SimpleNamespace(content=content, metadata=SimpleNamespace(run_id=None, message_type=m.BALANCE))
node = NodeSettings("site-a", Path({str(node.data_path)!r}), Path({str(node.state_dir)!r}))
out = client_app.balance.__wrapped__(msg, node, run_config(), AppSettings())
np.save({str(tmp_path / "values.npy")!r}, out.array_records[m.CLUSTERS]["values"].numpy())
print("torch" in sys.modules)
"""
    tests_dir = str(Path(__file__).parent)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"  # no torch in the second message
    np.testing.assert_array_equal(  # the same answer as the message that embedded
        np.load(tmp_path / "values.npy"), first.array_records[m.CLUSTERS]["values"].numpy()
    )
