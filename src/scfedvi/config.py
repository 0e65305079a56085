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
        _check_positive(self, ("n_hidden", "n_latent", "n_layers"))
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"ModelConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")


@dataclass(frozen=True)
class TrainConfig:
    """Local training at a site (scvi-tools' optimizer settings by default).

    Parameters
    ----------
    local_epochs
        Passes over the site's training cells per round (ignored when ``local_steps`` is
        set). ``None`` (default): from the schedule that follows the data
        (:mod:`scfedvi.federation.schedule`; 20 below 20,000 training cells).
    local_steps
        Fixed number of minibatch steps per round at every site instead of epochs.
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
    accelerator
        Where a site trains and embeds, as scvi-tools names it: ``"cpu"``, ``"gpu"`` (or
        ``"cuda"``) or ``"auto"`` (CUDA when available, else the CPU).
    device
        With a GPU accelerator: ``"auto"`` (the current CUDA device) or a device index
        (``"0"``, ``"1"``, ...).
    """

    batch_size: int = 128
    lr: float = 1e-3
    eps: float = 0.01
    weight_decay: float = 1e-6
    local_epochs: int | None = None
    local_steps: int | None = None
    n_epochs_kl_warmup: int = 400
    optimizer_state: Literal["reset", "keep"] = "keep"
    proximal_mu: float = 0.0
    scaffold: bool = False
    train_size: float = 0.9
    accelerator: Literal["cpu", "gpu", "cuda", "auto"] = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.train_size <= 1.0:
            raise ValueError(f"TrainConfig.train_size must be in (0, 1], got {self.train_size}")
        if self.batch_size < 2:
            raise ValueError(f"TrainConfig.batch_size must be >= 2, got {self.batch_size}")
        _check_choice("accelerator", self.accelerator, ("cpu", "gpu", "cuda", "auto"))
        if self.local_epochs is not None and self.local_epochs < 1:
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
    max_epochs
        Total epochs over the federation's training cells, split into ``n_rounds`` rounds.
        ``None`` (default): scvi-tools' rule, ``min(400, round(20000 / n * 400))`` for ``n``
        training cells (:mod:`scfedvi.federation.schedule`).
    early_stopping
        Stop when the validation loss (held-out cells, weighted by the sites' training cells)
        has not improved by ``early_stopping_min_delta`` for ``early_stopping_patience``
        rounds. Needs ``TrainConfig.train_size < 1``.
    early_stopping_patience
        Rounds without improvement before stopping (scvi-tools counts 45 epochs).
    early_stopping_min_delta
        The least decrease that counts as an improvement.
    n_jobs
        In-process runtime: worker processes training sites at the same time (each with one
        torch thread and a fixed subset of the sites, same results as one after the other).
        ``None`` (default): the free cores (``len(os.sched_getaffinity(0))``), at most one per
        site, or one after the other below 1,000 training cells (where starting workers
        costs more than it saves); ``1``: one after the other in this process.
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
        Rounds of per-cluster sums and counts per pass, after the round in which each site
        sends a few dozen local centroids with counts (default 1: two message rounds a pass).
    """

    n_rounds: int = 20
    max_epochs: int | None = None
    early_stopping: bool = False
    early_stopping_patience: int = 5
    early_stopping_min_delta: float = 0.0
    n_jobs: int | None = None
    norm_stats: Literal["local", "global", "averaged"] = "local"
    batch_owned: bool = True
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam"] = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    min_sites: int = 1
    seed: int = 0
    balance_clusters: int = 8
    balance_iterations: int = 2
    balance_rounds: int = 1

    def __post_init__(self) -> None:
        if self.n_rounds < 1:
            raise ValueError(f"FederationConfig.n_rounds must be >= 1, got {self.n_rounds}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(
                f"FederationConfig.max_epochs must be >= 1 (None: scvi-tools' rule), got "
                f"{self.max_epochs}"
            )
        if self.early_stopping_patience < 1:
            raise ValueError(
                "FederationConfig.early_stopping_patience must be >= 1 round, got "
                f"{self.early_stopping_patience}"
            )
        if self.n_jobs is not None and self.n_jobs < 1:
            raise ValueError(
                f"FederationConfig.n_jobs must be >= 1 (None: the free cores), got {self.n_jobs}"
            )
        if self.early_stopping_min_delta < 0:
            raise ValueError(
                "FederationConfig.early_stopping_min_delta must be >= 0, got "
                f"{self.early_stopping_min_delta}"
            )
        if self.balance_clusters < 0:
            raise ValueError(
                f"FederationConfig.balance_clusters must be >= 0 (0: off), got {self.balance_clusters}"
            )
        _check_positive(self, ("balance_iterations", "balance_rounds"))
        _check_choice("norm_stats", self.norm_stats, ("local", "global", "averaged"))
        _check_choice("server_optimizer", self.server_optimizer, ("fedavg", "fedavgm", "fedadam"))
        if self.min_sites < 1:
            raise ValueError(f"FederationConfig.min_sites must be >= 1, got {self.min_sites}")


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy (DP-FedAvg; see docs/dp.md and
    :mod:`scfedvi.privacy.dp`).

    Parameters
    ----------
    clip_norm
        L2 bound ``C`` on a site's update; ``None`` disables DP.
    noise_multiplier
        ``sigma``: the noise on the sum of the clipped updates has standard deviation
        ``sigma * C`` (``sigma * C / expected_sites`` on the average).
    delta
        The delta of the (epsilon, delta) guarantee the accountant reports.
    expected_sites
        The divisor ``n`` of the noisy sum, declared before the run and used whatever number
        of sites answers a round. Required with DP.
    clip_at
        ``"server"`` (the server clips the raw updates it receives) or ``"site"`` (each site
        clips its own update before sending; needed for secure aggregation).
    adjacency
        The neighbouring federations the guarantee is about: ``"add-remove"`` (one site's
        data added or removed, sensitivity ``C``) or ``"replace-one"`` (one site's data
        replaced, sensitivity ``2 C``: the same noise buys a larger epsilon).
    secure_aggregation
        Sum the sites' updates under secure aggregation (:mod:`scfedvi.privacy.secagg_protocol`):
        the coordinator sees the sum of the masked updates only. Needs ``clip_norm`` (the
        quantization range) with ``clip_at="site"``, and at least 3 sites. With
        ``noise_multiplier=0`` the sum is FedAvg's (weighted by cells, batch-owned columns by
        the cells of their batch, of the site-clipped updates); with noise, DP-FedAvg's
        unweighted sum over ``expected_sites``, the noise added by the coordinator to the
        unmasked sum (see ``docs/privacy.md``).
    """

    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    expected_sites: int | None = None
    clip_at: Literal["server", "site"] = "server"
    adjacency: Literal["add-remove", "replace-one"] = "add-remove"
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"PrivacyConfig.clip_norm must be > 0, got {self.clip_norm}")
        if self.secure_aggregation and (self.clip_norm is None or self.clip_at != "site"):
            raise ValueError(
                "PrivacyConfig.secure_aggregation needs each site to clip its own update: set "
                "clip_norm (the bound on an update's L2 norm, which fixes the quantization "
                f"range) and clip_at='site' (got clip_norm={self.clip_norm}, "
                f"clip_at={self.clip_at!r})"
            )
        _check_choice("clip_at", self.clip_at, ("server", "site"))
        _check_choice("adjacency", self.adjacency, ("add-remove", "replace-one"))
        if self.expected_sites is not None and self.expected_sites < 1:
            raise ValueError(
                f"PrivacyConfig.expected_sites must be >= 1, got {self.expected_sites}"
            )
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
class SitePolicy:
    """What a site agrees to answer: set by the site, never by the coordinator.

    Every query that shapes what a reply reveals is checked against this policy at the site
    (:mod:`scfedvi.privacy.policy`), in process and on Flower alike; a query outside it is
    refused with a :class:`~scfedvi.privacy.policy.PolicyRefusal` naming the setting, the bound
    and the fix. The defaults refuse the extraction attacks of the threat model
    (``docs/privacy.md``) and accept every configuration of the tests, ``scfedvi demo`` and the
    paper benchmark.

    Parameters
    ----------
    min_train_cells
        Fewest training cells a site trains on (after ``train_size``). Default 16 (one full
        minibatch of ``min_batch_size``): one training cell let a single reply give back that
        cell's counts. The smallest site of the benchmark (pancreas ``--quick``, 5 sites) has
        18 training cells; the paper's smallest has 131.
    min_batch_size
        Smallest minibatch size (``TrainConfig.batch_size``) a site trains with. Default 16:
        a minibatch of one cell exposes that cell's gradient; 16 is the benchmark's quick
        schedule.
    lr_range
        Closed range of the Adam learning rate. Default ``(1e-5, 1e-2)``: scvi-tools uses 1e-3;
        the attack used a huge step so that one step moved the parameters by the cell's counts.
    eps_range
        Closed range of Adam's ``eps``. Default ``(1e-8, 0.1)``: scvi-tools uses 0.01; a huge
        ``eps`` makes the update linear in the gradient (the attack's second knob).
    weight_decay_range
        Closed range of the weight decay. Default ``(0.0, 0.01)`` (scvi-tools: 1e-6); a sanity
        bound, not a defence by itself (the coordinator knows the parameters it sent).
    max_local_epochs
        Most passes over the training cells per round. Default 400: the schedule's whole run
        never exceeds scvi-tools' 400 epochs, which one round may hold (``n_rounds=1``);
        below 20,000 cells the default schedule asks for 20.
    max_local_steps
        Most minibatch steps per round when ``local_steps`` is set. Default 10,000.
    max_rounds
        Most training rounds (messages) a site answers in one run, and the largest
        ``n_rounds`` it accepts. Default 1,000 (the paper uses 20); each round is a query.
    allowed_likelihoods
        Likelihoods a site trains. Default all three (``"zinb"``, ``"nb"``, ``"poisson"``):
        the likelihood does not decide what an update reveals.
    allowed_encoder_norms
        Encoder normalizations a site trains. Default ``("batch", "layer")``: the attack used
        ``"none"``, with which a crafted first layer passes a cell's counts straight into the
        gradient; BatchNorm mixes the cells of a minibatch.
    allowed_label_keys
        ``obs`` columns whose categories the site reports in the setup summary. Default
        ``()``: none besides the site's own label key (its node config's ``label-key`` or the
        ``label_key`` given to ``ScFedVI``), allowed implicitly (:meth:`allowing_label_key`);
        ``label_key='donor_id'`` returned one identifier per cell.
    min_batch_cells
        A batch with fewer cells at the site is never summarised (its count is sent, its
        per-gene statistics are not). Default 10: the summary of a 2-cell batch gives both
        cells' values.
    summary_passes
        Setup summary passes a site answers per run (one pass: one query with moments, and for
        batches it shares one with the pooled clip values). Default 1: repeated queries with
        chosen clip values gave every cell of a 3-cell batch.
    min_cluster_cells
        Fewest cells in a latent cluster whose sums a site sends when balancing. Default 10.
    max_balance_passes
        Most balancing passes a site answers per run. Default 3 (the runs use 2).
    max_balance_rounds
        Most cluster-sum queries a site answers per balancing pass. Default 2 (the runs use
        1): each answer is one more set of cluster means a coordinator that chooses the
        centroids can difference (the bisecting attack recovered 0 cells with 2 answers and
        13 of 300 with 30).
    max_clip_norm
        ``None`` (default): the site trains with or without differential privacy, as the run
        says. A number: the site trains only under DP with its update clipped at the site
        (``PrivacyConfig.clip_at="site"``) to at most this L2 norm, so no reply of its carries
        more than that bound whatever the coordinator asks; the noise is still added by the
        coordinator (see ``docs/dp.md``).
    max_balance_clusters
        Most clusters a balancing query may ask for. Default 32 (the runs use 8): the cells a
        chosen-centroid attack can isolate grow with the clusters times the answers.
    min_secagg_sites
        Fewest sites in a secure-aggregation roster the site takes part in. Default 3: with 2
        sites the sum and one's own update give the other's away.
    require_secure_aggregation
        ``True``: the site trains only under secure aggregation
        (``PrivacyConfig.secure_aggregation``) and never sends an unmasked update. Default
        ``False``.
    secagg_identity_key
        Path of the site's long-term Ed25519 identity key (``scfedvi secagg-keygen``; mode
        0600), with which it signs its secure-aggregation keys and the survivor set. Default
        ``""``: none; a Flower site then refuses secure aggregation, and in process every site
        gets a key made in memory (:mod:`scfedvi.privacy.identity`).
    secagg_roster
        Path of the consortium's roster (TOML ``[sites]``: site name -> public identity key),
        distributed out of band: the only sites whose keys this site accepts in secure
        aggregation. Default ``""``; needed with ``secagg_identity_key``.
    max_runs
        Most runs (Flower run ids; in process, training runs of a ``ScFedVI`` with a
        ``ledger_dir``) a site answers on one data file, counted in its persistent run ledger
        (:mod:`scfedvi.privacy.run_budget`). Default 3: every budget above is per run, so a
        coordinator that may start runs at will multiplies them (averaging DP models of runs
        with the same settings, differencing runs that differ in one setting, more balancing
        answers); 3 is one run, one coordinator restart (a resumed Flower run has a new run
        id) and one spare.
    run_window_days
        ``None`` (default): ``max_runs`` counts every run ever joined. A number: only the runs
        that started within that many days.
    max_total_epsilon
        ``None`` (default): no budget. A number: the most epsilon (at ``epsilon_delta``) the
        site spends over all the DP runs it joins on one data file: it computes each run's
        epsilon itself from the noise multiplier it receives and the rounds it answered, sums
        them (basic composition) and refuses a round that would exceed the budget.
    allow_non_dp_runs
        Whether the site trains in runs without DP (default ``True``, as the runs' default).
        ``False``: a run without DP counts as epsilon = inf and is refused, and so is every DP
        run after the site answered one without DP.
    epsilon_delta
        The delta at which the site accounts its epsilon (default 1e-5), whatever delta the
        run's configuration names (a coordinator could otherwise name a large delta to report
        a small epsilon).
    epsilon_adjacency
        The neighbouring notion of the site's accounting (``"add-remove"``, default, or
        ``"replace-one"``), whatever the run's configuration names.
    """

    min_train_cells: int = 16
    min_batch_size: int = 16
    lr_range: tuple[float, float] = (1e-5, 1e-2)
    eps_range: tuple[float, float] = (1e-8, 0.1)
    weight_decay_range: tuple[float, float] = (0.0, 0.01)
    max_local_epochs: int = 400
    max_local_steps: int = 10_000
    max_rounds: int = 1000
    allowed_likelihoods: tuple[str, ...] = ("zinb", "nb", "poisson")
    allowed_encoder_norms: tuple[str, ...] = ("batch", "layer")
    allowed_label_keys: tuple[str, ...] = ()
    min_batch_cells: int = 10
    summary_passes: int = 1
    min_cluster_cells: int = 10
    max_balance_passes: int = 3
    max_balance_rounds: int = 2
    max_balance_clusters: int = 32
    max_clip_norm: float | None = None
    min_secagg_sites: int = 3
    require_secure_aggregation: bool = False
    secagg_identity_key: str = ""
    secagg_roster: str = ""
    max_runs: int = 3
    run_window_days: float | None = None
    max_total_epsilon: float | None = None
    allow_non_dp_runs: bool = True
    epsilon_delta: float = 1e-5
    epsilon_adjacency: Literal["add-remove", "replace-one"] = "add-remove"

    def __post_init__(self) -> None:
        if self.max_clip_norm is not None and not float(self.max_clip_norm) > 0:
            raise ValueError(f"SitePolicy.max_clip_norm must be > 0, got {self.max_clip_norm}")
        for name in ("run_window_days", "max_total_epsilon"):
            value = getattr(self, name)
            if value is not None and not float(value) > 0:
                raise ValueError(f"SitePolicy.{name} must be > 0 (or None), got {value}")
        if not 0 < self.epsilon_delta < 1:
            raise ValueError(
                f"SitePolicy.epsilon_delta must be in (0, 1), got {self.epsilon_delta}"
            )
        if bool(self.secagg_identity_key) != bool(self.secagg_roster):
            raise ValueError(
                "SitePolicy.secagg_identity_key and secagg_roster go together (the key signs, "
                "the roster says whose signatures to accept); set both or neither"
            )
        _check_choice(
            "SitePolicy.epsilon_adjacency", self.epsilon_adjacency, ("add-remove", "replace-one")
        )
        for name in ("lr_range", "eps_range", "weight_decay_range"):
            lo, hi = (float(x) for x in getattr(self, name))
            if not 0.0 <= lo <= hi:
                raise ValueError(f"SitePolicy.{name} must be (low, high) with 0 <= low <= high")
            object.__setattr__(self, name, (lo, hi))
        _check_positive(
            self,
            (
                "min_train_cells",
                "min_batch_size",
                "max_local_epochs",
                "max_local_steps",
                "max_rounds",
                "min_batch_cells",
                "summary_passes",
                "min_cluster_cells",
                "max_balance_passes",
                "max_balance_rounds",
                "max_balance_clusters",
                "min_secagg_sites",
                "max_runs",
            ),
        )
        if self.min_batch_size < 2:
            raise ValueError(f"SitePolicy.min_batch_size must be >= 2, got {self.min_batch_size}")
        if self.min_batch_cells < 2:
            raise ValueError(f"SitePolicy.min_batch_cells must be >= 2, got {self.min_batch_cells}")
        for name, choices in (
            ("allowed_likelihoods", ("zinb", "nb", "poisson")),
            ("allowed_encoder_norms", ("batch", "layer", "none")),
        ):
            values = tuple(str(v) for v in getattr(self, name))
            for v in values:
                _check_choice(f"SitePolicy.{name}", v, choices)
            object.__setattr__(self, name, values)
        object.__setattr__(
            self, "allowed_label_keys", tuple(str(k) for k in self.allowed_label_keys)
        )

    def allowing_label_key(self, label_key: str | None) -> SitePolicy:
        """This policy with the site's own ``label_key`` allowed too (``None``: unchanged)."""
        if not label_key or label_key in self.allowed_label_keys:
            return self
        return dataclasses.replace(
            self, allowed_label_keys=(*self.allowed_label_keys, str(label_key))
        )


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a federated run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        if self.privacy.enabled:
            _refuse_unnoised_channels(self)

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


