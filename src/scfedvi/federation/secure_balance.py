"""Composition balancing from securely aggregated sums only (balancing under secure aggregation).

Today's protocol (:mod:`scfedvi.federation.balance`) starts each pass from every site's own
local centroids, which the coordinator sees one site at a time. Here every quantity the
coordinator learns is a sum over all sites, masked by the secure-aggregation protocol
(:func:`scfedvi.privacy.secagg_protocol.secure_sum`), so it sees only the federation's totals.
Each pass is ``2 + rounds`` secure sums:

1. **moments** (:data:`MOMENTS`): each site's cell count and the per-dimension sums of its
   (clipped) latent values and of their squares: the federation's latent mean ``mu`` and
   per-dimension standard deviation ``sd``;
2. **codebook** (:data:`CODEBOOK`): the coordinator draws ``CODEBOOK_PER_CLUSTER * k`` points
   ``mu + sd * g`` with ``g`` standard normal from ``numpy.random.default_rng(seed + pass)``
   (k-means++ needs points, which no one may see here: the codebook is the stand-in); each
   site sends per-point sums and counts of its cells (each cell to its nearest point); the
   coordinator runs the same weighted k-means as today's step 1 (:func:`~scfedvi.federation.balance.weighted_kmeans`,
   ``N_INIT`` k-means++ starts) on the codebook cells' global means, weighted by their
   counts, for the ``k`` start centroids (a codebook cell whose sums no site could send, every
   site holding fewer than ``min_cluster_cells`` of its cells, stands at its codebook point);
3. ``rounds`` **sums** queries (:data:`SUMS`), as today: per-cluster sums and counts, a Lloyd
   update, the last counts the pass's composition.

Every reply is a vector of float sums and exact counts; :func:`encode` quantizes it for the
masked sum: latent values are clipped at the site to ``[-LATENT_BOUND, LATENT_BOUND]``, and a
block of sums of at most ``n_total`` cells with values in ``[-b, b]`` is scaled by
``(2**31 - 1) / (n_total * b)`` (``n_total``: the federation's cells, the public bound of
secure training rounds), so the total never wraps; counts are exact integers. As today, a site
sends the sums of a cluster only when it holds ``min_cluster_cells`` of its cells there (its
count always), and a second count block says which counts stand behind sums.

The site's side, :func:`site_vector`, checks the query against its policy and budget first
(the same :class:`~scfedvi.config.SitePolicy` fields as today's protocol: ``k`` within
``max_balance_clusters``, at most ``min(max_balance_passes, balance_iterations)`` passes, each
one moments query, one codebook query and at most ``min(max_balance_rounds, balance_rounds)``
sums queries, in that order). The coordinator's side, :func:`run_secure_balance`, is written
once over a ``total(phase, steps, centroids)`` function that returns the decoded global sums;
:func:`secure_balance_in_process` implements it with the in-process secure sum. Balancing
sums are not noised: with DP noise this variant is refused (:func:`check_config`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from scfedvi.federation.balance import (
    LOCAL_KMEANS_ITERATIONS,
    MIN_CLUSTER_CELLS,
    N_INIT,
    SUMS,
    BalanceStep,
    assign,
    weighted_kmeans,
)
from scfedvi.federation.balance_site import answered_passes, pass_refusal
from scfedvi.privacy.policy import PolicyRefusal, QueryLedger

if TYPE_CHECKING:  # pragma: no cover
    from scfedvi.config import RunConfig, SitePolicy

log = logging.getLogger(__name__)

MOMENTS, CODEBOOK = "moments", "codebook"
#: A site clips its latent values to ``[-LATENT_BOUND, LATENT_BOUND]`` (the quantization range).
LATENT_BOUND = 10.0
#: The codebook of step 2 holds this many points per cluster (8 against 4 on cortex, pancreas
#: and the trap: docs/privacy.md, "Balancing under secure aggregation").
CODEBOOK_PER_CLUSTER = 8
#: Ledger kinds (per site and run) of the secure variant's queries.
Q_ALL, Q_MOMENTS, Q_CODEBOOK, Q_SUMS = (
    "balance-secure",
    "balance-secure-moments",
    "balance-secure-codebook",
    "balance-secure-sums",
)
_MAX = 2**31 - 1


def check_config(config: RunConfig) -> None:
    """Refuse the secure variant where it does not apply: it needs secure aggregation and
    no DP noise (the balancing sums are not noised: under DP, balancing stays off)."""
    p = config.privacy
    if not p.secure_aggregation:
        raise ValueError(
            "secure balancing: PrivacyConfig.secure_aggregation is off; without it the "
            "default protocol (scfedvi.federation.balance.run_balance) applies"
        )
    if p.noise_multiplier > 0:
        raise ValueError(
            f"secure balancing: PrivacyConfig.noise_multiplier={p.noise_multiplier}: the "
            "balancing sums are not noised, so under DP balancing stays off (set "
            "balance_clusters=0 or noise_multiplier=0)"
        )


# -- quantization ----------------------------------------------------------------------------
def blocks(phase: str, m: int, d: int) -> list[tuple[int, float]]:
    """The reply's blocks: ``(length, value bound per cell)`` (bound 0: exact counts)."""
    if phase == MOMENTS:
        return [(d, LATENT_BOUND), (d, LATENT_BOUND**2), (1, 0.0), (1, 0.0)]
    return [(m * d, LATENT_BOUND), (m, 0.0), (m, 0.0)]


