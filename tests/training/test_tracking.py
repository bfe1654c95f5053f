"""MLflow tracking: URI resolution, and failures that never kill training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from apt_model.training.tracking import Tracker, flatten_params, resolve_tracking_uri


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path / "run") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert resolve_tracking_uri(None, tmp_path / "run") == "sqlite:///x.db"
    assert resolve_tracking_uri("none", tmp_path) is None and resolve_tracking_uri("OFF", tmp_path) is None
    assert resolve_tracking_uri("http://h:5000", tmp_path) == "http://h:5000"


def test_flatten_params() -> None:
    assert flatten_params("train", {"lr": 0.1, "dbc_dac": {"enabled": True}}) == {
        "train.lr": "0.1",
        "train.dbc_dac.enabled": "True",
    }


def test_broken_tracking_warns_and_switches_off(caplog: pytest.LogCaptureFixture) -> None:
    t = Tracker("bogus-scheme://nowhere", "apt")
    with caplog.at_level(logging.WARNING):
        assert t.start({"a": "1"}, {}) is None
    assert not t.active and t.error and "start" in t.error
    assert "MLflow tracking disabled" in caplog.text
    t.log_metrics({"x": 1.0}, step=1)  # no-ops, no exceptions
    t.end()


def test_disabled_tracker_does_nothing() -> None:
    t = Tracker(None, "apt")
    assert t.start({}, {}) is None and not t.active and t.error is None