def _refuse_unnoised_channels(cfg: RunConfig) -> None:
    """DP covers the noisy parameter average only: refuse settings that send more of a
    site's data to the server without noise (see docs/dp.md)."""
    unnoised = {
        "TrainConfig.scaffold=True": (
            cfg.train.scaffold,
            "SCAFFOLD's control-variate deltas are averaged without noise; set scaffold=False",
        ),
        'FederationConfig.norm_stats="global"': (
            cfg.federation.norm_stats == "global",
            "every round pools per-site means and variances of the hidden units without "
            'noise; use norm_stats="local" (or "averaged", whose statistics are clipped and '
            "noised with the parameters)",
        ),
        "FederationConfig.early_stopping=True": (
            cfg.federation.early_stopping,
            "it needs each site's validation loss, which a site does not send under DP; set "
            "early_stopping=False and a fixed n_rounds",
        ),
    }
    for setting, (on, fix) in unnoised.items():
        if on:
            raise ValueError(
                f"differential privacy (PrivacyConfig.clip_norm={cfg.privacy.clip_norm}) cannot "
                f"be combined with {setting}: {fix}"
            )


def _check_positive(obj: object, names: tuple[str, ...]) -> None:
    """Every field in ``names`` of the configuration ``obj`` is at least 1."""
    for name in names:
        if int(getattr(obj, name)) < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be >= 1, got {getattr(obj, name)}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@dataclass(frozen=True)
