"""A splatter-style simulator of batched scRNA-seq counts, generated in chunks of cells.

Model, per gene ``g``, cell ``c`` of batch ``b`` and cell type ``t`` (as in splatter,
Zappia et al. 2017, simplified):

- base mean ``m_g ~ Gamma(mean_shape, rate=mean_rate)``;
- cell-type DE: with probability ``de_prob`` per (type, gene) a factor
  ``LogNormal(de_loc, de_fac)``, inverted (down-regulation) with probability
  ``de_down_prob``; else 1;
- batch effect: a factor ``LogNormal(0, batch_effect)`` per (batch, gene);
- library size ``L_c ~ LogNormal(log median_b, library_sdlog)``, ``median_b`` from
  ``library_sizes`` (cycled over batches);
- mean ``mu_cg = L_c * p_btg`` with ``p_bt`` the normalized product of the above;
- counts: gamma-Poisson (negative binomial, ``var = mu + dispersion * mu**2``), then
  zero inflation: dropped with probability ``1 / (1 + exp(-dropout_shape * (log mu - dropout_mid)))``.

Cell types per batch follow ``Dirichlet(1 / composition)`` proportions (``composition=0``:
every batch has the same, equal mix).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse


def _profiles(
    rng: np.random.Generator,
    n_genes: int,
    n_batches: int,
    n_types: int,
    p: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return base means, DE factors (genes x types), batch factors (genes x batches) and the
    normalized expression profiles (batches x types x genes)."""
    base = rng.gamma(p["mean_shape"], 1.0 / p["mean_rate"], size=n_genes)
    is_de = rng.random((n_genes, n_types)) < p["de_prob"]
    fac = rng.lognormal(p["de_loc"], p["de_fac"], size=(n_genes, n_types))
    down = rng.random((n_genes, n_types)) < p["de_down_prob"]
    de = np.where(is_de, np.where(down, 1.0 / fac, fac), 1.0)
    bfac = rng.lognormal(0.0, p["batch_effect"], size=(n_genes, n_batches))
    prof = base[None, None, :] * de.T[None, :, :] * bfac.T[:, None, :]
    prof /= prof.sum(axis=2, keepdims=True)
    return base, de, bfac, prof


def _chunk_counts(
    rng: np.random.Generator,
    mu: np.ndarray,
    dispersion: float,
    dropout_mid: float | None,
    dropout_shape: float,
) -> np.ndarray:
    shape = 1.0 / dispersion
    lam = rng.standard_gamma(shape, size=mu.shape, dtype=np.float32) * (mu * dispersion)
    counts = rng.poisson(lam)
    if dropout_mid is not None:
        with np.errstate(divide="ignore"):
            logit = -dropout_shape * (np.log(mu) - dropout_mid)
        counts[rng.random(mu.shape) < 1.0 / (1.0 + np.exp(logit))] = 0
    return counts


def _stack_rows(
    chunks: Iterable[sparse.csr_matrix], n_rows: int, n_genes: int
) -> sparse.csr_matrix:
    """Stack CSR chunks row-wise as they come, each freed once copied.

    The values and column indices go into buffers sized for a dense matrix, of which only
    the pages written are ever backed by memory (the operating system maps pages on first
    write), so the peak is the output plus the chunks in flight: not twice the output, as
    when every chunk is held until the total is known.
    """
    idx_dtype = np.int32 if n_rows * n_genes < np.iinfo(np.int32).max else np.int64
    data = np.empty(n_rows * n_genes, dtype=np.int32)
    indices = np.empty(n_rows * n_genes, dtype=idx_dtype)
    indptr = np.zeros(n_rows + 1, dtype=idx_dtype)
    pos = row = 0
    for m in chunks:
        data[pos : pos + m.nnz] = m.data
        indices[pos : pos + m.nnz] = m.indices
        indptr[row + 1 : row + 1 + m.shape[0]] = m.indptr[1:] + pos
        pos, row = pos + m.nnz, row + m.shape[0]
        del m
    if idx_dtype == np.int64 and pos < np.iinfo(np.int32).max:  # as before: int32 when it fits
        indices, indptr = indices[:pos].astype(np.int32), indptr.astype(np.int32)
    return sparse.csr_matrix((data[:pos], indices[:pos], indptr), shape=(row, n_genes), copy=False)


def _row_sums(X: sparse.csr_matrix, block: int = 8192) -> np.ndarray:
    """Each row's total as int64, a block of rows at a time (``X.sum(axis=1, dtype=int64)``
    makes an int64 copy of every value: twice the int32 matrix)."""
    out = np.empty(X.shape[0], dtype=np.int64)
    for r0 in range(0, X.shape[0], block):
        r1 = min(r0 + block, X.shape[0])
        out[r0:r1] = np.asarray(X[r0:r1].sum(axis=1, dtype=np.int64)).ravel()
    return out


