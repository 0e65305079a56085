"""The label-transfer report: tables and targets from results.jsonl, the confusion figure."""

from __future__ import annotations

import json

import pytest

from scfedvi.report.label_transfer import accuracy_table, load_results, main, targets

POOLED = {"classifier_stats": "pooled"}


def _row(method, seed, hidden, acc, annotate=POOLED, **kw):
    return {
        "dataset": "cortex",
        "seed": seed,
        "hidden": hidden,
        "method": method,
        "epochs": 100,
        "anvi_epochs": 10,
        "accuracy": acc,
        "macro_f1": acc - 0.1,
        "annotate": annotate,
        "versions": {"scfedvi": "0"},
        **kw,
    }


@pytest.fixture
def results(tmp_path):
    cm = {"true": ["A", "B"], "predicted": ["A", "B"], "counts": [[8, 2], [1, 9]]}
    rows = [
        _row("fed-scanvi", 0, "s1", 0.50, {"classifier_stats": "site"}),  # an earlier default
        _row("fed-scanvi", 0, "s1", 0.90, confusion=cm),
        _row("fed-scanvi", 1, "s1", 0.80, confusion=cm),
        _row("fed-scanvi", 1, "s1", 0.99, {**POOLED, "n_rounds": 20}),  # a variant
        _row("pooled-scanvi", 0, "s1", 0.95),
        _row("pooled-scanvi", 1, "s1", 0.85),
        _row("knn-scfedvi", 0, "s1", 0.84),
        _row("knn-scfedvi", 1, "s1", 0.80),
        _row("new-site-frozen", 0, "s1", 0.86),
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_tables_and_targets_pair_runs_and_keep_the_ablation_apart(results):
    df = load_results(results)
    t = accuracy_table(df).set_index("method")
    assert t.loc["fed-scanvi", "accuracy"] == "0.850 (0.050)"
    assert t.loc["fed-scanvi (classifier_stats=site)", "accuracy"] == "0.500 (0.000)"
    assert t.loc["fed-scanvi (n_rounds=20)", "accuracy"] == "0.990 (0.000)"
    assert t.loc["fed-scanvi", "runs"] == "2 (1 sites x 2 seeds)"
    tg = targets(df).set_index("target")
    assert tg.loc["fed-scanvi >= pooled-scanvi - 0.02", "met"] == "no"  # 0.85 vs 0.90
    assert tg.loc["fed-scanvi > knn-scfedvi", "met"] == "yes"  # 0.85 vs 0.82
    row = tg.loc["new-site-frozen >= fed-scanvi - 0.03"]  # paired: seed 0 only
    assert (row["mean accuracy"], row["runs"], row["met"]) == ("0.860 vs 0.900", 1, "no")


def test_main_writes_the_report_and_the_confusion_figure(results, capsys):
    assert main([str(results)]) == 0
    md = (results / "report.md").read_text()
    assert "| cortex | fed-scanvi | 0.850 (0.050)" in md
    assert (results / "confusion_cortex.png").stat().st_size > 1000
    assert "confusion_cortex.png" in md and "Label transfer" in capsys.readouterr().out


def test_missing_results_name_the_benchmark(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run benchmarks/label_transfer\.py first"):
        load_results(tmp_path)