class AnnotateConfig:
    """Settings of federated scANVI (on top of the scFedVI run's :class:`RunConfig`;
    :mod:`scfedvi.annotate`). On Flower, each field is the run-config key ``annotate-`` and its
    name in kebab-case (``local_epochs`` -> ``annotate-local-epochs``; ``n_rounds`` ->
    ``annotate-num-server-rounds``, as scFedVI's ``num-server-rounds``).

    Parameters
    ----------
    unlabeled_category
        The label value of unlabelled cells (scvi-tools' ``unlabeled_category``).
    classification_ratio
        Weight of the classifier's cross-entropy (scvi-tools: 50).
    linear_classifier
        A linear classifier instead of scvi-tools' one-hidden-layer MLP.
    n_rounds, local_epochs
        Federated rounds and local epochs per round: 10 x 2 = 20 epochs, twice scvi-tools'
        epochs for a scANVI model initialised from a trained scVI model on fewer than 20,000
        cells (``min(10, max(2, round(max_epochs_heuristic / 3)))``), in twice the rounds.
        Measured (benchmarks/label_transfer.py, 100 scVI epochs, seed 0, accuracy at the site
        whose labels were hidden, 5 rounds -> 10): cortex 0.934 -> 0.950, 0.918 -> 0.942,
        0.807 -> 0.872; pancreas 0.974 -> 0.987, 0.991 -> 0.994 (docs/annotate.md).
    confidence_threshold
        Cells whose top label probability is below this get ``unlabeled_category`` in
        ``obs['scfedvi_label']`` (their probability is still written): cells between labels.
    classifier_stats
        The classifier's BatchNorm statistics at prediction: ``"pooled"``, those of the latent
        codes of all the federation's cells (from each site's count, sum and sum of outer
        products of its codes, a 10 x 10 summary sent once after training), the same at every
        site; ``"site"``, each site's own. Measured (cortex, 100 scVI epochs, seed 0, the
        labels of the STRT-seq site hidden): accuracy at that site 0.679 with its own
        statistics, 0.807 with the pooled ones: a site's own statistics re-centre its codes
        and move them across the decision boundaries learnt on the labelled sites
        (docs/annotate.md).
    novelty_ratio
        Cells whose squared latent distance to their predicted label's centroid exceeds this
        many times that label's mean squared distance (``obs['scfedvi_label_novelty']``) also
        get ``unlabeled_category``: a population that no site labelled is not given a label it
        does not have (a softmax is confident far from its training cells, so the probability
        alone does not flag it). The centroids are pooled from each labelled site's per-label
        sums of its cells' latent codes (labels with at least its policy's
        ``min_cluster_cells`` cells), as balancing pools cluster sums.
    """

    unlabeled_category: str = "Unknown"
    classification_ratio: float = 50.0
    linear_classifier: bool = False
    n_rounds: int = 10
    local_epochs: int = 2
    confidence_threshold: float = 0.5
    novelty_ratio: float = 4.0
    classifier_stats: str = "pooled"

    def __post_init__(self) -> None:
        if self.classifier_stats not in ("pooled", "site"):
            raise ValueError(
                f"AnnotateConfig.classifier_stats must be 'pooled' or 'site', got "
                f"{self.classifier_stats!r}"
            )
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(
                "AnnotateConfig.confidence_threshold must be in [0, 1], got "
                f"{self.confidence_threshold}"
            )
        if self.novelty_ratio <= 0:
            raise ValueError(f"AnnotateConfig.novelty_ratio must be > 0, got {self.novelty_ratio}")
