"""The coordinator's progress log and a failed run's report, without Flower processes."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from scfedvi.flower.progress import Progress


def _rows(r: int, losses: dict[str, float], dropped: tuple[str, ...] = ()) -> list[dict]:
    rows: list[dict] = [
        {
            "round": r,
            "site": s,
            "status": "ok",
            "loss": v,
            "seconds": 2.0 + i,
            "bytes_up": 1_000_000,
            "bytes_down": 2_000_000,
        }
        for i, (s, v) in enumerate(sorted(losses.items()))
    ]
    return rows + [{"round": r, "site": s, "status": "dropped", "bytes_down": 2e6} for s in dropped]


def test_round_line_names_sites_losses_seconds_bytes_and_time_left(caplog):
    p = Progress(n_rounds=5)
    with caplog.at_level(logging.INFO):
        p.round_done(0, _rows(0, {"lab-a": 10.0, "lab-b": 12.0}), {}, seconds=30.0)
        failed = {"lab-b": "site 'lab-b': data-path /x.h5ad does not exist"}
        info = p.round_done(1, _rows(1, {"lab-a": 9.0}, ("lab-b",)), failed, seconds=8.0)
    first, second = caplog.messages
    assert first.startswith("round 1/5: 2 sites answered, missing none;")
    assert "lab-a loss 10.0 in 2.0 s, lab-b loss 12.0 in 3.0 s" in first
    assert "4.00 MB down, 2.00 MB up" in first
    assert "round 2/5: 1 sites answered, missing lab-b: site 'lab-b': data-path" in second
    # time left: 3 rounds at the mean of the rounds after the first (which pays the start-up)
    assert info["eta_s"] == pytest.approx(24.0) and "about 24 s left" in second
    assert info["sites"] == {"lab-a": {"loss": 9.0, "seconds": 2.0}}
    assert info["missing"] == failed and info["bytes_down"] == 2e6
    json.dumps(info)  # written into result.json as is


def test_failure_names_the_failed_sites_and_reasons():
    p = Progress(n_rounds=3, run_id=7)
    p.round_done(0, _rows(0, {"a": 1.0, "b": 1.0}), {}, 1.0)
    p.stage = "round 1"
    p.failed(1, {"b": "no reply within 60 s", "c": "site 'c': data-path /c.h5ad does not exist"})
    f = p.failure()
    assert f["stage"] == "round 1" and f["rounds_done"] == 1
    assert f["failed_sites"] == {
        "b": "no reply within 60 s",
        "c": "site 'c': data-path /c.h5ad does not exist",
    }
    assert [(d["round"], d["site"]) for d in f["dropped"]] == [(1, "b"), (1, "c")]


def test_failed_run_writes_the_sites_and_reasons_into_result_json(tmp_path, monkeypatch):
    """The ServerApp's ``main``: a round with too few sites fails the run; ``result.json``
    says so, with the error, the stage and the failed sites' reasons."""
    from scfedvi.flower import server_app
    from scfedvi.flower.settings import default_run_config

    def fail(grid, cfg, app, progress):
        progress.stage = "round 0"
        progress.failed(0, {"lab-b": "site 'lab-b': obs['batch'] is missing"})
        raise RuntimeError("round 0: 1 valid site updates, fewer than min_sites=2")

    monkeypatch.setattr(server_app, "run_federation", fail)
    run_config = {**default_run_config(), "out-dir": str(tmp_path)}
    context = SimpleNamespace(run_config=run_config, run_id=42)
    with pytest.raises(RuntimeError):
        server_app.main(None, context)  # type: ignore[arg-type]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "failed" and result["run_id"] == 42
    assert "fewer than min_sites" in result["error"] and result["stage"] == "round 0"
    assert result["failed_sites"] == {"lab-b": "site 'lab-b': obs['batch'] is missing"}
