"""experiment_report.json: documented keys, atomic rewrite, JSON-safe floats, history round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apt_model.training.report import EPOCH_KEYS, SCHEMA_VERSION, ExperimentReport, json_float, read_report

TOP_KEYS = {
    "schema_version", "backend", "status", "started_at", "updated_at", "config", "dataset", "runtime",
    "epochs", "batch_losses", "nan_events", "checkpoints", "final", "schedule",
}  # fmt: skip


def _row(epoch: int) -> dict:
    return dict.fromkeys(EPOCH_KEYS, 0.5) | {"epoch": epoch, "global_step": 10 * epoch, "skipped_steps": 0}


def test_report_schema_and_round_trip(tmp_path: Path) -> None:
    r = ExperimentReport("playground", {"model": {}, "train": {}, "data": {}}, {"path": "x"}, {"kind": "k"})
    r.add_epoch(_row(1) | {"extra": 1})
    r.batch_losses.append([1, 2.5])
    path = r.write(tmp_path / "experiment_report.json")
    d = read_report(path)
    assert set(d) == TOP_KEYS and d["schema_version"] == SCHEMA_VERSION and d["status"] == "running"
    assert set(d["epochs"][0]) == set(EPOCH_KEYS)  # unknown keys dropped
    r2 = ExperimentReport("playground", {}, {}, {})
    r2.restore_history(json.loads(json.dumps(r.history())))
    assert r2.epochs == r.epochs and r2.batch_losses == r.batch_losses and r2.started_at == r.started_at
    with pytest.raises(ValueError):
        r.add_epoch({"epoch": 2})
    r.status = "bogus"
    with pytest.raises(ValueError):
        r.write(path)
    assert read_report(path)["status"] == "running"  # a failed write leaves the previous report


def test_json_float() -> None:
    assert json_float(float("nan")) == "nan" and json_float(float("-inf")) == "-inf"
    assert json_float(1.5) == 1.5 and json_float(None) is None
