"""Errors and warnings about a site's data.

Every message names the site, the field and the fix, for example
``"site 'lab-b': obs['tech'] is missing; pass batch_key=... or add the column"``.
"""

from __future__ import annotations


class SiteDataError(ValueError):
    """A site's data cannot be used as it is; the message says which field and how to fix it."""


class SchemaMismatchError(SiteDataError):
    """A site's data does not fit the federation schema (genes, batches or labels)."""


class SiteDataWarning(UserWarning):
    """A site's data is usable but something will be changed or ignored (e.g. empty cells)."""


class DatasetUnavailableError(FileNotFoundError):
    """A dataset file is neither on disk nor downloadable; the message says where to put it."""


class DatasetChecksumError(ValueError):
    """A dataset file does not have the expected sha256 checksum."""


def site_prefix(site: str | None) -> str:
    """Return the ``"site 'name': "`` prefix used by every message (empty without a site)."""
    return f"site {site!r}: " if site is not None else ""
