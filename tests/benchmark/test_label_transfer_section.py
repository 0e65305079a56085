"""The label-transfer section of the benchmark report (issue 17): read from
benchmarks/label_transfer.py's results.jsonl, for the report's data sets only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scfedvi.report.label_transfer import (
    flag_table,
    label_transfer_blocks,
    load_results,
    recall_table,
    site_table,
    targets,
)

from .conftest import parse, run_cli

CM = {"true": ["A", "B"], "predicted": ["A", "B"], "counts": [[8, 2], [1, 9]]}


def _row(dataset, method, seed, hidden, acc, **kw):
    fed = method.startswith(("fed-", "new-site"))
    return {
        "dataset": dataset,
        "seed": seed,
        "hidden": hidden,
        "method": method,
        "epochs": 100,
        "anvi_epochs": 20,
        "accuracy": acc,
        "macro_f1": acc - 0.1,
        "annotate": {"classifier_stats": "pooled"} if fed else {},
        "versions": {"scfedvi": "0"},
        "command": f"python benchmarks/label_transfer.py {dataset} --seeds {seed}",
        **kw,
    }


@pytest.fixture
def lt_dir(tmp_path):
    """Results of two data sets; cortex: 2 seeds x 2 hidden sites."""
    rows = []
    for seed in (0, 1):
        for site, fed, knn in (("s1", 0.90, 0.80), ("s2", 0.70, 0.76)):
            flags = {"low_confidence": 0.1 * (seed + 1), "novel": 0.02, "confusion": CM}
            flags["recall"] = {"A": 0.9 + seed / 10, "B": 0.8}
            rows.append(_row("cortex", "fed-scanvi", seed, site, fed + seed / 100, **flags))
            rows.append(_row("cortex", "knn-scfedvi", seed, site, knn, recall={"A": 0.7}))
            rows.append(_row("cortex", "pooled-scanvi", seed, site, 0.81, scanvi_epochs=10))
            rows.append(_row("cortex", "labelled-only-scanvi", seed, site, 0.6, scanvi_epochs=10))
        rows.append(_row("cortex", "new-site-frozen", seed, "s1", 0.88))
    rows.append(_row("pancreas", "fed-scanvi", 0, "p1", 0.99, confusion=CM))
    d = tmp_path / "lt"
    d.mkdir()
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_site_flag_and_target_tables(lt_dir):
    df = load_results(lt_dir)
    sites = site_table(df).set_index(["data set", "hidden"])
    assert sites.loc[("cortex", "s2"), "fed-scanvi"] == "0.705 (2)"  # 0.70, 0.71
    assert sites.loc[("cortex", "s2"), "knn-scfedvi"] == "0.760 (2)"
    assert sites.loc[("cortex", "s2"), "new-site-frozen"] == "–"
    assert sites.loc[("cortex", "s1"), "labelled-only-scanvi"] == "0.600 (2)"
    recall = recall_table(df).set_index(["data set", "hidden", "label"])
    assert recall.loc[("cortex", "s1", "A"), "fed-scanvi"] == pytest.approx(0.95)
    assert recall.loc[("cortex", "s1", "A"), "knn-scfedvi"] == pytest.approx(0.7)
    flags = flag_table(df).set_index(["data set", "hidden"])
    assert flags.loc[("cortex", "s1"), "low_confidence"] == pytest.approx(0.15)
    assert flags.loc[("cortex", "s1"), "seeds"] == 2
    t = targets(df).set_index(["data set", "target"]).loc["cortex"]
    knn = t.loc["fed-scanvi > knn-scfedvi"]  # differences +0.10, +0.11, -0.06, -0.05
    assert (knn["higher / lower"], knn["runs"], knn["met"]) == ("2 / 2", 4, "yes")
    assert float(knn["sd"]) == pytest.approx(0.0930, abs=5e-4)


def test_section_holds_only_the_reports_data_sets(lt_dir, tmp_path):
    blocks = label_transfer_blocks(lt_dir, tmp_path / "fig", datasets=["cortex"])
    tables = [b[1] for b in blocks if b[0] == "table"]
    assert tables and all(set(t["data set"]) == {"cortex"} for t in tables)
    text = " ".join(b[1] for b in blocks if b[0] in ("p", "pre"))
    assert "its default, 10 epochs here" in text
    assert "label_transfer.py cortex --seeds 1" in text and "pancreas" not in text
    imgs = [b[1] for b in blocks if b[0] == "img"]
    assert [Path(p).name for p in imgs] == ["confusion_cortex.png"]
    none = label_transfer_blocks(lt_dir, tmp_path / "fig", datasets=["simulated"])
    assert "no label-transfer results for simulated" in none[-1][1]
    assert not [b for b in none if b[0] == "table"]


def test_benchmark_report_reads_out_label_transfer(lt_dir, tmp_path):
    out = tmp_path / "out"
    (out / "label_transfer").mkdir(parents=True)
    (out / "label_transfer" / "results.jsonl").write_text(
        (lt_dir / "results.jsonl").read_text().replace('"cortex"', '"simulated"')
    )
    assert run_cli(["simulated", "--quick", "--report-only", "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Label transfer (federated scANVI)" in md
    assert "| simulated | fed-scanvi > knn-scfedvi |" in md
    assert (out / "figures" / "confusion_simulated.png").stat().st_size > 1000
    assert "Label transfer (federated scANVI)" in (out / "report.html").read_text()


def test_no_section_without_results_and_a_clear_error_for_a_wrong_dir(tmp_path):
    from scfedvi.benchmark.cli import label_transfer_dir

    assert label_transfer_dir(parse(["simulated", "--out", str(tmp_path)])) is None
    args = parse(["simulated", "--out", str(tmp_path), "--label-transfer", str(tmp_path / "x")])
    with pytest.raises(ValueError, match=r"--label-transfer .*x: no results\.jsonl there"):
        label_transfer_dir(args)


def test_the_section_goes_before_the_figures():
    from scfedvi.benchmark.report import with_section

    sec = [("h2", "Label transfer (federated scANVI)")]
    b = [("h1", "x"), ("h2", "Cost"), ("h2", "Figures"), ("h2", "Configuration")]
    assert with_section(b, sec) == [*b[:2], *sec, *b[2:]]
    assert with_section(b[:2], sec) == [*b[:2], *sec]