def encode(values: Sequence[np.ndarray], phase: str, m: int, d: int, n_total: int) -> np.ndarray:
    """A reply's float blocks as one uint32 vector (fixed point, two's complement)."""
    out = []
    for v, (n, b) in zip(values, blocks(phase, m, d), strict=True):
        v = np.asarray(v, np.float64).ravel()
        assert len(v) == n
        q = np.rint(v * (_MAX / (n_total * b)) if b else v).astype(np.int64)
        out.append((q % (1 << 32)).astype(np.uint32))
    return np.concatenate(out)


def decode(total: np.ndarray, phase: str, m: int, d: int, n_total: int) -> list[np.ndarray]:
    """The inverse of :func:`encode` on a (secure) sum of encoded vectors."""
    signed = np.asarray(total, np.uint32).view(np.int32).astype(np.float64)
    out, i = [], 0
    for n, b in blocks(phase, m, d):
        out.append(signed[i : i + n] / (_MAX / (n_total * b)) if b else signed[i : i + n])
        i += n
    return out


# -- at a site -------------------------------------------------------------------------------
def site_values(
    z: np.ndarray, phase: str, centroids: np.ndarray | None, min_cells: int = MIN_CLUSTER_CELLS
) -> list[np.ndarray]:
    """A site's float reply blocks (before quantization), latent values clipped first."""
    z = np.clip(np.asarray(z, np.float64), -LATENT_BOUND, LATENT_BOUND)
    if phase == MOMENTS:
        ok = len(z) >= min_cells
        n = float(len(z))
        s, ss = (z.sum(0), (z * z).sum(0)) if ok else (np.zeros(z.shape[1]),) * 2
        return [s, ss, np.array([n]), np.array([n if ok else 0.0])]
    assert centroids is not None
    a = assign(z, centroids)
    counts = np.bincount(a, minlength=len(centroids)).astype(np.float64)
    cols = [np.bincount(a, weights=z[:, j], minlength=len(centroids)) for j in range(z.shape[1])]
    sums = np.stack(cols, axis=1)
    keep = counts >= min_cells
    sums[~keep] = 0.0
    return [sums, counts, np.where(keep, counts, 0.0)]


def _refuse(site: str, what: str, fix: str) -> PolicyRefusal:
    return PolicyRefusal(f"site {site!r} refuses a secure balancing query: {what}; {fix}")


