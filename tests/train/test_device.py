"""accelerator/device as scvi-tools names them: resolution, errors, a site's own choice, and
(with a CUDA GPU only) training and embedding on the device equal to the CPU's to rounding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from scfedvi.config import ModelConfig, RunConfig, TrainConfig
from scfedvi.flower.device import node_device
from scfedvi.train.local import (
    LocalState,
    SiteTensors,
    build_module,
    embed,
    local_update,
    resolve_device,
)
from scfedvi.train.params import get_state
from synthetic import make_counts

CUDA = torch.cuda.is_available()


def test_cpu_and_auto_resolve_without_a_gpu():
    assert resolve_device("cpu", "auto") == torch.device("cpu")
    assert resolve_device("auto", "auto").type == ("cuda" if CUDA else "cpu")


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without a GPU")
def test_asking_for_a_gpu_without_one_names_the_fix():
    for acc in ("gpu", "cuda"):
        with pytest.raises(ValueError, match=r"sees no CUDA GPU.*accelerator='cpu' or 'auto'"):
            resolve_device(acc, "auto")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="accelerator must be one of"):
        TrainConfig(accelerator="tpu")  # type: ignore[arg-type]
    if CUDA:
        with pytest.raises(ValueError, match="device must be 'auto' or a GPU index"):
            resolve_device("gpu", "first")


def test_a_site_decides_its_own_device_in_its_node_config():
    cfg = RunConfig()
    assert node_device(cfg, {}) is cfg
    assert node_device(cfg, {"site": "a"}) is cfg
    own = node_device(cfg, {"accelerator": "cpu", "device": "1"})
    assert (own.train.accelerator, own.train.device) == ("cpu", "1")
    assert own.model == cfg.model and own.federation == cfg.federation
    with pytest.raises(ValueError, match=r"node config \['accelerator'\]: accelerator must be"):
        node_device(cfg, {"accelerator": "tpu"})


def _site(n=200, genes=30):
    a = make_counts(n, genes, seed=5)
    return SiteTensors(a.X, a.obs["batch"].cat.codes.to_numpy())


def _train(cfg: TrainConfig, data: SiteTensors):
    torch.manual_seed(0)
    module = build_module(data.X.shape[1], 2, ModelConfig(n_hidden=16, n_latent=4))
    start = get_state(module)
    res, _ = local_update(module, start, data, cfg, LocalState(), norm_stats="averaged", seed=3)
    return res, embed(module, data)


def test_cpu_accelerator_trains_as_before():
    """accelerator='cpu' is the path every other test takes; 'auto' on a CPU machine is it."""
    data = _site()
    cfg = TrainConfig(batch_size=32, local_epochs=2, accelerator="cpu")
    a, za = _train(cfg, data)
    b, zb = _train(replace(cfg, accelerator="auto"), data)
    if not CUDA:
        for k in a.params:
            np.testing.assert_array_equal(a.params[k], b.params[k])
        np.testing.assert_array_equal(za, zb)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_training_and_embedding_match_the_cpu():
    """Embedding (deterministic: posterior means) with the same weights on the GPU equals the
    CPU's to float32 rounding. Training draws its noise from CUDA's generator, not the CPU's,
    so a GPU run is another sample of the same training: its losses agree to a few percent."""
    data = _site(600, 50)
    cfg = TrainConfig(batch_size=64, local_epochs=5, accelerator="cpu")
    model = ModelConfig(n_hidden=32, n_latent=4)

    def run(c: TrainConfig):
        torch.manual_seed(0)
        module = build_module(data.X.shape[1], 2, model)
        res, _ = local_update(
            module, get_state(module), data, c, LocalState(), norm_stats="averaged", seed=3
        )
        return module, res

    m_cpu, cpu = run(cfg)
    m_gpu, gpu = run(replace(cfg, accelerator="gpu"))
    assert next(m_gpu.parameters()).device.type == "cuda"
    assert all(np.all(np.isfinite(v)) for v in gpu.params.values())
    for key in ("loss", "validation_loss"):
        assert gpu.metrics[key] == pytest.approx(cpu.metrics[key], rel=0.05), key
    z_cpu = embed(m_cpu, data)
    z_gpu = embed(m_cpu, data, device=torch.device("cuda"))
    np.testing.assert_allclose(z_gpu, z_cpu, rtol=1e-4, atol=1e-4)
