"""The local update at one site: the paper's step, with the federation's options as hooks.

:func:`local_update` reads as the algorithm: load the global parameters (and the site's own
statistics), then for each minibatch of the site's training cells take an Adam step on the
negative ELBO with the KL warm-up of the federation's global epoch count; send the new shared
parameters and scalar metrics. The options are small hooks around that step:

- :class:`FedProx` adds ``mu / 2 ||w - w_global||^2`` to the loss (``proximal_mu``);
- :class:`Scaffold` corrects each gradient by ``c - c_i`` and updates the site's control
  variate after the round (``scaffold``);
- :func:`use_global_statistics` trains with the federation's pooled BatchNorm statistics and
  sends the site's own instead (``norm_stats="global"``);
- :func:`training_steps` is the round's work (``local_steps``, or ``local_epochs`` over the
  training cells of :func:`~scfedvi.train.data.train_validation_split`); the held-out cells
  give the validation loss.

The site's data lives in :mod:`scfedvi.train.data`, statistics and embedding in
:mod:`scfedvi.train.embed`, the device in :mod:`scfedvi.train.device`; their public names are
importable from here too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from scfedvi.config import ModelConfig, TrainConfig
from scfedvi.module.vae import VAE
from scfedvi.train.data import SiteTensors, n_minibatches, train_validation_split
from scfedvi.train.device import config_device, resolve_device, to_device
from scfedvi.train.embed import calibrate_norm_stats, embed, write_embedding
from scfedvi.train.matmul import onednn_matmul
from scfedvi.train.optim import Adam
from scfedvi.train.params import Params, get_state, set_state, shared_keys

__all__ = [
    "FedProx",
    "LocalResult",
    "LocalState",
    "Scaffold",
    "SiteTensors",
    "build_module",
    "calibrate_norm_stats",
    "config_device",
    "embed",
    "kl_weight",
    "local_update",
    "make_optimizer",
    "resolve_device",
    "round_seed",
    "train_validation_split",
    "training_steps",
    "use_global_statistics",
    "write_embedding",
]


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


def build_module(n_genes: int, n_batches: int, model: ModelConfig) -> VAE:
    return VAE(n_genes, n_batches, model)


def make_optimizer(module: VAE, cfg: TrainConfig) -> Adam:
    """Adam with scvi-tools' settings (lr 1e-3, eps 0.01, weight decay 1e-6 by default)."""
    return Adam(module.named_parameters(), lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)


class FedProx:
    """FedProx's proximal term ``mu / 2 * ||w - w_global||^2`` (``TrainConfig.proximal_mu``)."""

    def __init__(self, named: Mapping[str, torch.nn.Parameter], mu: float) -> None:
        self.named, self.mu = named, mu
        self.anchor = {k: p.detach().clone() for k, p in named.items()}

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        prox = torch.stack([((p - self.anchor[k]) ** 2).sum() for k, p in self.named.items()])
        return loss + 0.5 * self.mu * prox.sum()


class Scaffold:
    """SCAFFOLD (``TrainConfig.scaffold``): each gradient is corrected by ``c - c_i`` (zeros
    before the first round); after the round, option II updates the site's control variate."""

    def __init__(
        self,
        named: Mapping[str, torch.nn.Parameter],
        global_control: Mapping[str, np.ndarray] | None,
        client_control: Params | None,
    ) -> None:
        self.named, self.c, self.ci = named, global_control, client_control
        self.correction = {}
        for k, p in named.items():
            c = global_control.get(k) if global_control else None
            ci = client_control.get(k) if client_control else None
            corr = torch.zeros_like(p)
            if c is not None:
                corr += torch.as_tensor(c, device=p.device)
            if ci is not None:
                corr -= torch.as_tensor(ci, device=p.device)
            self.correction[k] = corr

    def correct_gradients(self) -> None:
        for k, p in self.named.items():
            if p.grad is not None:
                p.grad.add_(self.correction[k])

    def update(
        self, global_params: Mapping[str, np.ndarray], new_params: Params, steps: int, lr: float
    ) -> tuple[Params, Params]:
        """``c_i+ = c_i - c + (x - y_i) / (K lr)``; returns ``(c_i+, c_i+ - c_i)``."""
        new_c, delta = {}, {}
        for k in self.named:
            ci = self.ci[k] if self.ci else np.zeros_like(new_params[k])
            c = np.asarray(self.c[k]) if self.c else np.zeros_like(new_params[k])
            upd = ci - c + (np.asarray(global_params[k]) - new_params[k]) / (max(steps, 1) * lr)
            new_c[k] = upd.astype(np.float32)
            delta[k] = (upd - ci).astype(np.float32)
        return new_c, delta