def _in_order(
    pool: ThreadPoolExecutor, fn: Callable[[int], Any], n: int, ahead: int
) -> Iterator[Any]:
    """``fn(0), fn(1), ...`` computed by ``pool`` at most ``ahead`` at a time, in order."""
    pending: deque[Future[Any]] = deque()
    for i in range(n):
        pending.append(pool.submit(fn, i))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def simulate(
    n_cells: int = 3000,
    n_genes: int = 2000,
    n_batches: int = 3,
    n_cell_types: int = 5,
    *,
    batch_effect: float = 0.3,
    library_sizes: Sequence[float] = (3000.0, 30000.0, 300000.0),
    library_sdlog: float = 0.3,
    composition: float = 0.0,
    de_prob: float = 0.1,
    de_fac: float = 0.5,
    de_loc: float = 0.1,
    de_down_prob: float = 0.5,
    mean_shape: float = 0.6,
    mean_rate: float = 0.3,
    dispersion: float = 0.2,
    dropout_mid: float | None = None,
    dropout_shape: float = -1.0,
    seed: int = 0,
    chunk_size: int = 4096,
    n_jobs: int | None = None,
) -> Any:
    """Simulate batched counts with cell types (see the module docstring for the model).

    Parameters
    ----------
    n_cells, n_genes, n_batches, n_cell_types
        Sizes. Cells are split into near-equal, contiguous batches.
    batch_effect
        sdlog of the gene-wise batch factors (0: no batch effect but library size).
    library_sizes
        Median library size of each batch, cycled over batches. The default spans two
        orders of magnitude, like inDrop vs Smart-seq2.
    library_sdlog
        sdlog of the library sizes within a batch.
    composition
        Difference of cell-type mixes between batches: 0 gives every batch the same, equal
        mix; otherwise each batch draws its mix from ``Dirichlet(1 / composition)``.
    de_prob, de_fac, de_loc, de_down_prob
        Cell-type differential expression (splatter's parameters).
    mean_shape, mean_rate
        Gamma distribution of the gene base means.
    dispersion
        Negative binomial dispersion (``var = mu + dispersion * mu**2``), > 0.
    dropout_mid, dropout_shape
        Logistic zero inflation on ``log mu`` (splatter's ``dropout.mid``/``dropout.shape``);
        ``None`` disables it.
    seed
        Seed; the output is a function of ``seed`` and ``chunk_size``.
    chunk_size
        Cells generated at a time. Peak memory is the sparse output plus the chunks in
        flight (two per job, each copied into the output as it comes, then freed) plus
        ``8 * 8 * chunk_size * n_genes`` bytes per job.
    n_jobs
        Chunks generated in parallel threads (numpy releases the GIL); ``None``: up to 4,
        bounded by the CPU count. The output does not depend on it.

    Returns
    -------
    AnnData with int32 CSR ``X``; ``obs``: ``batch`` (``batch-0`` ...) and ``cell_type``
    (``type-0`` ...) categorical, ``library_size`` (observed total counts); ``var``:
    ``base_mean``; ``varm``: ``de_factor`` (genes x types), ``batch_factor`` (genes x
    batches); ``uns['simulation']``: the parameters.
    """
    import anndata as ad

    if dispersion <= 0:
        raise ValueError("simulate: dispersion must be > 0")
    params = {k: v for k, v in locals().items() if k not in ("ad", "n_jobs")}
    params["library_sizes"] = [float(x) for x in library_sizes]
    rng = np.random.default_rng([seed, 0])
    base, de, bfac, prof = _profiles(rng, n_genes, n_batches, n_cell_types, params)
    batch = np.repeat(
        np.arange(n_batches), [len(a) for a in np.array_split(np.arange(n_cells), n_batches)]
    )
    mixes = np.full((n_batches, n_cell_types), 1.0 / n_cell_types)
    if composition > 0:
        mixes = rng.dirichlet(np.full(n_cell_types, 1.0 / composition), size=n_batches)
    ctype = np.empty(n_cells, dtype=np.int64)
    for b in range(n_batches):
        idx = np.flatnonzero(batch == b)
        ctype[idx] = rng.choice(n_cell_types, size=len(idx), p=mixes[b])
    medians = np.resize(np.asarray(library_sizes, dtype=np.float64), n_batches)
    lib = rng.lognormal(np.log(medians[batch]), library_sdlog)

    def one_chunk(i: int) -> sparse.csr_matrix:
        sl = slice(i * chunk_size, min((i + 1) * chunk_size, n_cells))
        mu = lib[sl, None] * prof[batch[sl], ctype[sl]]
        chunk_rng = np.random.default_rng([seed, 1, i])
        counts = _chunk_counts(chunk_rng, mu, dispersion, dropout_mid, dropout_shape)
        return sparse.csr_matrix(counts.astype(np.int32))

    n_chunks = -(-n_cells // chunk_size)
    jobs = n_jobs if n_jobs is not None else min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        X = _stack_rows(_in_order(pool, one_chunk, n_chunks, 2 * max(1, jobs)), n_cells, n_genes)
    width = len(str(max(n_genes, n_cells) - 1))
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(batch, [f"batch-{b}" for b in range(n_batches)]),
            "cell_type": pd.Categorical.from_codes(
                ctype, [f"type-{t}" for t in range(n_cell_types)]
            ),
            "library_size": _row_sums(X),
        },
        index=[f"cell-{c:0{width}d}" for c in range(n_cells)],
    )
    var = pd.DataFrame({"base_mean": base}, index=[f"gene-{g:0{width}d}" for g in range(n_genes)])
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.varm["de_factor"] = de
    adata.varm["batch_factor"] = bfac
    adata.uns["simulation"] = params
    return adata
