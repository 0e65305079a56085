"""The benchmark report as a reader sees it: scIB table laid out as scib-metrics', long blocks
folded, the command line wrapped, the time written."""

from __future__ import annotations

import pandas as pd

from scfedvi.report.html import to_html
from scfedvi.report.markdown import FOLD_LINES, to_markdown
from scfedvi.report.tables import scib_detail


def _results() -> pd.DataFrame:
    rows = []
    for label, total, ilisi, seed_shift in (
        ("A", 0.60, 0.5, 0.0),
        ("B", 0.70, 0.4, 0.0),
        ("C", 0.65, 0.5, 0.0),
    ):
        for seed in (0, 1):
            rows.append(
                {
                    "dataset": "d",
                    "n_sites": 2,
                    "label": label,
                    "seed": seed,
                    "scib: iLISI": ilisi + seed_shift,
                    "scib: KMeans NMI": 0.8,
                    "scib: Total": total + 0.01 * seed,
                    "scib: Bio conservation": 0.7,
                    "scib: Batch correction": 0.5,
                }
            )
    return pd.DataFrame(rows)


def test_scib_detail_is_grouped_sorted_and_marks_the_best():
    t = scib_detail(_results(), "d", 2, ["A", "B", "C"])
    assert list(t.columns) == [
        "bio: KMeans NMI",
        "batch: iLISI",
        "Batch correction",
        "Bio conservation",
        "Total",
    ]
    assert list(t.index) == ["B", "C", "A"]  # by Total, best first
    assert t.loc["B", "Total"] == "**0.705**" and t.loc["A", "Total"] == "0.605"
    assert t.loc["A", "batch: iLISI"] == t.loc["C", "batch: iLISI"] == "**0.500**"  # ties
    assert t.loc["B", "batch: iLISI"] == "0.400"
    assert all(v == "**0.800**" for v in t["bio: KMeans NMI"])


def test_long_blocks_fold_and_the_time_is_written(tmp_path):
    config = "\n".join(f'"key{i}": {i}' for i in range(FOLD_LINES + 5))
    command = "scfedvi benchmark " + " ".join(f"--option-{i} value" for i in range(30))
    table = scib_detail(_results(), "d", 2)
    blocks = [
        ("h1", "scfedvi benchmark"),
        ("pre", command),
        ("table", table, "d, 2 sites"),
        ("h2", "Configuration"),
        ("pre", config),
    ]
    md = to_markdown(blocks, tmp_path, written="2026-12-03 13:00 UTC")
    assert md.index("*Written 2026-12-03 13:00 UTC.*") < md.index(command)
    assert f"<details><summary>{FOLD_LINES + 5} lines" in md
    assert md.count("<details>") == 1  # the one-line command stays open
    page = to_html(blocks, "t", written="2026-12-03 13:00 UTC")
    assert "white-space: pre-wrap" in page  # the command wraps at the page's edge
    assert page.count("<details>") == 1 and "Written 2026-12-03 13:00 UTC." in page
    assert '<div class="wide"><table>' in page and "<td><b>0.705</b></td>" in page