def site_vector(
    site: str,
    z: np.ndarray,
    config: RunConfig,
    *,
    phase: str,
    n_clusters: int,
    n_steps: int,
    centroids: np.ndarray | None,
    n_total: int,
    ledger: QueryLedger,
    policy: SitePolicy | None = None,
) -> np.ndarray:
    """The site's uint32 vector for one secure balancing query, within its policy and budget.

    ``phase``: :data:`MOMENTS`, :data:`CODEBOOK` (``CODEBOOK_PER_CLUSTER * k`` points) or
    :data:`~scfedvi.federation.balance.SUMS` (``k`` centroids); ``n_total``: the public
    bound on the federation's cells. Raises :class:`PolicyRefusal` outside the policy.
    """
    from scfedvi.config import SitePolicy

    policy = policy or SitePolicy()
    fc = config.federation
    z = np.asarray(z, np.float64)
    d = z.shape[1]
    if phase not in (MOMENTS, CODEBOOK, SUMS):
        raise _refuse(site, f"unknown phase {phase!r}", f"ask {MOMENTS}, {CODEBOOK} or {SUMS}")
    if n_clusters != fc.balance_clusters or not 1 <= n_clusters <= policy.max_balance_clusters:
        raise _refuse(
            site,
            f"{n_clusters} clusters asked (the run declares balance_clusters="
            f"{fc.balance_clusters}, SitePolicy.max_balance_clusters="
            f"{policy.max_balance_clusters})",
            "ask for the run's declared number of clusters, within the site's policy",
        )
    if not len(z) <= n_total < 2**31:
        raise _refuse(
            site, f"n_total={n_total} with {len(z)} cells here", "send the federation's cells"
        )
    passes, rounds = answered_passes(fc, policy)
    if not 0 <= n_steps < passes:
        raise _refuse(site, *pass_refusal(n_steps, passes, fc, policy))
    key = f"pass-{n_steps}"
    m = 1 if phase == MOMENTS else n_clusters * (CODEBOOK_PER_CLUSTER if phase == CODEBOOK else 1)
    if phase != MOMENTS:
        c = None if centroids is None else np.asarray(centroids)
        if c is None or c.shape != (m, d) or c.dtype.kind not in "fiu" or not np.isfinite(c).all():
            got = None if c is None else c.shape
            raise _refuse(site, f"{phase} centroids {got}", f"send {m} finite x {d} centroids")
        before = Q_MOMENTS if phase == CODEBOOK else Q_CODEBOOK
        if ledger.used(site, before, key) == 0:
            raise _refuse(site, f"a {phase} query before its pass's {before} query", "ask in order")
    kind, per_pass = {MOMENTS: (Q_MOMENTS, 1), CODEBOOK: (Q_CODEBOOK, 1), SUMS: (Q_SUMS, rounds)}[
        phase
    ]
    budgets = [(Q_ALL, fc.balance_iterations * (2 + fc.balance_rounds), ""), (kind, per_pass, key)]
    budgets.append((kind, passes * per_pass, ""))
    for k, limit, kk in budgets:  # a refused query spends nothing
        if ledger.used(site, k, kk) >= limit:
            ledger.spend(site, k, limit, kk)  # raises, naming the budget
    for k, limit, kk in budgets:
        ledger.spend(site, k, limit, kk)
    values = site_values(z, phase, centroids, policy.min_cluster_cells)
    return encode(values, phase, m, d, n_total)


# -- at the coordinator ----------------------------------------------------------------------
#: ``total(phase, steps, centroids)``: the decoded global sums of the sites' reply blocks.
Total = Callable[[str, list[BalanceStep], np.ndarray | None], list[np.ndarray]]


