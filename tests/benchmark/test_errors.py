"""Bad input: errors that name the field, the site and the fix, before any training."""

from __future__ import annotations

import pytest

from scfedvi.benchmark.cli import settings_from_args
from scfedvi.benchmark.runner import plan

from .conftest import parse


def _plan(argv):
    return plan(settings_from_args(parse(argv)))


def test_missing_label_key_names_the_column_and_the_option(own_h5ad, tmp_path):
    with pytest.raises(ValueError, match=r"obs\['celltype'\] \(--label-key\) is missing.*'ctype'"):
        _plan(
            [str(own_h5ad), "--batch-key", "lab", "--label-key", "celltype", "--out", str(tmp_path)]
        )


def test_more_clients_than_batches(own_h5ad, tmp_path):
    with pytest.raises(
        ValueError, match=r"--clients 5: obs\['lab'\] has only 4 batches.*at most 4"
    ):
        _plan(
            [
                str(own_h5ad),
                "--batch-key",
                "lab",
                "--label-key",
                "ctype",
                "--clients",
                "2,5",
                "--out",
                str(tmp_path),
            ]
        )


def test_own_h5ad_needs_its_keys(own_h5ad, tmp_path):
    with pytest.raises(ValueError, match="pass --batch-key and --label-key"):
        settings_from_args(parse([str(own_h5ad), "--out", str(tmp_path)]))


def test_unknown_method_and_dataset(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method\(s\) 'scanvi'; choose from scfedvi"):
        settings_from_args(parse(["simulated", "--methods", "pca,scanvi", "--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="not a known name"):
        settings_from_args(parse(["lung", "--out", str(tmp_path)]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        settings_from_args(parse([str(tmp_path / "x.h5ad"), "--out", str(tmp_path)]))


def test_bad_partition_file(own_h5ad, tmp_path):
    keys = ["--batch-key", "lab", "--label-key", "ctype", "--out", str(tmp_path)]
    bad = tmp_path / "p.json"
    bad.write_text('{"a": ["batch-0"], "b": ["lab-x"]}')
    with pytest.raises(ValueError, match=r"site 'b': obs\['lab'\] has no value 'lab-x'"):
        _plan([str(own_h5ad), "--partition", str(bad), *keys])
    bad.write_text("not json")
    with pytest.raises(ValueError, match="cannot read it as JSON"):
        _plan([str(own_h5ad), "--partition", str(bad), *keys])


def test_paper_partition_sizes(tmp_path, data_dir):
    with pytest.raises(ValueError, match=r"2, 3 or 5 sites.*--partition auto"):
        _plan(["pancreas", "--quick", "--clients", "4", "--out", str(tmp_path)])


def test_bad_numbers_are_parse_errors(tmp_path):
    with pytest.raises(SystemExit):
        parse(["simulated", "--clients", "two", "--out", str(tmp_path)])


def _keys(path, tmp_path, *extra):
    argv = [str(path), "--batch-key", "lab", "--label-key", "ctype", "--clients", "2", *extra]
    return [*argv, "--out", str(tmp_path)]


def test_log_transformed_counts_name_the_dataset_and_the_layer_option(own_h5ad, tmp_path):
    import anndata as ad
    import numpy as np

    a = ad.read_h5ad(own_h5ad)
    a.X = np.log1p(a.X)
    path = tmp_path / "logged.h5ad"
    a.write_h5ad(path)
    with pytest.raises(
        ValueError,
        match=r"dataset 'logged': X contains \d+ non-integer values.*log-transformed.*"
        r"--layer NAME",
    ):
        _plan(_keys(path, tmp_path))


def test_counts_in_a_layer_are_read_with_layer(own_h5ad, tmp_path):
    """``--layer counts`` reads the raw counts of a file whose X is normalized: the plan (data
    fingerprints, genes, keys) equals that of the same counts stored in X."""
    import anndata as ad
    import numpy as np

    a = ad.read_h5ad(own_h5ad)
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X)
    path = tmp_path / "own.h5ad"  # the same name: the same data set name
    (tmp_path / "x").mkdir()
    a.write_h5ad(tmp_path / "x" / "own.h5ad")
    with_layer = _plan(_keys(tmp_path / "x" / "own.h5ad", tmp_path, "--layer", "counts"))[0]
    in_x = _plan(_keys(own_h5ad, tmp_path))[0]
    assert [job.key for _, job in with_layer] == [job.key for _, job in in_x]
    with pytest.raises(
        ValueError, match=r"dataset 'own': layers\['raw'\] \(--layer\) is missing.*'counts'"
    ):
        _plan(_keys(tmp_path / "x" / "own.h5ad", tmp_path, "--layer", "raw"))
    with pytest.raises(ValueError, match=r"--layer applies to your own \.h5ad"):
        settings_from_args(parse(["cortex", "--layer", "counts", "--out", str(tmp_path)]))
    assert path.exists()  # the fixture's file is untouched
