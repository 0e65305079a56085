"""A site's side, free of Flower messages: its settings, data and private files.

A SuperNode names its site and data in its node config::

    flower-supernode ... --node-config "site='lab-a' data-path='/data/lab_a.h5ad'
                                        state-dir='/data/scfedvi-state' batch-key='tech'"

``batch-key`` and ``layer`` are optional: the site's own column and layer names when they
differ from the federation's. Under the simulation engine a node has only a
``partition-id``; the run config's ``sim-data-dir`` then holds one ``<site>.h5ad`` per node.

Every file a site writes stays in its ``state-dir``: the schema it agreed to, its private
training state per round (normalization statistics, optimizer moments, control variates)
and its embedded cells.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scfedvi._constants import SITE_STATE_FILE
from scfedvi.config import SitePolicy
from scfedvi.data.errors import SchemaMismatchError, SiteDataError
from scfedvi.flower.settings import AppSettings

if TYPE_CHECKING:
    import numpy as np
    from anndata import AnnData

    from scfedvi.data.schema import FederationSchema, SiteData
    from scfedvi.flower.data_cache import DataCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeSettings:
    """Where a site's data and private files are.

    Parameters
    ----------
    site
        The site's name (the same as in the in-process runtime: seeds depend on it).
    data_path
        The site's ``.h5ad`` of raw counts.
    state_dir
        Folder for the site's private files (default: ``scfedvi-state`` beside the data).
    batch_key, layer
        The site's own batch column and raw-count layer, if they differ from the run's.
    policy
        The site's own :class:`~scfedvi.config.SitePolicy`, read from its node config
        (:func:`~scfedvi.privacy.policy.policy_from_node_config`), never from the run config.
    """

    site: str
    data_path: Path
    state_dir: Path
    batch_key: str = ""
    layer: str = ""
    policy: SitePolicy = field(default_factory=SitePolicy)
    #: a node of Flower's simulation engine (its data from ``sim-data-dir``): every site is
    #: simulated by whoever runs the simulation, so it keeps no record across runs
    simulated: bool = False
    #: What :meth:`site_data` did with the data cache in this process (see data_cache_note)
    _cache_notes: list[str] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def from_configs(
        cls, node_config: Mapping[str, Any], app: AppSettings, out_dir: Path | None = None
    ) -> NodeSettings:
        """Read the node config (deployment) or the partition (simulation)."""
        if "data-path" in node_config:
            data = Path(str(node_config["data-path"])).expanduser().resolve()
            site = str(node_config.get("site", "")) or data.stem
            default_state = data.parent / "scfedvi-state"
        elif "partition-id" in node_config and app.sim_data_dir:
            files = sorted(Path(app.sim_data_dir).expanduser().glob("*.h5ad"))
            pid = int(str(node_config["partition-id"]))
            if pid >= len(files):
                raise SiteDataError(
                    f"partition {pid}: sim-data-dir {app.sim_data_dir} has {len(files)} .h5ad "
                    "files; give one file per simulated node"
                )
            data, site = files[pid].resolve(), files[pid].stem
            default_state = Path(app.sim_state_dir or (out_dir or app.out_path) / "sites")
        else:
            raise SiteDataError(
                "this SuperNode has no data: start it with --node-config "
                "\"site='NAME' data-path='/path/site.h5ad'\" (or set sim-data-dir in the run "
                "config for the simulation engine)"
            )
        from scfedvi.privacy.policy import policy_from_node_config

        simulated = "data-path" not in node_config

        state = node_config.get("state-dir") or default_state
        return cls(
            site=site,
            data_path=data,
            state_dir=Path(str(state)).expanduser().resolve(),
            batch_key=str(node_config.get("batch-key", "")),
            layer=str(node_config.get("layer", "")),
            policy=policy_from_node_config(node_config),
            simulated=simulated,
        )

    # -- files in the site's state folder ----------------------------------------------------
    @property
    def schema_path(self) -> Path:
        return self.state_dir / f"{self.site}.schema.json"

    def state_path(self, round_idx: int) -> Path:
        return self.state_dir / SITE_STATE_FILE.format(site=self.site, round=round_idx)

    @property
    def embedded_path(self) -> Path:
        return self.state_dir / f"{self.site}.embedded.h5ad"

    # -- data --------------------------------------------------------------------------------
    def read(self, batch_key: str) -> AnnData:
        """The site's AnnData, with its batch column under the federation's ``batch_key``."""
        from scfedvi.data.loaders import read_site_h5ad

        self._require_data()
        adata = read_site_h5ad(self.data_path, self.site)  # not an .h5ad: a clear SiteDataError
        if self.batch_key and self.batch_key != batch_key:
            if self.batch_key not in adata.obs:
                raise SiteDataError(
                    f"site {self.site!r}: obs[{self.batch_key!r}] (node config batch-key) is "
                    f"missing; columns: {list(adata.obs.columns)}"
                )
            adata.obs[batch_key] = adata.obs[self.batch_key]
        return adata

    def layer_or(self, run_layer: str | None) -> str | None:
        return self.layer or run_layer or None

    def project(self, schema: FederationSchema, batch_size: int) -> tuple[AnnData, SiteData]:
        """Read the data, project it onto ``schema`` (validates it) and keep the result in the
        site's data cache (:mod:`scfedvi.flower.data_cache`) for the messages that follow.

        Raises a :class:`SiteDataError` naming ``state-dir`` if the cache cannot be written.
        """
        from scfedvi.data.schema import project

        cache = self._cache(schema, batch_size)  # the file's identity before it is read
        adata = self.read(schema.batch_key)
        sd = project(
            adata,
            schema,
            site=self.site,
            layer=self.layer_or(schema.layer),
            batch_size=batch_size,
        )
        self._write_cache(cache, sd)
        return adata, sd

    def _require_data(self) -> None:
        if not self.data_path.exists():
            raise SiteDataError(
                f"site {self.site!r}: data-path {self.data_path} does not exist; fix the "
                "SuperNode's --node-config data-path"
            )

    def site_data(self, schema: FederationSchema, batch_size: int) -> tuple[SiteData, np.ndarray]:
        """The projected data and each cell's log-factorial sum, mapped from the site's data
        cache; a missing, stale or corrupt cache is rebuilt from ``data-path`` (logged)."""
        cache = self._cache(schema, batch_size)
        hit, why = cache.probe()
        self._cache_notes.append(why)
        if hit is not None:
            return hit.data, hit.log_factorial
        from scfedvi.data.schema import project

        sd = project(
            self.read(schema.batch_key),
            schema,
            site=self.site,
            layer=self.layer_or(schema.layer),
            batch_size=batch_size,
        )
        return sd, self._write_cache(cache, sd)

    @property
    def data_cache_note(self) -> str:
        """Why the last :meth:`site_data` rebuilt the site's data cache (one of
        :data:`~scfedvi.flower.data_cache.REBUILD_REASONS`: no paths, what the site's reply
        tells the coordinator); ``""`` if it mapped the cache, or was not called."""
        return self._cache_notes[-1] if self._cache_notes else ""

    def _cache(self, schema: FederationSchema, batch_size: int) -> DataCache:
        from scfedvi.flower.data_cache import DataCache

        self._require_data()
        try:
            return DataCache.for_site(
                self.state_dir,
                self.site,
                self.data_path,
                schema.hash,
                layer=self.layer_or(schema.layer) or "",
                batch_key=schema.batch_key,
                site_batch_key=self.batch_key,
                batch_size=int(batch_size),
            )
        except OSError as e:
            raise SiteDataError(
                f"site {self.site!r}: data-path {self.data_path} cannot be read ({e}); fix "
                "the SuperNode's --node-config data-path"
            ) from e

    def _write_cache(self, cache: DataCache, sd: SiteData) -> np.ndarray:
        """Write ``sd`` and its log-factorial sums (returned) into ``cache``."""
        from scfedvi.flower.data_cache import log_factorial_sums

        log_factorial = log_factorial_sums(sd.X)  # no torch in the setup round
        try:
            cache.write(sd, log_factorial)
        except OSError as e:
            raise SiteDataError(
                f"site {self.site!r}: cannot write the site's data cache in state-dir "
                f"{self.state_dir} ({e}); set the SuperNode's --node-config state-dir to a "
                "folder this site can write"
            ) from e
        cache.remove_others()
        log.info("site %r: data cache written to %s", self.site, cache.directory)
        return log_factorial

    # -- the schema the site agreed to -------------------------------------------------------
    def save_schema(self, schema: FederationSchema) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        schema.save(self.schema_path)

    def load_schema(self, expected_hash: str) -> FederationSchema:
        """The stored schema; a clear error if there is none or its hash differs."""
        from scfedvi.data.schema import FederationSchema

        if not self.schema_path.exists():
            raise SchemaMismatchError(
                f"site {self.site!r}: no federation schema in {self.state_dir}; the server "
                "must run the setup round (query.schema) with this site before training"
            )
        schema = FederationSchema.load(self.schema_path)
        if schema.hash != expected_hash:
            raise SchemaMismatchError(
                f"site {self.site!r}: schema hash mismatch: the server's message carries "
                f"{expected_hash[:16]}, this site agreed to {schema.hash[:16]} "
                f"({self.schema_path}); restart the run's setup round so every site gets "
                "the same schema, or point the site at the right state-dir"
            )
        return schema

    # -- the balancing step's embedding, kept between its messages ---------------------------
    @property
    def balance_cache_path(self) -> Path:
        return self.state_dir / f"{self.site}.balance-embedding.npz"

    def embedding_key(self, schema_hash: str, config: Mapping[str, Any], arrays: Any) -> str | None:
        """sha256 of everything a balancing embedding depends on: the schema, the run
        configuration, the site's data file (path, size, modification time), its batch column
        and layer, and the message's arrays (``{record: {name: array}}``: the global parameters
        and the balancing steps so far). ``None`` if the data file cannot be read (the caller
        then reads it as usual, and gets the usual error)."""
        import hashlib
        import json

        import numpy as np

        try:
            st = self.data_path.stat()
        except OSError:
            return None
        head = [schema_hash, self.site, str(self.data_path), st.st_size, st.st_mtime_ns]
        head += [self.batch_key, self.layer, json.dumps(config, sort_keys=True, default=str)]
        h = hashlib.sha256(json.dumps(head).encode())
        for record in sorted(arrays):
            for name in sorted(arrays[record]):
                a = np.ascontiguousarray(arrays[record][name])
                h.update(f"{record}/{name}/{a.dtype.str}/{a.shape}".encode())
                h.update(a.tobytes())
        return h.hexdigest()

    def load_embedding(self, key: str | None) -> np.ndarray | None:
        """The cached embedding if it was computed for ``key``, else ``None``."""
        import numpy as np

        if key is None:
            return None
        try:
            with np.load(self.balance_cache_path, allow_pickle=False) as f:
                if str(f["key"]) == key:
                    return np.array(f["z"])
        except (OSError, KeyError, ValueError, EOFError):  # missing or unreadable: recompute
            pass
        return None

    def save_embedding(self, key: str, z: np.ndarray) -> None:
        """Keep one embedding (the latest) in the site's private state folder."""
        import numpy as np

        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.balance_cache_path.with_name(self.balance_cache_path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), z=z)
        tmp.replace(self.balance_cache_path)

    def prune_states(self, keep_from: int) -> None:
        """Delete round states older than ``keep_from`` (a restarted round reloads its own)."""
        for p in self.state_dir.glob(f"{self.site}.round*.pt"):
            try:
                r = int(p.stem.rsplit("round", 1)[1])
            except ValueError:
                continue
            if r < keep_from:
                p.unlink(missing_ok=True)
