"""Adam as ``torch.optim.Adam`` computes it (L2 weight decay, bias correction), kept lean.

``torch.optim`` imports ``torch._dynamo`` on first use (about 3 s), which every fresh Flower
client process would pay; this optimizer needs no such import. Its state is a plain dict of
tensors, saved with the site's private state.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Adam:
    """Adam (Kingma and Ba) with coupled L2 weight decay, equal to ``torch.optim.Adam``.

    Parameters
    ----------
    params
        ``(name, parameter)`` pairs.
    lr, betas, eps, weight_decay
        As ``torch.optim.Adam``.
    """

    def __init__(
        self,
        params: Iterable[tuple[str, torch.nn.Parameter]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = [(n, p) for n, p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        for _, p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        for name, p in self.params:
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            st = self.state.get(name)
            if st is None:
                st = self.state[name] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
            st["step"] += 1
            t = float(st["step"])
            st["exp_avg"].lerp_(g, 1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(g, g.conj(), value=1 - b2)
            bc1 = 1 - b1**t
            bc2_sqrt = (1 - b2**t) ** 0.5
            denom = (st["exp_avg_sq"].sqrt() / bc2_sqrt).add_(self.eps)
            p.addcdiv_(st["exp_avg"], denom, value=-self.lr / bc1)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {n: {k: v.clone() for k, v in s.items()} for n, s in self.state.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        names = {n for n, _ in self.params}
        unknown = set(state) - names
        if unknown:
            raise KeyError(f"optimizer state for unknown parameters: {sorted(unknown)[:3]}")
        self.state = {n: {k: v.clone() for k, v in s.items()} for n, s in state.items()}
