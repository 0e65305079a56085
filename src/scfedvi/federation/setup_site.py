"""A site's answer to a setup query, within its own policy and query budget.

:func:`answer_setup` is the only way a site's cells reach a setup reply, in process
(:func:`scfedvi.data.harmonize.harmonize`) and over Flower (the ``genes`` and ``summary``
handlers of :mod:`scfedvi.flower.client_app`). For :data:`~.setup_protocol.GENES` it sends its
gene names and cells per batch; for :data:`~.setup_protocol.SUMMARY` its per-batch summaries
(:func:`~scfedvi.data.summary.site_summary`, which checks the query against the site's
:class:`~scfedvi.config.SitePolicy`: label key allow-list, batches too small to summarise,
pooled moments that must contain the site's share, the number of passes per run), then checks
the reply against the summary whitelist (:func:`scfedvi.federation.payload.check_summary`)
before it leaves. Numpy and anndata only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scfedvi.data.summary import SiteSummary, site_batches, site_genes, site_summary
from scfedvi.federation.payload import check_summary
from scfedvi.federation.setup_protocol import GENES, SetupQuery, SiteInventory

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from scfedvi.config import SitePolicy
    from scfedvi.privacy.policy import QueryLedger


def answer_setup(
    query: SetupQuery,
    adata: AnnData,
    *,
    site: str,
    batch_key: str,
    layer: str | None = None,
    label_key: str | None = None,
    policy: SitePolicy | None = None,
    ledger: QueryLedger | None = None,
) -> SiteInventory | SiteSummary:
    """The site's reply to one setup query.

    Parameters
    ----------
    query
        The coordinator's :class:`~scfedvi.federation.setup_protocol.SetupQuery`.
    adata
        The site's data (raw counts in ``layer``, or ``X``).
    site, batch_key, layer, label_key
        The site's name and the run's keys (``label_key`` must be allowed by ``policy``).
    policy
        The site's own policy (``None``: the default with ``label_key`` allowed).
    ledger
        The site's query budget for this run (``None``: not counted).
    """
    if query.step == GENES:
        genes = site_genes(adata, site=site)
        return SiteInventory(site, genes, site_batches(adata, site=site, batch_key=batch_key))
    s = site_summary(
        adata,
        site=site,
        batch_key=batch_key,
        genes=query.genes,
        layer=layer,
        label_key=label_key,
        clip_values=query.clip_values,
        pooled_batches=query.pooled_batches,
        policy=policy,
        pooled=query.pooled,
        ledger=ledger,
    )
    check_summary(s.to_dict(), adata.n_obs, site=site)  # the whitelist, before it leaves
    return s
