"""Export a trained global model to an ``scvi.model.SCVI`` set up on one site's cells.

The module's parameter names equal scvi-tools' (``scfedvi.module.layers``), so export is a
``load_state_dict``: the site's AnnData is projected onto the federation schema (genes in the
schema's order, raw counts), registered with ``SCVI.setup_anndata`` with the schema's batch
categories in the schema's order (so the one-hot columns line up), and the global parameters are
loaded into ``SCVI.module``. With site-local normalization statistics (the default), the
site's own BatchNorm statistics are computed first on its cells, as
:meth:`scfedvi.model.ScFedVI.get_latent_representation` does; they stay in the exported model,
at the site.

scvi-tools is imported only here (the ``benchmark`` extra); the core never needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scfedvi.config import ModelConfig

if TYPE_CHECKING:
    from scfedvi.data.schema import FederationSchema, SiteData
    from scfedvi.model import ScFedVI

#: Keys of scvi-tools' module that scFedVI does not have: the library-size encoder, unused
#: with the observed library size.
SCVI_ONLY_PREFIXES = ("l_encoder.",)
_NORMS = ("batch", "layer", "none")


def _norm_flags(encoder: str, decoder: str) -> dict[str, str]:
    """scvi-tools' ``use_batch_norm``/``use_layer_norm`` for (encoder, decoder) norms."""

    def where(kind: str) -> str:
        on = (encoder == kind, decoder == kind)
        return {(True, True): "both", (True, False): "encoder", (False, True): "decoder"}.get(
            on, "none"
        )

    return {"use_batch_norm": where("batch"), "use_layer_norm": where("layer")}


def _import_scvi() -> Any:
    try:
        import scvi
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "exporting to scvi-tools needs scvi-tools, which the core of scfedvi does not "
            "install; install the extra: pip install 'scfedvi[benchmark]'"
        ) from err
    return scvi


