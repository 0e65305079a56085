"""Typed, frozen configuration: one object per concern, printed in every report."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Likelihood = Literal["zinb", "nb", "poisson"]
Dispersion = Literal["gene", "gene-batch"]
Norm = Literal["batch", "layer", "none"]


@dataclass(frozen=True)
class ModelConfig:
    """The scVI architecture (scvi-tools' ``SCVI`` defaults).

    Parameters
    ----------
    n_hidden, n_latent, n_layers, dropout_rate
        Width, latent size, hidden layers and encoder dropout.
    likelihood
        ``"zinb"`` (default), ``"nb"`` or ``"poisson"``.
    dispersion
        ``"gene"`` (one inverse dispersion per gene) or ``"gene-batch"``.
    norm
        The encoder's normalization after each hidden linear layer: ``"batch"`` (BatchNorm,
        scVI's default), ``"layer"`` (LayerNorm without affine, as scvi-tools) or ``"none"``.
    decoder_norm
        The decoder's: ``"layer"`` by default, the one departure from scvi-tools' defaults
        (BatchNorm in both). A site's minibatches hold only its own cells, so a BatchNorm
        decoder is trained to decode each site's cells relative to that site's mix of cell
        types, so the encoder must place one cell type differently at sites with different
        mixes; LayerNorm normalizes each cell alone. It needs a full schedule (hundreds of
        steps per site; see the README). ``None``: the same as ``norm``.
    encode_covariates
        Also feed the batch one-hot to the encoder.
    """

    n_hidden: int = 128
    n_latent: int = 10
    n_layers: int = 1
    dropout_rate: float = 0.1
    likelihood: Likelihood = "zinb"
    dispersion: Dispersion = "gene"
    norm: Norm = "batch"
    decoder_norm: Norm | None = "layer"
    encode_covariates: bool = False

    @property
    def norms(self) -> tuple[Norm, Norm]:
        """(encoder, decoder) normalization."""
        return self.norm, self.decoder_norm or self.norm

    def __post_init__(self) -> None:
        _check_choice("likelihood", self.likelihood, ("zinb", "nb", "poisson"))
        _check_choice("dispersion", self.dispersion, ("gene", "gene-batch"))
        _check_choice("norm", self.norm, ("batch", "layer", "none"))
        if self.decoder_norm is not None:
            _check_choice("decoder_norm", self.decoder_norm, ("batch", "layer", "none"))
        for name in ("n_hidden", "n_latent", "n_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"ModelConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")


@dataclass(frozen=True)
class TrainConfig:
    """Local training at a site (scvi-tools' optimizer settings by default).

    Parameters
    ----------
    local_epochs
        Passes over the site's cells per round (ignored when ``local_steps`` is set).
    local_steps
        Fixed number of minibatch steps per round instead of epochs.
    n_epochs_kl_warmup
        KL warm-up length in *global* epochs (the federation's epoch count, not restarted
        each round).
    optimizer_state
        What happens to Adam's moments between rounds: ``"reset"`` (fresh each round) or
        ``"keep"`` (the site keeps its own moments; they never leave the site).
    proximal_mu
        FedProx coefficient (0 disables it).
    scaffold
        Use SCAFFOLD control variates for client-drift correction.
    train_size
        Fraction of each site's cells trained on (scvi-tools' ``train_size``); the others are
        held out, fixed for the whole run by the federation's seed, and the site reports its
        validation loss on them every round. An epoch is a pass over the training cells.
        ``1.0`` trains on every cell. Every cell is embedded either way.
    """

    batch_size: int = 128
    lr: float = 1e-3
    eps: float = 0.01
    weight_decay: float = 1e-6
    local_epochs: int = 20
    local_steps: int | None = None
    n_epochs_kl_warmup: int = 400
    optimizer_state: Literal["reset", "keep"] = "keep"
    proximal_mu: float = 0.0
    scaffold: bool = False
    train_size: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 < self.train_size <= 1.0:
            raise ValueError(f"TrainConfig.train_size must be in (0, 1], got {self.train_size}")
        if self.batch_size < 2:
            raise ValueError(f"TrainConfig.batch_size must be >= 2, got {self.batch_size}")
        if self.local_epochs < 1:
            raise ValueError(f"TrainConfig.local_epochs must be >= 1, got {self.local_epochs}")
        if self.local_steps is not None and self.local_steps < 1:
            raise ValueError(f"TrainConfig.local_steps must be >= 1, got {self.local_steps}")
        _check_choice("optimizer_state", self.optimizer_state, ("reset", "keep"))
        if self.proximal_mu < 0:
            raise ValueError(f"TrainConfig.proximal_mu must be >= 0, got {self.proximal_mu}")


@dataclass(frozen=True)
class FederationConfig:
    """The round loop and the server's aggregation.

    Parameters
    ----------
    n_rounds
        Communication rounds.
    norm_stats
        Whose statistics BatchNorm uses: ``"local"`` (each site trains and embeds with its own
        statistics; they never leave it), ``"global"`` (every site trains and embeds with the
        statistics of all sites' cells together, pooled each round from per-site means and
        variances of the hidden units, as pooled training would; composition differences
        between sites are kept) or ``"averaged"`` (FedAvg over the running statistics, the
        paper's plain FedAvg).
    batch_owned
        Average the parameters tied to one batch only over the sites that hold that batch.
    server_optimizer
        ``"fedavg"`` (replace by the average), ``"fedavgm"`` (server momentum) or ``"fedadam"``.
    server_lr, server_momentum
        Server step size and momentum (``fedavgm``/``fedadam``).
    min_sites
        Fewest site updates that make a valid round.
    seed
        Seed of the whole run (initialization, minibatch order, dropout).
    balance_clusters
        Composition-balanced statistics (:mod:`scfedvi.federation.balance`): after training,
        the sites cluster their embeddings into this many latent clusters by federated k-means
        and each site recomputes its site-local statistics on its cells weighted to the
        federation's composition of them. ``0`` turns it off. Used only with site-local
        BatchNorm statistics (otherwise there is nothing to balance) and without differential
        privacy (its accountant does not cover the clusters' sums): see
        :attr:`RunConfig.balance_clusters`.
    balance_iterations
        Balancing passes (each clusters the previous pass's embedding).
    balance_rounds
        Message rounds of federated k-means per pass (sites send per-cluster sums and counts).
    """

    n_rounds: int = 20
    norm_stats: Literal["local", "global", "averaged"] = "local"
    batch_owned: bool = True
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam"] = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    min_sites: int = 1
    seed: int = 0
    balance_clusters: int = 8
    balance_iterations: int = 2
    balance_rounds: int = 10

    def __post_init__(self) -> None:
        if self.n_rounds < 1:
            raise ValueError(f"FederationConfig.n_rounds must be >= 1, got {self.n_rounds}")
        if self.balance_clusters < 0:
            raise ValueError(
                f"FederationConfig.balance_clusters must be >= 0 (0: off), got {self.balance_clusters}"
            )
        for name in ("balance_iterations", "balance_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"FederationConfig.{name} must be >= 1, got {getattr(self, name)}")
        _check_choice("norm_stats", self.norm_stats, ("local", "global", "averaged"))
        _check_choice("server_optimizer", self.server_optimizer, ("fedavg", "fedavgm", "fedadam"))
        if self.min_sites < 1:
            raise ValueError(f"FederationConfig.min_sites must be >= 1, got {self.min_sites}")


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy (clip each site's update, add Gaussian noise).

    Parameters
    ----------
    clip_norm
        L2 bound on a site's update; ``None`` disables DP.
    noise_multiplier
        Standard deviation of the noise over ``clip_norm``.
    delta
        The delta of the (epsilon, delta) guarantee the accountant reports.
    """

    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"PrivacyConfig.clip_norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise ValueError(
                f"PrivacyConfig.noise_multiplier must be >= 0, got {self.noise_multiplier}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"PrivacyConfig.delta must be in (0, 1), got {self.delta}")

    @property
    def enabled(self) -> bool:
        return self.clip_norm is not None


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a federated run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @property
    def local_batchnorm(self) -> bool:
        """Whether sites train and embed with their own BatchNorm statistics."""
        return self.federation.norm_stats == "local" and "batch" in self.model.norms

    @property
    def balance_clusters(self) -> int:
        """The clusters balancing uses: ``FederationConfig.balance_clusters`` with site-local
        BatchNorm statistics and without differential privacy, else 0 (off)."""
        if not self.local_batchnorm or self.privacy.enabled:
            return 0
        return self.federation.balance_clusters

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return cls(
            model=ModelConfig(**d.get("model", {})),
            train=TrainConfig(**d.get("train", {})),
            federation=FederationConfig(**d.get("federation", {})),
            privacy=PrivacyConfig(**d.get("privacy", {})),
        )


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
