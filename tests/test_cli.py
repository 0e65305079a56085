"""The command line: help, errors without tracebacks, a real run on files."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from scfedvi.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "train", "embed"):
        assert cmd in out


def test_console_script_help_runs_in_a_fresh_process():
    r = subprocess.run(
        [sys.executable, "-m", "scfedvi.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0 and "--site NAME=PATH" in r.stdout


@pytest.fixture
def site_files(tmp_path, small_adata):
    a, b = small_adata[:120].copy(), small_adata[120:].copy()
    pa, pb = tmp_path / "a.h5ad", tmp_path / "b.h5ad"
    a.write_h5ad(pa)
    b.write_h5ad(pb)
    return pa, pb


def test_train_and_embed_on_files(tmp_path, site_files, capsys):
    pa, pb = site_files
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--site",
            f"lab-a={pa}",
            "--site",
            f"lab-b={pb}",
            "--batch-key",
            "batch",
            "--label-key",
            "cell_type",
            "--n-top-genes",
            "0",
            "--rounds",
            "2",
            "--local-epochs",  # 2 x 20 epochs (--rounds alone splits the default 400 in 2)
            "20",
            "--batch-size",
            "64",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    emb = ad.read_h5ad(out / "lab-a.h5ad")
    assert emb.obsm["X_scFedVI"].shape == (120, 10)
    assert (out / "model" / "model.npz").exists() and (out / "model" / "schema.json").exists()
    assert (out / "history.csv").read_text().startswith("round,site")
    # rerun without --overwrite refuses to replace outputs
    rc = main(
        [
            "train",
            "--site",
            f"lab-a={pa}",
            "--site",
            f"lab-b={pb}",
            "--batch-key",
            "batch",
            "--rounds",
            "1",
            "--batch-size",
            "64",
            "--out",
            str(out),
        ]
    )
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    # embed a site with the saved model alone
    rc = main(
        [
            "embed",
            "--model",
            str(out / "model"),
            "--input",
            str(pb),
            "--out",
            str(tmp_path / "b.emb.h5ad"),
        ]
    )
    assert rc == 0
    z = ad.read_h5ad(tmp_path / "b.emb.h5ad").obsm["X_scFedVI"]
    np.testing.assert_allclose(
        z, ad.read_h5ad(out / "lab-b.h5ad").obsm["X_scFedVI"], rtol=1e-4, atol=1e-4
    )
    # a site whose raw counts are in a layer, X log-transformed: the error names the site (the
    # file's name) and the option; with --layer it embeds the same
    b = ad.read_h5ad(pb)
    b.layers["counts"] = b.X.copy()
    b.X = np.log1p(b.X.toarray())
    pl = tmp_path / "lab-c.h5ad"
    b.write_h5ad(pl)
    args = ["embed", "--model", str(out / "model"), "--input", str(pl), "--out"]
    capsys.readouterr()
    assert main([*args, str(tmp_path / "c1.h5ad")]) == 2
    err = capsys.readouterr().err
    assert "site 'lab-c'" in err and err.rstrip().endswith("on the command line: --layer NAME")
    assert main([*args, str(tmp_path / "c2.h5ad"), "--layer", "counts"]) == 0
    np.testing.assert_allclose(
        ad.read_h5ad(tmp_path / "c2.h5ad").obsm["X_scFedVI"], z, rtol=1e-5, atol=1e-5
    )


def test_embed_refuses_to_overwrite_its_input(tmp_path, site_files, capsys):
    pa, _ = site_files
    rc = main(["embed", "--model", str(tmp_path), "--input", str(pa), "--out", str(pa)])
    assert rc == 2 and "replace an input file" in capsys.readouterr().err


def test_bad_input_gives_a_clear_error_not_a_traceback(tmp_path, small_adata, capsys):
    bad = small_adata.copy()
    bad.X = np.log1p(bad.X.toarray())  # log-normalized by mistake
    p = tmp_path / "bad.h5ad"
    bad.write_h5ad(p)
    ok = tmp_path / "ok.h5ad"
    small_adata.write_h5ad(ok)
    rc = main(
        [
            "train",
            "--site",
            f"lab-bad={p}",
            "--site",
            f"lab-ok={ok}",
            "--batch-key",
            "batch",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "lab-bad" in err and "Traceback" not in err
    assert "log-transformed" in err and err.rstrip().endswith("on the command line: --layer NAME")
    rc = main(
        ["train", "--site", f"lab-ok={ok}", "--batch-key", "tech", "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert (
        rc == 2 and "tech" in err and "batch" in err
    )  # names the missing column and the ones there


def test_site_spec_errors(tmp_path, capsys):
    assert main(["train", "--site", "nopath", "--batch-key", "b", "--out", str(tmp_path)]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--site",
                f"a={tmp_path / 'missing.h5ad'}",
                "--batch-key",
                "b",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err


def test_benchmark_and_flower_commands_are_wired(tmp_path, small_adata, capsys):
    p = tmp_path / "mine.h5ad"
    small_adata.write_h5ad(p)
    rc = main(
        [
            "benchmark",
            str(p),
            "--batch-key",
            "batch",
            "--label-key",
            "no_such_column",
            "--quick",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "no_such_column" in err and "Traceback" not in err
    assert main(["flower", str(tmp_path / "app")]) == 0
    assert "[tool.flwr.app.components]" in (tmp_path / "app" / "pyproject.toml").read_text()
    assert main(["flower", str(tmp_path / "app")]) == 2  # never overwritten without --overwrite


def test_train_prints_and_stores_the_schedule(tmp_path, site_files, capsys):
    """--max-epochs/--rounds/--n-jobs/--accelerator reach the run; the schedule is printed
    and written to summary.json."""
    import json

    pa, pb = site_files
    out = tmp_path / "run"
    args = ["train", "--site", f"lab-a={pa}", "--site", f"lab-b={pb}", "--batch-key", "batch"]
    args += ["--n-top-genes", "0", "--batch-size", "32", "--out", str(out), "--no-progress"]
    args += ["--max-epochs", "4", "--rounds", "2", "--n-jobs", "2", "--accelerator", "cpu"]
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "schedule: 4 epochs = 2 rounds x 2 local epochs per site (max_epochs" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schedule"]["local_epochs"] == 2 and summary["rounds_trained"] == 2
    assert summary["config"]["federation"]["n_jobs"] == 2
    assert summary["config"]["train"]["accelerator"] == "cpu"
    rc = main([*args[:-8], "--early-stopping", "--patience", "0", "--overwrite"])
    assert rc == 2 and "early_stopping_patience must be >= 1" in capsys.readouterr().err


def test_a_site_file_that_is_not_h5ad_names_the_site_and_path(tmp_path, site_files, capsys):
    """A text file, a truncated .h5ad, an HDF5 file that is not AnnData: one line each, naming
    the site and the path, no traceback (before: h5py's 'file signature not found')."""
    import h5py

    pa, pb = site_files
    notes = tmp_path / "notes.txt"
    notes.write_text("gene,cell-1\nACTB,3\n")
    truncated = tmp_path / "cut.h5ad"
    truncated.write_bytes(pb.read_bytes()[: pb.stat().st_size // 2])
    other = tmp_path / "filtered_feature_bc_matrix.h5"
    with h5py.File(other, "w") as f:
        f.create_group("matrix")["data"] = np.arange(3)
    cases = [
        (notes, "is not an .h5ad file", "anndata.read_text"),
        (truncated, "is truncated", "write it again"),
        (other, "anndata cannot read as AnnData", "scanpy.read_10x_h5"),
    ]
    for path, what, fix in cases:
        argv = ["train", "--site", f"a={pa}", "--site", f"lab-x={path}", "--batch-key", "batch"]
        rc = main([*argv, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"site 'lab-x': {path}" in err and what in err and fix in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    rc = main(
        ["embed", "--model", str(tmp_path), "--input", str(notes), "--out", str(tmp_path / "e")]
    )
    assert rc == 2  # (no model there: the model is checked first; the reader is shared)
