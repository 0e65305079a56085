"""The federation schema: genes, batches and labels agreed before round 1, hashed.

Every message carries the hash. A site's data is projected onto the schema by
:func:`~scfedvi.data.projection.project` (re-exported here with :class:`SiteData`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

# SiteData and project live in projection.py and are re-exported here.
from scfedvi.data.projection import SiteData, align_genes, project

__all__ = ["SCHEMA_VERSION", "FederationSchema", "SiteData", "align_genes", "project"]

#: Version of the JSON layout written by :meth:`FederationSchema.to_json`.
SCHEMA_VERSION = 1


def _str_tuple(values: Any, what: str) -> tuple[str, ...]:
    out = tuple(str(v) for v in values)
    if not out:
        raise ValueError(f"FederationSchema: {what} is empty; give at least one")
    dup = pd.Index(out)[pd.Index(out).duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"FederationSchema: {what} has duplicates {dup[:5]}; make them unique")
    return out


@dataclass(frozen=True)
class FederationSchema:
    """What every site agrees on before training: genes, batches and labels, in order.

    Parameters
    ----------
    genes
        Gene names, in the order of the model's input and output columns.
    batches
        Global batch categories; a cell's batch index is its position here.
    batch_key
        Column of ``obs`` holding the batch at every site.
    labels
        Optional label categories (e.g. cell types).
    label_key
        Column of ``obs`` holding the labels (required when ``labels`` is given).
    layer
        Layer holding raw counts at the sites (``None``: ``X``).
    """

    genes: tuple[str, ...]
    batches: tuple[str, ...]
    batch_key: str
    labels: tuple[str, ...] | None = None
    label_key: str | None = None
    layer: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "genes", _str_tuple(self.genes, "genes"))
        object.__setattr__(self, "batches", _str_tuple(self.batches, "batches"))
        if self.labels is not None:
            object.__setattr__(self, "labels", _str_tuple(self.labels, "labels"))
            if self.label_key is None:
                raise ValueError("FederationSchema: labels given without label_key; pass both")
        if not self.batch_key:
            raise ValueError("FederationSchema: batch_key is empty; name the obs column")

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return len(self.genes)

    @property
    def n_batches(self) -> int:
        """Number of batch categories."""
        return len(self.batches)

    @property
    def n_labels(self) -> int:
        """Number of label categories (0 without labels)."""
        return 0 if self.labels is None else len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        """Return the schema as JSON-able builtins (lists, strings)."""
        return {
            "version": SCHEMA_VERSION,
            "genes": list(self.genes),
            "batches": list(self.batches),
            "batch_key": self.batch_key,
            "labels": None if self.labels is None else list(self.labels),
            "label_key": self.label_key,
            "layer": self.layer,
        }

    def to_json(self) -> str:
        """Return the canonical JSON (sorted keys, no spaces) that :attr:`hash` digests."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FederationSchema:
        """Parse a schema written by :meth:`to_json` or :meth:`save`."""
        d = json.loads(text)
        version = d.pop("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"FederationSchema: unsupported version {version}; expected 1")
        labels = d.pop("labels", None)
        return cls(
            genes=tuple(d.pop("genes")),
            batches=tuple(d.pop("batches")),
            labels=None if labels is None else tuple(labels),
            **d,
        )

    @cached_property
    def hash(self) -> str:
        """sha256 hex digest of :meth:`to_json`."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @property
    def short_hash(self) -> str:
        """First 16 hex characters of :attr:`hash`."""
        return self.hash[:16]

    def save(self, path: str | Path) -> None:
        """Write the canonical JSON to ``path``."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> FederationSchema:
        """Read a schema written by :meth:`save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
