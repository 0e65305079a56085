"""A site that joins later: scArches-style query fine-tuning at that site alone.

As scvi-tools' ``SCANVI.load_query_data`` with its defaults (``freeze_expression``,
``freeze_classifier``, ``freeze_batchnorm_encoder``): the new site's batches are appended to the
model's batch categories; only the weight columns of those new batches (and their dispersion,
with ``dispersion="gene-batch"``) are trained, on the site's cells with the scANVI loss
(unlabelled), with the encoder's statistics frozen at the site's own (balanced) statistics.
Every other weight, and the classifier, stays as the federation trained it.

With the default architecture the encoder does not read the batch (``encode_covariates=False``,
as scvi-tools' default): the new batch's columns are then in the decoder only, and fine-tuning
cannot change the embedding or the predictions. It changes them when the federation trained
with ``ModelConfig(encode_covariates=True)``, as scArches' reference models are set up.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import anndata as ad
import numpy as np
import torch

from scfedvi.annotate.model import ScFedANVI, scanvi_batch_owned
from scfedvi.annotate.site import LabelledSiteTensors
from scfedvi.data.schema import project
from scfedvi.train.local import calibrate_norm_stats, kl_weight
from scfedvi.train.params import get_state, set_state, shared_keys

log = logging.getLogger(__name__)


def extend_batches(model: ScFedANVI, new: tuple[str, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """The model's parameters with columns for ``new`` batches appended to every batch-owned
    parameter (the new columns freshly initialised, as scvi-tools does)."""
    assert model.params is not None
    n_old = model.schema.n_batches
    torch.manual_seed(seed)
    module = model.new_module(n_old + len(new))
    fresh = get_state(module)
    out = {}
    owned = scanvi_batch_owned(module)
    for k, v in model.params.items():
        if k in owned:
            axis, first = owned[k]
            target = np.moveaxis(fresh[k].copy(), axis, 0)
            target[: first + n_old] = np.moveaxis(v, axis, 0)
            out[k] = np.moveaxis(target, 0, axis)
        else:
            out[k] = v
    return out


def load_query_data(
    model: ScFedANVI,
    adata: ad.AnnData,
    *,
    site: str,
    n_epochs: int = 20,
    lr: float | None = None,
    seed: int = 0,
) -> ScFedANVI:
    """Fine-tune the new site's batch parameters on its cells alone; the site's own model.

    Parameters
    ----------
    model
        The trained (or loaded) federated scANVI model; it is not changed.
    adata
        The new site's cells (raw counts, ``obs[batch_key]``); labels are not used.
    site
        Its name (messages).
    n_epochs
        Epochs over the site's cells (KL warm-up as scvi-tools: restarts at 0).
    lr
        Adam's learning rate (default: the run's), without weight decay, which would move the
        frozen columns (scArches' recommendation; scvi-tools' tutorial sets it too).
    seed
        Seed of the new columns' initialisation, minibatch order and sampling.

    Returns
    -------
    A :class:`ScFedANVI` whose batches include the site's; its :meth:`~ScFedANVI.predict`
    embeds and labels the site's cells.
    """
    if model.params is None:
        raise RuntimeError("the model is not trained: train or load it first")
    schema = model.schema
    key = schema.batch_key
    if key not in adata.obs.columns:
        raise ValueError(
            f"site {site!r}: obs[{key!r}] (the batch column) is missing; add it: query "
            "fine-tuning learns parameters of the site's batch"
        )
    seen = sorted(set(adata.obs[key].astype(str).unique()))
    new = tuple(b for b in seen if b not in schema.batches)
    if not new:
        log.warning("site %r: every batch is known to the model; fine-tuning its columns", site)
    q_schema = replace(schema, batches=schema.batches + new)
    plain = replace(q_schema, labels=None, label_key=None)
    sd = project(adata, plain, site=site, layer=model.layer, batch_size=2)
    params = extend_batches(model, new, seed)
    query = ScFedANVI(q_schema, model.config, model.annotate, layer=model.layer)
    query.set_balance_steps(model.balance_steps)
    query.label_centroids = model.label_centroids
    query.latent_moments = model.latent_moments
    module = query.new_module()
    set_state(module, params)
    data = LabelledSiteTensors(sd.X, sd.batch_index)
    if model.config.local_batchnorm:  # the encoder's statistics: the site's own, then frozen
        from scfedvi.federation.balance import balanced_statistics

        calibrate_norm_stats(module, data)
        if query.balance_steps:
            balanced_statistics(module, data, query.balance_steps)
    trained = [q_schema.batches.index(b) for b in (new or tuple(seen))]
    _train_columns(module, data, trained, n_epochs, lr or model.config.train.lr, seed, model)
    state = get_state(module)
    query.params = {k: state[k] for k in shared_keys(module, model.config.federation.norm_stats)}
    query.history = model.history
    return query


def _train_columns(module, data, batches, n_epochs, lr, seed, model) -> None:
    owned = scanvi_batch_owned(module)
    named = dict(module.named_parameters())
    for k, p in named.items():
        p.requires_grad_(k in owned)
    masks = {}
    for k, (axis, first) in owned.items():
        mask = torch.zeros_like(named[k])
        idx = torch.tensor([first + b for b in batches])
        mask.index_fill_(axis, idx, 1.0)
        masks[k] = mask
        named[k].register_hook(lambda g, m=mask: g * m)
    opt = torch.optim.Adam([named[k] for k in owned], lr=lr, eps=model.config.train.eps)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    module.train()
    frozen = [module.z_encoder, module.classifier, module.encoder_z2_z1]
    for m in frozen:  # freeze_batchnorm_encoder / freeze_classifier: statistics fixed
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm1d):
                bn.eval()
    bs = model.config.train.batch_size
    warm = model.config.train.n_epochs_kl_warmup
    before = {k: named[k].detach().clone() for k in owned}
    for epoch in range(n_epochs):
        for idx in data.minibatch_indices(bs, rng):
            x, b, nonzero = data.training_minibatch(idx)
            out = module.loss(x, b, kl_weight=kl_weight(epoch, warm), nonzero=nonzero)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    for k in owned:  # only the trained columns moved
        assert torch.equal(
            (named[k].detach() - before[k]) * (1 - masks[k]), torch.zeros_like(before[k])
        )
    for p in named.values():
        p.requires_grad_(True)
    module.eval()
