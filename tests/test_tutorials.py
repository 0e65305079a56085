"""The tutorials (``docs/tutorials/*.ipynb``) run, top to bottom, with the current code.

They are committed without outputs and are not executed by the docs build; this test executes
each in a fresh kernel inside a temporary folder (the files they write land there), so a
tutorial that drifts from the API fails here. Marked ``slow``: about a minute each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.ipynb"))


def test_tutorials_found() -> None:
    assert {p.name for p in TUTORIALS} >= {"quickstart.ipynb", "own_sites.ipynb"}


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_is_committed_without_outputs(path: Path) -> None:
    nb = json.loads(path.read_text(encoding="utf-8"))
    dirty = [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"


def _execute(path: Path, workdir: Path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(path, as_version=4)
    # the test's own interpreter, whatever kernels are installed elsewhere
    from jupyter_client.kernelspec import NATIVE_KERNEL_NAME

    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name=NATIVE_KERNEL_NAME,
        resources={"metadata": {"path": str(workdir)}},
    )
    assert Path(sys.executable).exists()
    client.execute()
    return nb


def _text(nb, index: int) -> str:
    out = []
    for o in nb.cells[index].get("outputs", []):
        out.append(o.get("text", ""))
        out.append(o.get("data", {}).get("text/plain", ""))
    return "".join(out)


@pytest.mark.slow
def test_quickstart_runs(tmp_path: Path) -> None:
    nb = _execute(ROOT / "docs" / "tutorials" / "quickstart.ipynb", tmp_path)
    assert (tmp_path / "quickstart_umap.png").stat().st_size > 10_000
    table = next(_text(nb, i) for i in range(len(nb.cells)) if "scVI per site" in _text(nb, i))
    assert "scFedVI" in table and "batch LISI" in table


@pytest.mark.slow
def test_own_sites_runs(tmp_path: Path) -> None:
    nb = _execute(ROOT / "docs" / "tutorials" / "own_sites.ipynb", tmp_path)
    texts = [_text(nb, i) for i in range(len(nb.cells))]
    error = next(t for t in texts if "SiteDataError" in t)
    assert "site 'lab-b'" in error and "non-integer" in error and "layer=" in error
    assert (tmp_path / "run1" / "model").is_dir()
    assert any("cell types recovered" in t for t in texts)
    assert any("SCVI (" in t for t in texts)