def scvi_module_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of ``scvi.module.VAE`` (and ``scvi.model.SCVI``) for a model config.

    Parameters
    ----------
    config
        The architecture of the scFedVI model.

    Raises
    ------
    ValueError
        For a configuration scvi-tools cannot represent.
    """
    for name, norm in zip(("norm", "decoder_norm"), config.norms, strict=True):
        if norm not in _NORMS:
            raise ValueError(
                f"ModelConfig.{name}={norm!r} has no scvi-tools equivalent; "
                f"export supports {list(_NORMS)}"
            )
    return {
        "n_hidden": config.n_hidden,
        "n_latent": config.n_latent,
        "n_layers": config.n_layers,
        "dropout_rate": config.dropout_rate,
        "dispersion": config.dispersion,
        "gene_likelihood": config.likelihood,
        "encode_covariates": config.encode_covariates,
        "deeply_inject_covariates": True,
        "use_observed_lib_size": True,
        "latent_distribution": "normal",
        **_norm_flags(*config.norms),
    }


def site_state(model: ScFedVI, site_data: SiteData) -> dict[str, torch.Tensor]:
    """The full state (parameters and normalization statistics) the site embeds with.

    Parameters
    ----------
    model
        A trained scFedVI model.
    site_data
        The site's :class:`~scfedvi.data.schema.SiteData` (projected onto the schema).
    """
    from scfedvi.train.local import SiteTensors, build_module, calibrate_norm_stats
    from scfedvi.train.params import set_state

    cfg = model.config
    module = build_module(model.schema.n_genes, model.schema.n_batches, cfg.model)
    set_state(module, model.params)  # type: ignore[arg-type]
    if cfg.local_batchnorm:
        data = SiteTensors(site_data.X, site_data.batch_index)
        calibrate_norm_stats(module, data)
        steps = model.balance_steps()
        if steps:  # the federation's composition-balanced statistics, as the model embeds
            from scfedvi.federation.balance import balanced_statistics

            balanced_statistics(module, data, steps)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def site_anndata(model: ScFedVI, adata: ad.AnnData, *, site: str = "export") -> ad.AnnData:
    """The site's cells over the schema's genes, with the batch as the schema's categories.

    ``X`` holds the raw counts (float32 CSR) of the schema genes in the schema's order (genes
    the site lacks are zero-filled), ``obs`` the site's ``obs`` of the kept cells (cells without
    counts over the schema genes are dropped, with a warning), and ``obs[schema.batch_key]`` a
    categorical whose categories are all of ``schema.batches`` in order, also those the site
    does not hold.
    """
    return _as_anndata(adata, _project(model, adata, site), model.schema)


def to_scvi(model: ScFedVI, adata: ad.AnnData, *, site: str = "export") -> Any:
    """Export the trained global model to an ``scvi.model.SCVI`` set up on one site's cells.

    Parameters
    ----------
    model
        A trained scFedVI model.
    adata
        The site's AnnData with raw counts (in ``model.layer``, else ``X``) and
        ``obs[schema.batch_key]``; it is not modified.
    site
        The site's name, used in messages.

    Returns
    -------
    An ``scvi.model.SCVI`` on a new AnnData (the site's cells over the schema genes, see
    :func:`site_anndata`), marked trained: its ``get_latent_representation()`` equals
    ``model.get_latent_representation(adata)``, and it saves and loads with scvi-tools.

    Raises
    ------
    ImportError
        scvi-tools is not installed (``pip install 'scfedvi[benchmark]'``).
    ValueError
        The configuration or the parameters have no scvi-tools equivalent.
    """
    scvi = _import_scvi()
    model.require_trained()
    kwargs = scvi_module_kwargs(model.config.model)
    schema = model.schema
    sd = _project(model, adata, site)
    out = _as_anndata(adata, sd, schema)
    scvi.model.SCVI.setup_anndata(out, batch_key=schema.batch_key)
    scvi_model = scvi.model.SCVI(out, **kwargs)
    mapping = scvi_model.adata_manager.get_state_registry(scvi.REGISTRY_KEYS.BATCH_KEY)
    registered = [str(c) for c in mapping.categorical_mapping]
    if registered != list(schema.batches):  # pragma: no cover - guards scvi-tools changes
        raise ValueError(
            f"site {site!r}: scvi-tools registered the batches {registered}, not the schema's "
            f"{list(schema.batches)}; the one-hot columns would not line up"
        )
    load_into(scvi_model.module, site_state(model, sd))
    scvi_model.module.eval()
    scvi_model.is_trained_ = True
    return scvi_model


def _project(model: ScFedVI, adata: ad.AnnData, site: str) -> SiteData:
    from scfedvi.data.schema import project

    return project(adata, model.schema, site=site, layer=model.layer, batch_size=2)


def _as_anndata(adata: ad.AnnData, sd: SiteData, schema: FederationSchema) -> ad.AnnData:
    if sd.n_cells == adata.n_obs:
        obs = adata.obs.copy()
    else:  # cells without counts over the schema genes were dropped
        obs = adata.obs.iloc[adata.obs_names.get_indexer(sd.obs_names)].copy()
    obs.index = pd.Index(np.asarray(sd.obs_names).astype(str))
    obs[schema.batch_key] = pd.Categorical.from_codes(sd.batch_index, categories=schema.batches)
    return ad.AnnData(X=sd.X, obs=obs, var=pd.DataFrame(index=pd.Index(list(schema.genes))))


def load_into(scvi_module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a scFedVI state into an ``scvi.module.VAE``; only ``l_encoder.*`` may stay unset.

    Raises
    ------
    ValueError
        When names or shapes differ beyond the library encoder (a configuration scvi-tools
        cannot represent).
    """
    target = scvi_module.state_dict()
    unexpected = sorted(set(state) - set(target))
    missing = sorted(k for k in set(target) - set(state) if not k.startswith(SCVI_ONLY_PREFIXES))
    wrong = sorted(
        k for k in set(state) & set(target) if tuple(state[k].shape) != tuple(target[k].shape)
    )
    if unexpected or missing or wrong:
        raise ValueError(
            "this scFedVI model has no scvi-tools equivalent: "
            f"parameters scvi-tools lacks {unexpected[:5]}, parameters scvi-tools needs "
            f"{missing[:5]}, shapes that differ {wrong[:5]}"
        )
    scvi_module.load_state_dict(state, strict=False)