def use_global_statistics(
    module: VAE, data: SiteTensors, global_params: Mapping[str, np.ndarray], device: torch.device
) -> Params:
    """``norm_stats="global"``: compute the site's statistics under the round's global weights
    (returned: the server pools them into the next round's), then train with the current global
    statistics, frozen once the server has pooled some."""
    site_stats = calibrate_norm_stats(module, data, device=device)
    set_state(module, {k: global_params[k] for k in site_stats})
    frozen = any(
        k.endswith("num_batches_tracked") and int(global_params[k]) > 0 for k in site_stats
    )
    module.train()
    if frozen:
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.eval()
    return site_stats


def training_steps(
    data: SiteTensors, cells: np.ndarray, cfg: TrainConfig, rng: np.random.Generator | None
) -> tuple[Iterator[np.ndarray], int]:
    """The round's minibatches (cell indices: ``local_steps`` of them, or ``local_epochs``
    passes over ``cells``, shuffled by ``rng``) and the number of minibatches in an epoch."""
    if cfg.local_steps is None and cfg.local_epochs is None:
        raise ValueError(
            "TrainConfig.local_epochs and local_steps are both None: resolve the run's schedule "
            "first (scfedvi.federation.schedule.site_train_config) or set one of them"
        )
    per_epoch = max(1, n_minibatches(len(cells), cfg.batch_size))
    total = cfg.local_steps or int(cfg.local_epochs or 0) * per_epoch

    def minibatches() -> Iterator[np.ndarray]:
        done = 0
        while done < total:
            for idx in data.minibatch_indices(cfg.batch_size, rng, cells=cells):
                if done >= total:
                    return
                yield idx
                done += 1

    return minibatches(), per_epoch


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
    train_cells, held_out = train_validation_split(data.n_cells, cfg.train_size, split_seed)
    rng = np.random.default_rng(seed)
    steps, per_epoch = training_steps(data, train_cells, cfg, rng)
    device = config_device(cfg)
    module.to(device)
    torch.manual_seed(seed)
    set_state(module, global_params)
    if state.local_params:
        set_state(module, state.local_params)  # the site's own statistics
    module.train()
    site_stats: Params = {}
    if norm_stats == "global":  # the pooled statistics in training; the site's own are sent
        site_stats = use_global_statistics(module, data, global_params, device)
    opt = make_optimizer(module, cfg)
    if cfg.optimizer_state == "keep" and state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
    named = dict(module.named_parameters())
    prox = FedProx(named, cfg.proximal_mu) if cfg.proximal_mu > 0 else None
    scaffold = Scaffold(named, global_control, state.control) if cfg.scaffold else None

    sums, n_seen, step = np.zeros(3), 0, 0
    for step, idx in enumerate(steps, start=1):  # the paper's step
        x, b, nonzero = to_device(device, *data.training_minibatch(idx))
        epoch = state.epochs_done + (step - 1) / per_epoch
        out = module.loss(
            x, b, kl_weight=kl_weight(int(epoch), cfg.n_epochs_kl_warmup), nonzero=nonzero
        )
        loss = out.loss if prox is None else prox(out.loss)
        opt.zero_grad()
        loss.backward()
        if scaffold is not None:
            scaffold.correct_gradients()
        opt.step()
        parts = [out.loss.item(), out.reconstruction.mean().item(), out.kl_local.mean().item()]
        sums += len(x) * np.array(parts)
        n_seen += len(x)

    validation = _validation_loss(module, data, held_out, device) if len(held_out) else None
    new_state = get_state(module)
    keys = shared_keys(module, norm_stats)
    result_params = {k: site_stats.get(k, new_state[k]) for k in keys}
    control_delta, new_control = None, state.control
    if scaffold is not None:
        new_control, control_delta = scaffold.update(global_params, result_params, step, cfg.lr)
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
        local_params={k: v for k, v in new_state.items() if k not in set(keys)},
        optimizer=opt.state_dict() if cfg.optimizer_state == "keep" else None,
        control=new_control,
        epochs_done=state.epochs_done + step / per_epoch,
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
        x, b, nonzero = to_device(device, *data.training_minibatch(idx))
        total += float(module.loss(x, b, kl_weight=1.0, nonzero=nonzero).loss) * len(idx)
    module.train()
    return total / len(cells)
