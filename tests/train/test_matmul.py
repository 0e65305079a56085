"""Float32 products through oneDNN: only where they stay float32, and only inside the call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfedvi.config import ModelConfig, TrainConfig
from scfedvi.train import matmul
from scfedvi.train.local import LocalState, SiteTensors, build_module, embed, local_update
from scfedvi.train.params import get_state
from synthetic import make_counts

BACKEND = matmul._backend()
needs_backend = pytest.mark.skipif(BACKEND is None, reason="torch without mkldnn.matmul settings")


@pytest.fixture
def settings():
    """Restore every float32-precision setting a test touches."""
    b = torch.backends
    objs = [b, b.mkldnn, BACKEND, getattr(b.mkldnn, "conv", None), getattr(b.mkldnn, "rnn", None)]
    objs += [b.cuda.matmul, b.cudnn, getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None)]
    chain = [o for o in objs if o is not None and hasattr(o, "fp32_precision")]
    saved = [o.fp32_precision for o in chain]
    legacy = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(legacy)
    for o, v in zip(chain, saved, strict=True):  # parents first: a parent resets its children
        o.fp32_precision = v
    assert torch.get_float32_matmul_precision() == legacy  # consistent again


@needs_backend
def test_probe_rejects_products_computed_in_bfloat16(monkeypatch, settings):
    mm, linear = torch.mm, torch.nn.functional.linear

    def bf16_mm(a, b):
        return mm(a.bfloat16(), b.bfloat16()).float()

    def bf16_linear(a, w, bias=None):
        out = linear(a.bfloat16(), w.bfloat16()).float()
        return out if bias is None else out + bias

    monkeypatch.setattr(torch, "mm", bf16_mm)
    assert matmul._probe(BACKEND) is False
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch.nn.functional, "linear", bf16_linear)
    assert matmul._probe(BACKEND) is False
    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    # the real products of this machine: exact under the route exactly when the probe says so
    before = BACKEND.fp32_precision
    exact = matmul._probe(BACKEND)
    assert BACKEND.fp32_precision == before  # the probe restores the setting
    BACKEND.fp32_precision = "bf16"
    a = torch.full((128, 2000), 1 + 2**-10)
    got = torch.nn.functional.linear(a, torch.ones(64, 2000))
    assert bool(torch.all(got == 2000 * (1 + 2**-10))) == exact


@needs_backend
def test_route_is_set_inside_the_call_and_restored_after(monkeypatch, settings):
    monkeypatch.setattr(matmul, "_exact", True)
    before = BACKEND.fp32_precision
    with matmul.onednn_matmul() as on:
        assert on is True
        assert BACKEND.fp32_precision == "bf16"
    assert BACKEND.fp32_precision == before
    with pytest.raises(ValueError, match="boom"), matmul.onednn_matmul():
        raise ValueError("boom")
    assert BACKEND.fp32_precision == before


@needs_backend
def test_route_is_off_where_the_machine_the_user_or_the_caller_says_so(monkeypatch, settings):
    monkeypatch.setattr(matmul, "_exact", False)  # oneDNN would compute in bfloat16
    with matmul.onednn_matmul() as on:
        assert on is False and matmul._effective(BACKEND) == "ieee"
    monkeypatch.setattr(matmul, "_exact", True)
    monkeypatch.setenv(matmul.ENV, "0")
    with matmul.onednn_matmul() as on:
        assert on is False and matmul._effective(BACKEND) == "ieee"
    monkeypatch.delenv(matmul.ENV)
    # a caller who chose a precision of their own keeps it, whichever way it was set
    torch.set_float32_matmul_precision("medium")
    with matmul.onednn_matmul() as on:
        assert on is False and BACKEND.fp32_precision == "bf16"
    assert BACKEND.fp32_precision == "bf16"
    BACKEND.fp32_precision = "none"  # inherit ...
    torch.backends.fp32_precision = "tf32"  # ... the new API's global setting
    with matmul.onednn_matmul() as on:
        assert on is False and matmul._effective(BACKEND) == "tf32"
    assert matmul._effective(BACKEND) == "tf32"


def _site(n_genes: int = 200) -> SiteTensors:
    a = make_counts(300, n_genes, seed=3)
    return SiteTensors(a.X.tocsr(), a.obs["batch"].cat.codes.to_numpy())


def _train(site: SiteTensors, seen: list[str]):
    torch.manual_seed(0)
    module = build_module(site.X.shape[1], 2, ModelConfig(n_hidden=64, n_latent=5))
    module.z_encoder.register_forward_pre_hook(
        lambda *_: seen.append(BACKEND.fp32_precision if BACKEND else "absent")
    )
    params = get_state(module)
    cfg = TrainConfig(local_epochs=1, batch_size=64)
    res, _ = local_update(module, params, site, cfg, LocalState(), norm_stats="local", seed=1)
    return res.params, embed(module, site)


@needs_backend
def test_training_with_the_route_matches_the_default_backend(monkeypatch, settings):
    if not matmul.onednn_exact():
        pytest.skip("oneDNN would compute float32 products in bfloat16 on this machine")
    site = _site()
    seen_on: list[str] = []
    params_on, z_on = _train(site, seen_on)
    again, z_again = _train(site, [])
    monkeypatch.setenv(matmul.ENV, "0")
    seen_off: list[str] = []
    params_off, z_off = _train(site, seen_off)
    # the route was taken in training and embedding, and only there
    assert set(seen_on) == {"bf16"} and "bf16" not in seen_off
    assert BACKEND.fp32_precision == "none"
    for k, v in params_on.items():
        np.testing.assert_array_equal(v, again[k])  # deterministic
        np.testing.assert_allclose(v, params_off[k], rtol=1e-4, atol=1e-5, err_msg=k)
    np.testing.assert_array_equal(z_on, z_again)
    np.testing.assert_allclose(z_on, z_off, rtol=1e-4, atol=1e-4)
