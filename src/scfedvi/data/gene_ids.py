"""What kind of gene identifiers a site uses, for the error when sites share no gene.

Sites that name genes differently (gene symbols at one, Ensembl IDs at another; Ensembl IDs with
and without version suffixes; human and mouse capitalization) share no gene, and federated
training cannot start. :func:`no_shared_genes_message` says which site uses which kind, with each
site's first identifiers, and the likely fix. It sees only gene names, which every site sends
in the setup round anyway.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_ENSEMBL_VERSIONED = re.compile(r"^ENS[A-Z]*G\d{6,}\.\d+$")


def identifier_kind(genes: Sequence[str]) -> str:
    """``"Ensembl IDs with versions"``, ``"Ensembl IDs"``, ``"gene symbols"`` or ``"no genes"``.

    The kind held by most of the first 200 identifiers.
    """
    head = [str(g) for g in list(genes)[:200]]
    if not head:
        return "no genes"
    ens = [g for g in head if _ENSEMBL.match(g)]
    if 2 * len(ens) < len(head):
        return "gene symbols"
    versioned = sum(bool(_ENSEMBL_VERSIONED.match(g)) for g in ens)
    return "Ensembl IDs with versions" if 2 * versioned >= len(ens) else "Ensembl IDs"


def _fix(kinds: list[str], gene_lists: Sequence[Sequence[str]]) -> str:
    distinct = set(kinds) - {"no genes"}
    if "no genes" in kinds:
        return "a site with no genes has an empty var_names: check that its file holds its data"
    if distinct == {"gene symbols"}:
        upper = [{str(g).upper() for g in genes} for genes in gene_lists]
        if set.intersection(*upper):
            return (
                "the sites' symbols differ only in capitalization (e.g. mouse 'Actb' vs human "
                "'ACTB'): the sites measure different organisms, or one site changed the case; "
                "map them to one organism's symbols (orthologs) before training"
            )
        return (
            "the sites use gene symbols that have nothing in common: check that they measure "
            "the same organism and that var_names holds gene names, not numbers or barcodes"
        )
    if distinct <= {"Ensembl IDs", "Ensembl IDs with versions"}:
        return (
            "Ensembl IDs with and without version suffixes ('ENSG00000141510.17' vs "
            "'ENSG00000141510') never match: strip the versions at every site "
            "(adata.var_names = adata.var_names.str.replace(r'\\.\\d+$', '', regex=True))"
            if len(distinct) > 1
            else "the sites' Ensembl IDs have nothing in common: check that they measure the "
            "same organism"
        )
    return (
        "some sites name genes by symbol and others by Ensembl ID: use one kind at every site, "
        "e.g. set var_names from the column that holds Ensembl IDs "
        "(adata.var_names = adata.var['gene_ids']) or map the IDs to symbols"
    )


def no_shared_genes_message(
    gene_lists: Sequence[Sequence[str]], sites: Sequence[str] | None, need: int
) -> str:
    """The error when no gene is measured at ``need`` of the sites: each site's first genes and
    the kind of identifier, then the likely fix."""
    names = (
        [repr(s) for s in sites]
        if sites is not None
        else [str(i + 1) for i in range(len(gene_lists))]
    )
    kinds = [identifier_kind(g) for g in gene_lists]
    lines = []
    for name, genes, kind in zip(names, gene_lists, kinds, strict=True):
        first = ", ".join(repr(str(g)) for g in list(genes)[:4])
        more = ", ..." if len(genes) > 4 else ""
        lines.append(f"  site {name}: {kind} ({len(genes)} genes: {first}{more})")
    return (
        f"no gene is measured at {need} of {len(gene_lists)} sites, so the sites share no gene "
        "to train on:\n" + "\n".join(lines) + f"\nLikely fix: {_fix(kinds, gene_lists)}"
    )
