"""What a process imports: the CLI stays light, and a site's training stays off heavy libraries.

Each check runs in a fresh interpreter, since this test process has imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["scvi", "scanpy", "jax", "scib_metrics", "matplotlib", "umap", "torch._dynamo"]


def _modules_after(code: str) -> set[str]:
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_package_and_its_cli_import_without_torch():
    mods = _modules_after("import scfedvi, scfedvi.cli, scfedvi.config")
    assert "torch" not in mods
    assert not mods & set(HEAVY)


def test_a_site_trains_without_heavy_libraries():
    code = """
import numpy as np, scipy.sparse as sp
from scfedvi.config import ModelConfig, TrainConfig
from scfedvi.train.local import LocalState, SiteTensors, build_module, local_update
from scfedvi.train.params import get_state
rng = np.random.default_rng(0)
data = SiteTensors(sp.csr_matrix(rng.poisson(1.0, (40, 30)).astype(np.float32)), np.zeros(40))
module = build_module(30, 1, ModelConfig(n_hidden=8, n_latent=2))
result, _ = local_update(module, get_state(module), data, TrainConfig(batch_size=16, local_epochs=1),
                         LocalState(), norm_stats="local", seed=0)
assert np.isfinite(result.metrics["loss"])
"""
    mods = _modules_after(code)
    assert "torch" in mods  # it did train
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))
