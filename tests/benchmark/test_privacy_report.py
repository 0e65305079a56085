"""The report's privacy section: the table of epsilon and MIA per method, and the
privacy-utility figure (epsilon against LISI, 'no DP' at the right edge)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from scfedvi.benchmark.collect import PRIVACY_COLUMNS
from scfedvi.benchmark.report import DP_SCOPE, _privacy_blocks
from scfedvi.report.benchmark_figures import plot_privacy_utility


def _results() -> pd.DataFrame:
    rows = []
    for label, eps, sigma, auc in [
        ("scFedVI", np.inf, 0.0, 0.52),
        ("scFedVI DP ε=8", 8.0, 2.68, 0.50),
        ("scFedVI DP ε=1", 1.0, 16.7, 0.49),
    ]:
        rows.append(
            {
                "dataset": "pancreas",
                "label": label,
                "n_sites": 3,
                "seed": 0,
                "epsilon": eps,
                "delta": 1e-5,
                "noise_multiplier": sigma,
                "mia_auc": auc,
                "mia_tpr_at_1fpr": 0.01,
                "batch_lisi_mean": 1.5,
                "celltype_lisi_mean": 1.2,
            }
        )
    rows.append(
        {
            "dataset": "pancreas",
            "label": "PCA (uncorrected)",
            "n_sites": 3,
            "seed": 0,
            "epsilon": np.nan,
            "mia_auc": np.nan,
            "batch_lisi_mean": 1.1,
            "celltype_lisi_mean": 1.0,
        }
    )
    return pd.DataFrame(rows)


def test_privacy_section_and_figure(tmp_path):
    res = _results()
    assert set(PRIVACY_COLUMNS) <= set(res.columns)
    labels = ["scFedVI", "scFedVI DP ε=8", "scFedVI DP ε=1", "PCA (uncorrected)"]
    blocks = _privacy_blocks(res, labels, tmp_path)
    kinds = [b[0] for b in blocks]
    assert kinds == ["h2", "p", "table", "img"]
    assert blocks[1][1] == DP_SCOPE and "does not cover" in DP_SCOPE
    table = blocks[2][1]
    assert list(table.index) == labels[:3]  # federated methods only, in the methods' order
    assert table.loc["scFedVI DP ε=8", "epsilon"] == 8.0
    assert (tmp_path / "privacy_utility.png").stat().st_size > 1000
    # nothing to draw without a finite epsilon; nothing to say without MIA
    assert plot_privacy_utility(res[res["label"] == "scFedVI"], tmp_path / "x.png") is None
    assert _privacy_blocks(res.drop(columns=["mia_auc"]), labels, tmp_path) == []
