"""Local training at one site: a lean loop over the site's own cells.

Counts stay sparse in memory; each minibatch is densified on the fly. The optimizer is Adam with
scvi-tools' settings; the KL warm-up follows the federation's global epoch count. Training and
embedding run their float32 products through oneDNN where that keeps them float32
(:mod:`scfedvi.train.matmul`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from scfedvi.config import ModelConfig, TrainConfig
from scfedvi.module.distributions import NonzeroCounts
from scfedvi.module.vae import VAE, norm_stat_keys
from scfedvi.train.matmul import onednn_matmul
from scfedvi.train.optim import Adam
from scfedvi.train.params import Params, get_state, set_state, shared_keys


@dataclass
class SiteTensors:
    """A site's training data: sparse counts in schema gene order and batch indices."""

    X: sp.csr_matrix
    batch_index: np.ndarray
    _log_factorial: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.X = sp.csr_matrix(self.X, dtype=np.float32)
        if _has_stored_zeros(self.X.data):  # dropped from a copy; the caller's matrix is kept
            self.X = self.X.copy()
            self.X.eliminate_zeros()
        self.batch_index = np.asarray(self.batch_index, dtype=np.int64)
        if self.X.shape[0] != self.batch_index.shape[0]:
            raise ValueError("X and batch_index have different numbers of cells")

    @property
    def n_cells(self) -> int:
        return int(self.X.shape[0])

    def batch_counts(self) -> dict[int, int]:
        """Cells per batch index (an aggregate that may leave the site)."""
        vals, counts = np.unique(self.batch_index, return_counts=True)
        return {int(v): int(c) for v, c in zip(vals, counts, strict=True)}

    def minibatch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self.X[idx].toarray())
        return x, torch.from_numpy(self.batch_index[idx])

    def training_minibatch(
        self, idx: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, NonzeroCounts]:
        """A minibatch with its nonzero entries, read off the sparse storage."""
        sub = self.X[idx]
        lengths = np.diff(sub.indptr).astype(np.int64)
        nonzero = NonzeroCounts(
            torch.from_numpy(np.repeat(np.arange(len(idx), dtype=np.int64), lengths)),
            torch.from_numpy(sub.indices.astype(np.int64)),
            torch.from_numpy(sub.data),
            torch.from_numpy(lengths),
            torch.from_numpy(self.log_factorial[idx]),
        )
        return torch.from_numpy(sub.toarray()), torch.from_numpy(self.batch_index[idx]), nonzero

    @property
    def log_factorial(self) -> np.ndarray:
        """Each cell's sum over genes of ``lgamma(x + 1)`` (float64 arithmetic), computed once."""
        if self._log_factorial is None:
            from scipy.special import gammaln

            indptr, data = self.X.indptr, self.X.data
            per_cell = np.zeros(self.n_cells, dtype=np.float64)
            block = max(1, (1 << 22) // max(1, self.X.shape[1]))  # rows per block: bounded memory
            for r0 in range(0, self.n_cells, block):
                r1 = min(r0 + block, self.n_cells)
                lg = gammaln(data[indptr[r0] : indptr[r1]].astype(np.float64) + 1.0)
                csum = np.concatenate([[0.0], np.cumsum(lg)])
                starts = indptr[r0 : r1 + 1] - indptr[r0]
                per_cell[r0:r1] = csum[starts[1:]] - csum[starts[:-1]]
            self._log_factorial = per_cell.astype(np.float32)
        return self._log_factorial

    def iter_minibatches(
        self, batch_size: int, rng: np.random.Generator | None, *, drop_small: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Minibatches in a shuffled (``rng``) or the stored order.

        A last minibatch of fewer than 3 cells is dropped in training, as scvi-tools does,
        since BatchNorm cannot normalize one cell.
        """
        for idx in self.minibatch_indices(batch_size, rng, drop_small=drop_small):
            yield self.minibatch(idx)

    def minibatch_indices(
        self,
        batch_size: int,
        rng: np.random.Generator | None,
        *,
        drop_small: bool = True,
        cells: np.ndarray | None = None,
    ) -> Iterator[np.ndarray]:
        """The cell indices of each minibatch (see :meth:`iter_minibatches`), over ``cells``
        (default: all)."""
        cells = np.arange(self.n_cells) if cells is None else np.asarray(cells)
        order = cells[rng.permutation(len(cells))] if rng is not None else cells
        for start in range(0, len(cells), batch_size):
            idx = order[start : start + batch_size]
            if drop_small and len(idx) < 3 and start > 0:
                break
            yield idx


def train_validation_split(
    n_cells: int, train_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out cell indices (sorted), as scvi-tools splits: ``ceil(train_size *
    n)`` cells at random (``seed``) are trained on."""
    n_train = min(n_cells, int(np.ceil(train_size * n_cells)))
    order = np.random.default_rng(seed).permutation(n_cells)
    return np.sort(order[:n_train]), np.sort(order[n_train:])


def _has_stored_zeros(data: np.ndarray, chunk: int = 1 << 22) -> bool:
    return any(not data[i : i + chunk].all() for i in range(0, data.size, chunk))


@dataclass
class LocalState:
    """What a site keeps between rounds; none of it leaves the site."""

    local_params: Params = field(default_factory=dict)  # site-local BatchNorm statistics
    optimizer: dict | None = None  # Adam moments, when kept between rounds
    control: Params | None = None  # SCAFFOLD client control variate
    epochs_done: float = 0.0


@dataclass
class LocalResult:
    """What a local update produces; ``params`` and ``metrics`` are sent to the server."""

    params: Params
    num_examples: int
    metrics: dict[str, float]
    control_delta: Params | None = None


def round_seed(seed: int, round_idx: int) -> int:
    """The seed of a local update in one round, the same in every runtime and at every site.

    It does not depend on the site, so identical sites make identical updates (and a
    federation of identical sites equals one site), and no runtime needs to agree on names.
    """
    return (seed * 1_000_003 + round_idx * 9_176 + 12_345) % (2**31 - 1)


def kl_weight(epoch: float, n_epochs_kl_warmup: int | None) -> float:
    """KL warm-up as scvi-tools: ``min(1, epoch / n_epochs_kl_warmup)``."""
    if not n_epochs_kl_warmup:
        return 1.0
    return float(min(1.0, epoch / n_epochs_kl_warmup))


def resolve_device(accelerator: str = "auto", device: str | int = "auto") -> torch.device:
    """The torch device of ``TrainConfig.accelerator``/``device`` (scvi-tools' names).

    ``"auto"`` picks CUDA when torch sees a GPU, else the CPU; ``"gpu"``/``"cuda"`` without
    one is an error naming the fix.
    """
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator not in ("auto", "gpu", "cuda"):
        raise ValueError(
            f"TrainConfig.accelerator must be 'cpu', 'gpu', 'cuda' or 'auto', got {accelerator!r}"
        )
    if not torch.cuda.is_available():
        if accelerator == "auto":
            return torch.device("cpu")
        raise ValueError(
            f"TrainConfig.accelerator={accelerator!r}, but torch sees no CUDA GPU on this "
            "machine; use accelerator='cpu' or 'auto' (or install a CUDA build of torch)"
        )
    if str(device) == "auto":
        return torch.device("cuda")
    try:
        index = int(device)
    except ValueError:
        raise ValueError(
            f"TrainConfig.device must be 'auto' or a GPU index such as '0', got {device!r}"
        ) from None
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(
            f"TrainConfig.device={device!r}: this machine has {torch.cuda.device_count()} "
            "CUDA devices; use 'auto' or an index below that"
        )
    return torch.device("cuda", index)


def config_device(cfg: TrainConfig) -> torch.device:
    """The device of a site's training settings."""
    return resolve_device(cfg.accelerator, cfg.device)


def _on(device: torch.device, x: torch.Tensor, b: torch.Tensor, nonzero: NonzeroCounts | None):
    if device.type == "cpu":
        return x, b, nonzero
    nz = (
        None
        if nonzero is None
        else NonzeroCounts(*(t.to(device, non_blocking=True) for t in nonzero))
    )
    return x.to(device, non_blocking=True), b.to(device, non_blocking=True), nz


def build_module(n_genes: int, n_batches: int, model: ModelConfig) -> VAE:
    return VAE(n_genes, n_batches, model)


def make_optimizer(module: VAE, cfg: TrainConfig) -> Adam:
    """Adam with scvi-tools' settings (lr 1e-3, eps 0.01, weight decay 1e-6 by default)."""
    return Adam(module.named_parameters(), lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)


@onednn_matmul()
def local_update(
    module: VAE,
    global_params: Mapping[str, np.ndarray],
    data: SiteTensors,
    cfg: TrainConfig,
    state: LocalState,
    *,
    norm_stats: str,
    seed: int,
    global_control: Mapping[str, np.ndarray] | None = None,
    split_seed: int = 0,
) -> tuple[LocalResult, LocalState]:
    """Train from the global parameters on the site's cells; return the new shared parameters.

    Parameters
    ----------
    module
        A module of the federation's architecture (its weights are overwritten).
    global_params
        The server's shared parameters of this round.
    data
        The site's cells.
    cfg
        Local training settings.
    state
        The site's state from the previous round (local statistics, optimizer, control).
    norm_stats
        ``"local"`` or ``"averaged"`` (see :class:`~scfedvi.config.FederationConfig`).
    seed
        Seed of this site's round (minibatch order, dropout, reparametrization noise).
    global_control
        SCAFFOLD server control variate (when ``cfg.scaffold``).
    split_seed
        Seed of the site's split into training and held-out cells (``cfg.train_size``): the
        federation's seed, the same every round.
    """
    t0 = time.perf_counter()
    if cfg.local_steps is None and cfg.local_epochs is None:
        raise ValueError(
            "TrainConfig.local_epochs and local_steps are both None: resolve the run's schedule "
            "first (scfedvi.federation.schedule.site_train_config) or set one of them"
        )
    device = config_device(cfg)
    module.to(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    set_state(module, global_params)
    if state.local_params:
        set_state(module, state.local_params)
    site_stats: Params = {}
    frozen_norm = False
    if norm_stats == "global":
        # the site's statistics under the round's global weights, pooled by the server into the
        # next round's global statistics; training uses the current global statistics
        site_stats = calibrate_norm_stats(module, data, device=device)
        stat_keys = list(site_stats)
        set_state(module, {k: global_params[k] for k in stat_keys})
        frozen_norm = any(
            k.endswith("num_batches_tracked") and int(global_params[k]) > 0 for k in stat_keys
        )
    module.train()
    if frozen_norm:
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.eval()
    opt = make_optimizer(module, cfg)
    if cfg.optimizer_state == "keep" and state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
    named = dict(module.named_parameters())
    anchor = {k: p.detach().clone() for k, p in named.items()} if cfg.proximal_mu > 0 else None
    correction = (
        _scaffold_correction(named, global_control, state.control) if cfg.scaffold else None
    )

    train_cells, held_out = train_validation_split(data.n_cells, cfg.train_size, split_seed)
    n_per_epoch = max(1, _n_minibatches(len(train_cells), cfg.batch_size))
    total_steps = cfg.local_steps or int(cfg.local_epochs or 0) * n_per_epoch
    sums = np.zeros(3)
    n_seen = 0
    step = 0
    while step < total_steps:
        for idx in data.minibatch_indices(cfg.batch_size, rng, cells=train_cells):
            if step >= total_steps:
                break
            x, b, nonzero = _on(device, *data.training_minibatch(idx))
            epoch = state.epochs_done + step / n_per_epoch
            weight = kl_weight(int(epoch), cfg.n_epochs_kl_warmup)
            out = module.loss(x, b, kl_weight=weight, nonzero=nonzero)
            loss = out.loss
            if anchor is not None:
                prox = torch.stack([((p - anchor[k]) ** 2).sum() for k, p in named.items()]).sum()
                loss = loss + 0.5 * cfg.proximal_mu * prox
            opt.zero_grad()
            loss.backward()
            if correction is not None:
                for k, p in named.items():
                    if p.grad is not None:
                        p.grad.add_(correction[k])
            opt.step()
            n_cells = len(x)
            sums += n_cells * np.array(
                [out.loss.item(), out.reconstruction.mean().item(), out.kl_local.mean().item()]
            )
            n_seen += n_cells
            step += 1
    validation = _validation_loss(module, data, held_out, device) if len(held_out) else None
    new_state = get_state(module)
    keys = shared_keys(module, norm_stats)
    result_params = {k: site_stats.get(k, new_state[k]) for k in keys}
    control_delta = None
    new_control = state.control
    if cfg.scaffold:
        new_control, control_delta = _scaffold_update(
            named, global_params, result_params, global_control, state.control, step, cfg.lr
        )
    local = {k: v for k, v in new_state.items() if k not in set(keys)}
    metrics = {
        "loss": sums[0] / max(n_seen, 1),
        "reconstruction": sums[1] / max(n_seen, 1),
        "kl": sums[2] / max(n_seen, 1),
        "steps": float(step),
        "seconds": time.perf_counter() - t0,
    }
    if validation is not None:
        metrics["validation_loss"] = validation
    new_local = LocalState(
        local_params=local,
        optimizer=opt.state_dict() if cfg.optimizer_state == "keep" else None,
        control=new_control,
        epochs_done=state.epochs_done + step / n_per_epoch,
    )
    return LocalResult(result_params, len(train_cells), metrics, control_delta), new_local


@torch.no_grad()
def _validation_loss(
    module: VAE, data: SiteTensors, cells: np.ndarray, device: torch.device
) -> float:
    """Negative ELBO per held-out cell (KL weight 1; eval mode: no dropout, running
    statistics)."""
    module.eval()
    total = 0.0
    for idx in data.minibatch_indices(1024, None, drop_small=False, cells=cells):
        x, b, nonzero = _on(device, *data.training_minibatch(idx))
        total += float(module.loss(x, b, kl_weight=1.0, nonzero=nonzero).loss) * len(idx)
    module.train()
    return total / len(cells)


def _n_minibatches(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 3 or full == 0 else 0)


def _scaffold_correction(named, global_control, client_control) -> dict[str, torch.Tensor]:
    """SCAFFOLD: gradient correction ``c - c_i`` (zeros before the first round)."""
    out = {}
    for k, p in named.items():
        c = global_control.get(k) if global_control else None
        ci = client_control.get(k) if client_control else None
        corr = torch.zeros_like(p)
        if c is not None:
            corr += torch.as_tensor(c, device=p.device)
        if ci is not None:
            corr -= torch.as_tensor(ci, device=p.device)
        out[k] = corr
    return out


def _scaffold_update(named, global_params, new_params, global_control, client_control, steps, lr):
    """Option II of SCAFFOLD: ``c_i+ = c_i - c + (x - y_i) / (K lr)``; returns (c_i+, delta)."""
    new_c, delta = {}, {}
    for k in named:
        ci = client_control.get(k) if client_control else np.zeros_like(new_params[k])
        c = global_control.get(k) if global_control else np.zeros_like(new_params[k])
        upd = ci - c + (np.asarray(global_params[k]) - new_params[k]) / (max(steps, 1) * lr)
        new_c[k] = upd.astype(np.float32)
        delta[k] = (upd - ci).astype(np.float32)
    return new_c, delta


@onednn_matmul()
@torch.no_grad()
def calibrate_norm_stats(
    module: VAE, data: SiteTensors, batch_size: int = 1024, device: torch.device | None = None
) -> Params:
    """Recompute BatchNorm statistics on a site's cells with the current weights.

    The statistics are cumulative averages over minibatches of the site's cells in a fixed
    random order (a stored order sorted by batch or cell type would leave out the variance
    between minibatches), with dropout off; the decoder sees the posterior means. They are the
    site's own and never leave it. Returns the new statistics.
    """
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    if not bns:
        return {}
    saved = {m: m.momentum for m in bns}
    module.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    decoder_bn = any(isinstance(m, torch.nn.BatchNorm1d) for m in module.decoder.modules())
    device = device or _module_device(module)
    for x, b in data.iter_minibatches(batch_size, np.random.default_rng(0), drop_small=True):
        x, b, _ = _on(device, x, b, None)
        inf = module.inference(x, b)
        if decoder_bn:  # the decoder's pass changes no statistic otherwise
            module.generative(inf["qz_m"], inf["library"], b)
    for m in bns:
        m.momentum = saved[m]
        m.eval()
    state = get_state(module)
    return {k: state[k] for k in norm_stat_keys(module)}


@onednn_matmul()
@torch.no_grad()
def embed(
    module: VAE, data: SiteTensors, batch_size: int = 1024, device: torch.device | None = None
) -> np.ndarray:
    """Posterior means of the site's cells (eval mode: running statistics, no dropout), on
    ``device`` (default: where the module is)."""
    device = device or _module_device(module)
    module.to(device)
    module.eval()
    out = [
        module.latent(*_on(device, x, b, None)[:2]).cpu().numpy()
        for x, b in data.iter_minibatches(batch_size, None, drop_small=False)
    ]
    return np.concatenate(out, axis=0)


def _module_device(module: VAE) -> torch.device:
    return next(module.parameters()).device