def codebook(mean: np.ndarray, sd: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Step 2's ``CODEBOOK_PER_CLUSTER * k`` points, from the run's seed and the pass."""
    g = np.random.default_rng(seed).standard_normal((CODEBOOK_PER_CLUSTER * k, len(mean)))
    return mean[None] + sd[None] * g


def _means(sums: np.ndarray, sent: np.ndarray, at: np.ndarray) -> np.ndarray:
    out = at.copy()
    live = sent > 0
    out[live] = sums[live] / sent[live, None]
    return out


def run_secure_balance(
    total: Total, n_clusters: int, iterations: int, rounds: int, seed: int
) -> list[BalanceStep]:
    """The coordinator's side, the same in every runtime: ``2 + rounds`` sums per pass."""
    if n_clusters < 1 or iterations < 1 or rounds < 1:
        raise ValueError(
            f"secure balancing: n_clusters={n_clusters}, iterations={iterations}, "
            f"rounds={rounds}: use 1 or more"
        )
    steps: list[BalanceStep] = []
    for it in range(iterations):
        s, ss, _, sent = total(MOMENTS, steps, None)
        if sent[0] < 1:
            log.warning("secure balancing: no site has %d cells or more", MIN_CLUSTER_CELLS)
            return steps
        mean = s / sent[0]
        sd = np.sqrt(np.maximum(ss / sent[0] - mean * mean, 0.0))
        book = codebook(mean, sd, n_clusters, seed + it)
        sums, counts, sent_c = total(CODEBOOK, steps, book)
        d = len(mean)
        points = _means(sums.reshape(-1, d), sent_c, book)
        live = counts > 0
        centroids = weighted_kmeans(
            points[live], counts[live], n_clusters, seed + it, LOCAL_KMEANS_ITERATIONS, N_INIT
        )
        if len(centroids) < n_clusters:  # fewer occupied codebook cells than clusters
            centroids = np.concatenate([centroids, book[: n_clusters - len(centroids)]])
        for _ in range(rounds):
            sums, counts, sent_c = total(SUMS, steps, centroids)
            centroids = _means(sums.reshape(-1, d), sent_c, centroids)
        live = counts > 0
        steps.append(BalanceStep(centroids[live], counts[live] / counts.sum()))
    return steps


def plain_total(
    zs: Sequence[np.ndarray], min_cells: int = MIN_CLUSTER_CELLS
) -> Callable[[str, list[BalanceStep], np.ndarray | None], list[np.ndarray]]:
    """``total`` from unmasked float sums of fixed embeddings ``zs`` (the reference the
    secure runtime is tested against; no policy: tests and benchmarks only)."""

    def total(phase: str, steps: list[BalanceStep], centroids: np.ndarray | None) -> list:
        parts = [site_values(z, phase, centroids, min_cells) for z in zs]
        return [np.sum([p[i] for p in parts], axis=0) for i in range(len(parts[0]))]

    return total


def _nbytes(x: object) -> int:
    """Bytes of a protocol payload (arrays, bytes and strings by size, numbers 8 each)."""
    if isinstance(x, np.ndarray):
        return int(x.nbytes)
    if isinstance(x, bytes | str):
        return len(x)
    if isinstance(x, list | tuple):
        return sum(_nbytes(v) for v in x)
    if isinstance(x, dict):
        return sum(len(k) + _nbytes(v) for k, v in x.items())
    return 8


def secure_balance_in_process(
    workers: Sequence,
    params: dict[str, np.ndarray],
    config: RunConfig,
    stats: list[dict] | None = None,
) -> list[BalanceStep]:
    """:func:`run_secure_balance` over site workers in one process: each query's replies
    (:func:`site_vector`, under each site's policy and a fresh query budget) are summed by the
    secure-aggregation protocol with the sites' sessions in this process; the coordinator
    sees the unmasked total only. A refusal or too few sites raise (no site is dropped
    silently: the masked sum needs every site's vector or a recovery). ``stats``, if given,
    gets one record per secure sum: phase, vector length, protocol seconds (every site's
    work in this process, the embedding excluded) and payload bytes up and down per site."""
    from scfedvi.federation.balance_site import new_ledger
    from scfedvi.federation.secure_round import site_identities
    from scfedvi.privacy.secagg_protocol import (
        CONSISTENCY,
        MASKED,
        SHARES,
        Payload,
        secure_sum,
    )
    from scfedvi.privacy.secagg_site import SiteSession

    check_config(config)
    k, fc = config.federation.balance_clusters, config.federation
    workers = sorted(workers, key=lambda w: w.name)
    ledger, ids = new_ledger(), site_identities(workers)
    n_total = int(sum(w.data.n_cells for w in workers))
    cache: dict[int, dict[str, np.ndarray]] = {}
    run_id, count = os.urandom(16), [0]

    def total(phase: str, steps: list[BalanceStep], centroids: np.ndarray | None) -> list:
        if len(steps) not in cache:
            cache.clear()
            cache[len(steps)] = {w.name: w.embed(params, steps) for w in workers}
        zs = cache[len(steps)]
        vectors = {
            w.name: site_vector(
                w.name,
                zs[w.name],
                config,
                phase=phase,
                n_clusters=k,
                n_steps=len(steps),
                centroids=centroids,
                n_total=n_total,
                ledger=ledger,
                policy=w.policy,
            )
            for w in workers
        }
        count[0] += 1
        r = 1_000_000 + count[0]  # one secure sum per query: its own round number
        sess = {
            w.name: SiteSession(w.name, run_id, r, ids[w.name], min_sites=w.policy.min_secagg_sites)
            for w in workers
        }

        moved = [0, 0]

        def ask(stage: str, payloads: Mapping[str, Payload]) -> dict[str, Payload]:
            moved[1] += sum(_nbytes(p) for p in payloads.values())
            out: dict[str, Payload] = {}
            for s, p in payloads.items():
                if stage == SHARES:
                    out[s] = sess[s].shares(p)
                elif stage == MASKED:
                    out[s] = {"masked": sess[s].masked(vectors[s], p)}
                elif stage == CONSISTENCY:
                    out[s] = sess[s].consistency(p)
                else:
                    out[s] = sess[s].unmask(p)
            moved[0] += sum(_nbytes(p) for p in out.values())
            return out

        t0 = time.perf_counter()
        keys = {s: x.keys() for s, x in sess.items()}
        moved[0] += sum(_nbytes(p) for p in keys.values())
        length = len(next(iter(vectors.values())))
        res = secure_sum(ask, keys, length=length, run_id=run_id, round_idx=r)
        if stats is not None:
            n = len(workers)
            stats.append(
                {
                    "phase": phase,
                    "length": length,
                    "seconds": time.perf_counter() - t0,
                    "bytes_up_per_site": moved[0] / n,
                    "bytes_down_per_site": moved[1] / n,
                }
            )
        d = next(iter(zs.values())).shape[1]
        m = 1 if phase == MOMENTS else (len(centroids) if centroids is not None else 0)
        return decode(res.total, phase, m, d, n_total)

    return run_secure_balance(total, k, fc.balance_iterations, fc.balance_rounds, fc.seed)
