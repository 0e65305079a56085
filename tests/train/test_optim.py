"""Our lean Adam equals torch.optim.Adam step for step."""

from __future__ import annotations

import torch

from scfedvi.train.optim import Adam


def test_adam_equals_torch_adam_with_weight_decay():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    b = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    b.load_state_dict(a.state_dict())
    ours = Adam(a.named_parameters(), lr=1e-2, eps=0.01, weight_decay=1e-3)
    ref = torch.optim.Adam(b.parameters(), lr=1e-2, eps=0.01, weight_decay=1e-3)
    x = torch.randn(16, 5)
    for _ in range(20):
        for net, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            (net(x) ** 2).mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_adam_state_roundtrip_continues_identically():
    torch.manual_seed(1)
    net = torch.nn.Linear(3, 1)
    opt = Adam(net.named_parameters(), lr=0.1)
    x = torch.randn(8, 3)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    saved, weights = opt.state_dict(), {k: v.clone() for k, v in net.state_dict().items()}
    opt.zero_grad()
    net(x).pow(2).mean().backward()
    opt.step()
    want = net.weight.detach().clone()
    net.load_state_dict(weights)
    opt2 = Adam(net.named_parameters(), lr=0.1)
    opt2.load_state_dict(saved)
    opt2.zero_grad()
    net(x).pow(2).mean().backward()
    opt2.step()
    torch.testing.assert_close(net.weight.detach(), want)


def test_adam_kernels_agree(monkeypatch):
    """The fused kernel and the foreach fallback give torch.optim.Adam's parameters."""
    torch.manual_seed(2)
    nets = [torch.nn.Linear(6, 3) for _ in range(3)]
    for n in nets[1:]:
        n.load_state_dict(nets[0].state_dict())
    fused = Adam(nets[0].named_parameters(), lr=1e-2, eps=0.01, weight_decay=1e-3)
    fallback = Adam(nets[1].named_parameters(), lr=1e-2, eps=0.01, weight_decay=1e-3)
    ref = torch.optim.Adam(nets[2].parameters(), lr=1e-2, eps=0.01, weight_decay=1e-3)
    x = torch.randn(16, 6)
    for _ in range(15):
        for net, opt in zip(nets, (fused, fallback, ref), strict=True):
            opt.zero_grad()
            (net(x) ** 2).mean().backward()
            if opt is fallback:
                with monkeypatch.context() as m:
                    m.delattr(torch, "_fused_adam_")
                    opt.step()
            else:
                opt.step()
    for a, b, c in zip(
        nets[0].parameters(), nets[1].parameters(), nets[2].parameters(), strict=True
    ):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7)
