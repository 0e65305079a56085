"""No gene shared between sites: the error lists each site's first identifiers, their kind
(symbols or Ensembl IDs) and the likely fix."""

from __future__ import annotations

import pytest

from scfedvi.data import harmonize
from scfedvi.data.gene_ids import identifier_kind
from scfedvi.data.harmonize import gene_universe

from .conftest import tiny

SYMBOLS = ["ACTB", "GAPDH", "CD3E", "MS4A1", "LYZ", "NKG7"]
ENSEMBL = ["ENSG00000075624", "ENSG00000111640", "ENSG00000198851", "ENSG00000156738"]


def test_identifier_kind():
    assert identifier_kind(SYMBOLS) == "gene symbols"
    assert identifier_kind(ENSEMBL) == "Ensembl IDs"
    assert identifier_kind([g + ".7" for g in ENSEMBL]) == "Ensembl IDs with versions"
    assert identifier_kind(["ENSMUSG00000029580", "ENSMUSG00000057666"]) == "Ensembl IDs"
    assert identifier_kind([]) == "no genes"


def test_symbols_against_ensembl_ids_names_each_site_and_the_fix():
    with pytest.raises(ValueError) as e:
        gene_universe([SYMBOLS, ENSEMBL], sites=["lab-a", "lab-b"])
    msg = str(e.value)
    assert "site 'lab-a': gene symbols (6 genes: 'ACTB', 'GAPDH', 'CD3E', 'MS4A1', ...)" in msg
    assert "site 'lab-b': Ensembl IDs (4 genes: 'ENSG00000075624'" in msg
    assert "symbol and others by Ensembl ID" in msg and "var['gene_ids']" in msg


def test_version_suffixes_and_capitalization_get_their_own_fix():
    with pytest.raises(ValueError, match="strip the versions"):
        gene_universe([[g + ".3" for g in ENSEMBL], ENSEMBL], sites=["a", "b"])
    with pytest.raises(ValueError, match="capitalization"):
        gene_universe([["Actb", "Gapdh"], ["ACTB", "GAPDH"]])  # no names: numbered sites
    with pytest.raises(ValueError, match=r"site 1: gene symbols .*\n  site 2"):
        gene_universe([["Actb", "Gapdh"], ["ACTB", "GAPDH"]])


def test_harmonize_passes_the_site_names():
    a, b = tiny(seed=0), tiny(seed=1)
    a.var_names = [f"GENE{i}" for i in range(a.n_vars)]
    b.var_names = [f"ENSG{i:011d}" for i in range(b.n_vars)]
    with pytest.raises(ValueError, match=r"site 'lab-a': gene symbols[\s\S]*site 'lab-b': Ensembl"):
        harmonize({"lab-a": a, "lab-b": b}, batch_key="batch")


def test_shared_genes_still_pass():
    assert gene_universe([SYMBOLS, SYMBOLS[:3]], sites=["a", "b"]) == ("ACTB", "GAPDH", "CD3E")
