"""Data layer: validation, the federation schema, harmonization, partitions, simulation
and loaders. Imports only numpy, scipy and pandas (anndata when data is read or built).

The names below are imported on first use (PEP 562), so that ``import scfedvi.data.errors``
(every site message does) does not pull pandas and scipy into a process that needs neither.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scfedvi.data.errors import (
        DatasetChecksumError,
        DatasetUnavailableError,
        SchemaMismatchError,
        SiteDataError,
        SiteDataWarning,
    )
    from scfedvi.data.harmonize import (
        SiteSummary,
        batch_clip_values,
        build_schema,
        gene_universe,
        harmonize,
        hvg_table,
        shared_batches,
        site_batches,
        site_genes,
        site_summary,
    )
    from scfedvi.data.loaders import (
        DATASETS,
        SCIB_PANCREAS_SHA256,
        SCIB_PANCREAS_URL,
        DatasetInfo,
        data_dir,
        load_dataset,
        load_scib_pancreas,
    )
    from scfedvi.data.partition import (
        auto_groups,
        dirichlet_split,
        paper_partition,
        random_split,
        sites_per_group,
        split_by_groups,
        split_within_group,
    )
    from scfedvi.data.schema import FederationSchema, SiteData, align_genes, project
    from scfedvi.data.simulate import simulate
    from scfedvi.data.validate import drop_empty_cells, get_counts, validate_site

#: Each public name and the submodule of :mod:`scfedvi.data` that defines it.
_LAZY: dict[str, str] = {
    "DatasetChecksumError": "errors",
    "DatasetUnavailableError": "errors",
    "SchemaMismatchError": "errors",
    "SiteDataError": "errors",
    "SiteDataWarning": "errors",
    "SiteSummary": "harmonize",
    "batch_clip_values": "harmonize",
    "build_schema": "harmonize",
    "gene_universe": "harmonize",
    "harmonize": "harmonize",
    "hvg_table": "harmonize",
    "shared_batches": "harmonize",
    "site_batches": "harmonize",
    "site_genes": "harmonize",
    "site_summary": "harmonize",
    "DATASETS": "loaders",
    "SCIB_PANCREAS_SHA256": "loaders",
    "SCIB_PANCREAS_URL": "loaders",
    "DatasetInfo": "loaders",
    "data_dir": "loaders",
    "load_dataset": "loaders",
    "load_scib_pancreas": "loaders",
    "auto_groups": "partition",
    "dirichlet_split": "partition",
    "paper_partition": "partition",
    "random_split": "partition",
    "sites_per_group": "partition",
    "split_by_groups": "partition",
    "split_within_group": "partition",
    "FederationSchema": "schema",
    "SiteData": "schema",
    "align_genes": "schema",
    "project": "schema",
    "simulate": "simulate",
    "drop_empty_cells": "validate",
    "get_counts": "validate",
    "validate_site": "validate",
}


class _Package(types.ModuleType):
    """This package's module type. ``harmonize`` and ``simulate`` name both a submodule and
    the function in it: when a submodule is imported (``import scfedvi.data.harmonize``), the
    import system binds it as an attribute of the package; keep the function under that name,
    as the eager imports did."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'scfedvi.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"scfedvi.data.{module}"), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DATASETS",
    "SCIB_PANCREAS_SHA256",
    "SCIB_PANCREAS_URL",
    "DatasetChecksumError",
    "DatasetInfo",
    "DatasetUnavailableError",
    "FederationSchema",
    "SchemaMismatchError",
    "SiteData",
    "SiteDataError",
    "SiteDataWarning",
    "SiteSummary",
    "align_genes",
    "auto_groups",
    "batch_clip_values",
    "build_schema",
    "data_dir",
    "dirichlet_split",
    "drop_empty_cells",
    "gene_universe",
    "get_counts",
    "harmonize",
    "hvg_table",
    "load_dataset",
    "load_scib_pancreas",
    "paper_partition",
    "project",
    "random_split",
    "shared_batches",
    "simulate",
    "site_batches",
    "site_genes",
    "site_summary",
    "sites_per_group",
    "split_by_groups",
    "split_within_group",
    "validate_site",
]
