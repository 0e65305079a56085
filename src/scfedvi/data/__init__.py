"""Data layer: validation, the federation schema, harmonization, partitions, simulation
and loaders. Imports only numpy, scipy and pandas (anndata when data is read or built)."""

from __future__ import annotations

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
