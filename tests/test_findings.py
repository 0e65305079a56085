"""The benchmark report's findings paragraph and figure palettes, from results alone."""

from __future__ import annotations

import numpy as np
import pandas as pd

from scfedvi.report.figures import PALETTES, palette
from scfedvi.report.findings import findings


def _rows(ds, n, method, label, batch, ct, seeds=(0, 1), **extra):
    return [
        {
            "dataset": ds,
            "n_sites": n,
            "method": method,
            "label": label,
            "seed": s,
            "batch_lisi_mean": batch + 0.02 * s,
            "celltype_lisi_mean": ct,
            **extra,
        }
        for s in seeds
    ]


def test_findings_compare_with_pooled_and_per_site_from_the_numbers():
    res = pd.DataFrame(
        _rows("pancreas", 3, "scfedvi", "scFedVI", 2.40, 1.04)
        + _rows("pancreas", 3, "scvi-pooled", "pooled scVI", 1.96, 1.04)
        + _rows("pancreas", 3, "scvi-per-site", "scVI per site", 1.85, 1.14)
        + _rows("cortex", 2, "scfedvi", "scFedVI", 1.10, 1.30)
        + _rows("cortex", 2, "scvi-pooled", "pooled scVI", 1.32, 1.25)
    )
    text = findings(res)
    # one setting reached (pancreas), one missed (cortex: batch LISI 0.22 below pooled)
    assert text[0].startswith("scFedVI reaches pooled scVI") and "in 1 of 2 settings" in text[0]
    pancreas = next(t for t in text if t.startswith("pancreas, 3 sites"))
    # means over the two seeds: 2.41, 1.97, 1.86
    assert "(2 seeds)" in pancreas and "batch LISI 2.41" in pancreas
    assert "pooled scVI 1.97" in pancreas and "scVI per site 1.86" in pancreas
    assert "cell-type LISI 1.04" in pancreas and "scIB" not in pancreas  # no scIB column
    cortex = next(t for t in text if t.startswith("cortex, 2 sites"))
    assert "scVI per site" not in cortex  # not run there: not invented


def test_findings_state_what_dp_costs_and_buys():
    res = pd.DataFrame(
        _rows("pancreas", 3, "scfedvi", "scFedVI", 2.2, 1.04, seeds=(0,), epsilon=np.inf, mia_auc=0.536)
        + _rows("pancreas", 3, "scfedvi-dp-eps8", "scFedVI DP ε=8", 2.5, 2.32, seeds=(0,), epsilon=8.0, mia_auc=0.515)
    )  # fmt: skip
    dp = [t for t in findings(res) if "client-level DP" in t]
    assert len(dp) == 1
    assert "without DP cell-type LISI 1.04" in dp[0] and "AUC 0.536" in dp[0]
    assert "scFedVI DP ε=8: cell-type LISI 2.32, membership-inference AUC 0.515" in dp[0]


def test_no_findings_without_scfedvi():
    res = pd.DataFrame(_rows("pancreas", 3, "scvi-pooled", "pooled scVI", 1.96, 1.04))
    assert findings(res) == []


def test_batch_and_cell_type_palettes_share_no_colour_and_repeat_none():
    batch, cell_type = palette(0, 12), palette(1, 20)
    site = palette(2, 8)
    assert not set(batch) & set(cell_type) and not (set(batch) | set(cell_type)) & set(site)
    assert len(set(cell_type)) == 20 and len(set(batch)) == 12
    assert all(len(set(p)) == len(p) for p in PALETTES)


def test_findings_without_references_name_only_scfedvi():
    res = pd.DataFrame(_rows("pancreas", 3, "scfedvi", "scFedVI", 2.2, 1.04, seeds=(0,)))
    (text,) = findings(res)
    assert text == "pancreas, 3 sites (1 seed): scFedVI batch LISI 2.20, cell-type LISI 1.04."
