"""``scfedvi benchmark --quick`` end to end: simulated data, the real pancreas, an own .h5ad."""

from __future__ import annotations

import json
import re

import pytest

from scfedvi.benchmark.methods import DEFAULT_METHODS, METHODS

from .conftest import parse, read_results, run_cli

LABELS = [METHODS[m].label for m in DEFAULT_METHODS]


def _paper_table(md: str, title: str) -> list[str]:
    """The lines of the Markdown table under the caption ``title``."""
    block = md.split(f"**{title}**", 1)[1].strip().split("\n\n", 1)[0]
    return [ln for ln in block.splitlines() if ln.startswith("|")]


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-sim")
    argv = ["simulated", "--quick", "--clients", "2,3", "--out", str(out)]
    assert run_cli(argv) == 0
    return out, argv


@pytest.mark.scvi
@pytest.mark.slow
def test_simulated_quick_writes_results_and_reports(simulated_run):
    out, _ = simulated_run
    res = read_results(out)
    assert len(res) == len(DEFAULT_METHODS) * 2
    assert set(res["n_sites"]) == {2, 3} and set(res["method"]) == set(DEFAULT_METHODS)
    for col in (
        "batch_lisi_mean",
        "batch_lisi_sd",
        "celltype_lisi_mean",
        "celltype_lisi_sd",
        "scib: Total",
        "scib: Bio conservation",
        "scib: Batch correction",
        "scib: cLISI",
        "train_seconds",
        "bytes",
    ):
        assert col in res and res[col].notna().any(), col
    fed = res["method"].isin(["scfedvi", "fedavg"])
    assert (res.loc[fed, "bytes"] > 0).all() and res.loc[~fed, "bytes"].isna().all()
    assert res["batch_lisi_mean"].between(1, 6).all()

    md = (out / "report.md").read_text()
    lines = _paper_table(md, "simulated: batch LISI (batch = batch)")
    assert lines[0].split("|")[1:-1] == [" method ", " 2 sites ", " 3 sites "]
    rows = {ln.split("|")[1].strip(): ln for ln in lines[2:]}
    assert list(rows) == LABELS
    assert all(ln.count("±") == 2 for ln in rows.values())
    for section in ("scIB metrics", "Cost: training time", "Configuration", "Versions"):
        assert section in md
    assert "scfedvi benchmark simulated --clients 2,3" in md
    # the time ratio pairs scFedVI with pooled scVI seed by seed, both timed in this run
    timing = _paper_table(md, next(t for t in md.split("**") if t.startswith("Federated training")))
    assert "ratio per seed" in timing[0]
    ratio_rows = [ln for ln in timing[2:] if "| scFedVI |" in ln]
    assert len(ratio_rows) == 2 and not any("*" in ln for ln in ratio_rows)
    assert all("(n=1)" in ln for ln in ratio_rows)
    for fig in ("umap_simulated_2sites", "training_curves", "quality_vs_communication"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000

    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and 'src="figures' not in html
    for name in ("scvi-tools", "torch", "flwr", "scanpy", "python", "scfedvi"):
        assert f"<td>{name}</td>" in html
    assert (out / "curves.csv").exists() and (out / "histories.csv").exists()


@pytest.mark.scvi
@pytest.mark.slow
def test_rerun_computes_nothing_and_new_seed_only_its_jobs(simulated_run):
    from scfedvi.benchmark.cli import settings_from_args
    from scfedvi.benchmark.runner import run_benchmark

    out, argv = simulated_run
    again = run_benchmark(settings_from_args(parse(argv)), out)
    assert again.computed == {"embeddings": 0, "evaluations": 0}
    assert len(again.results) == len(DEFAULT_METHODS) * 2 and not again.missing
    # A new seed of a pooled method: one job, shared by both numbers of sites; an evaluation
    # with the scIB metrics serves a run without them.
    more = [*argv, "--seeds", "0,1", "--methods", "pca,harmony", "--no-scib"]
    run = run_benchmark(settings_from_args(parse(more)), out)
    assert run.computed == {"embeddings": 2, "evaluations": 2}
    assert len(run.results) == 8 and run.results["scib: Total"].notna().sum() == 4


@pytest.mark.scvi
@pytest.mark.slow
def test_pancreas_subsample_quick(tmp_path, data_dir):
    out = tmp_path / "pancreas"
    methods = "scfedvi,fedavg,pca"  # scvi-per-site: the simulated run covers it
    argv = ["pancreas", "--quick", "--no-scib", "--methods", methods, "--out", str(out)]
    assert run_cli(argv) == 0
    res = read_results(out)
    assert len(res) == 3 * 3 and set(res["n_sites"]) == {2, 3, 5}
    assert (res["n_cells"] == 300).all() and "scib: Total" not in res
    md = (out / "report.md").read_text()
    for metric in ("batch LISI (batch = donor)", "cell-type LISI (batch = donor)"):
        lines = _paper_table(md, f"pancreas: {metric}")
        assert [c.strip() for c in lines[0].split("|")[1:-1]] == [
            "method",
            "2 sites",
            "3 sites",
            "5 sites",
        ]
        assert len(lines) == 2 + 3 and all(ln.count("±") == 3 for ln in lines[2:])
    assert "as published in the scFedVI paper" in md
    assert "segerstolpe-HP1504101T2D" in md and "baron-human2" in md  # the paper partitions


def test_own_h5ad_with_custom_keys_and_partition_file(tmp_path, own_h5ad):
    out = tmp_path / "own"
    part = tmp_path / "sites.json"
    part.write_text(json.dumps({"left": ["batch-0", "batch-1"], "right": ["batch-2"]}))
    argv = [
        str(own_h5ad),
        "--batch-key",
        "lab",
        "--label-key",
        "ctype",
        "--partition",
        str(part),
        "--methods",
        "pca,harmony",
        "--no-scib",
        "--out",
        str(out),
    ]
    assert run_cli(argv) == 0
    res = read_results(out)
    assert set(res["dataset"]) == {"own"} and set(res["n_sites"]) == {2}
    assert (res["batch_key"] == "lab").all() and (res["n_cells"] < 320).all()  # batch-3 left out
    md = (out / "report.md").read_text()
    assert "partition: own, 2 sites" in md and re.search(
        r"\| left \| \d+ \| batch-0, batch-1 \|", md
    )


@pytest.mark.scvi
@pytest.mark.slow
def test_report_only_reuses_results_of_other_code_flagged(simulated_run, monkeypatch):
    from scfedvi.benchmark import plan as plan_module
    from scfedvi.benchmark.cli import settings_from_args
    from scfedvi.benchmark.report import build_blocks
    from scfedvi.benchmark.runner import run_benchmark

    out, argv = simulated_run
    real = plan_module.source_hash
    monkeypatch.setattr(  # another version of the core code, the same metrics code
        plan_module,
        "source_hash",
        lambda *parts: "another-version" if parts == plan_module.CORE_CODE else real(*parts),
    )
    settings = settings_from_args(parse(argv))
    run = run_benchmark(settings, out, compute=False)
    assert run.computed == {"embeddings": 0, "evaluations": 0} and not run.missing
    flagged = set(run.results.loc[run.results["other_code"], "method"])
    assert flagged == {"scfedvi", "fedavg"}  # the baselines do not depend on scfedvi's core
    text = " ".join(str(b[1]) for b in build_blocks(run, settings, out, "cmd", 0.0) if b[0] == "p")
    assert "4 of 12 results were computed with another version" in text


@pytest.mark.slow
def test_parallel_jobs_give_the_same_results(tmp_path, own_h5ad):
    keys = [str(own_h5ad), "--batch-key", "lab", "--label-key", "ctype", "--clients", "2,3"]
    keys += ["--methods", "pca,harmony", "--no-scib"]
    assert run_cli([*keys, "--jobs", "2", "--out", str(tmp_path / "par")]) == 0
    assert run_cli([*keys, "--out", str(tmp_path / "seq")]) == 0
    par, seq = read_results(tmp_path / "par"), read_results(tmp_path / "seq")
    cols = ["batch_lisi_mean", "celltype_lisi_mean", "celltype_lisi_sd"]
    assert len(par) == 4 and par[cols].round(6).equals(seq[cols].round(6))
    # pooled methods do not depend on the partition: one UMAP figure, at the fewest sites
    assert [f.name for f in (tmp_path / "par" / "figures").glob("umap_*")] == [
        "umap_own_2sites.png"
    ]
