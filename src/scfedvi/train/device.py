"""Where a site trains: the torch device of its settings, and moving minibatches there."""

from __future__ import annotations

import torch

from scfedvi.config import TrainConfig
from scfedvi.module.distributions import NonzeroCounts

__all__ = ["config_device", "module_device", "resolve_device", "to_device"]


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


def to_device(
    device: torch.device, x: torch.Tensor, b: torch.Tensor, nonzero: NonzeroCounts | None
) -> tuple[torch.Tensor, torch.Tensor, NonzeroCounts | None]:
    """A minibatch (counts, batch indices, nonzero entries) on ``device``."""
    if device.type == "cpu":
        return x, b, nonzero
    nz = (
        None
        if nonzero is None
        else NonzeroCounts(*(t.to(device, non_blocking=True) for t in nonzero))
    )
    return x.to(device, non_blocking=True), b.to(device, non_blocking=True), nz


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's parameters are."""
    return next(module.parameters()).device
