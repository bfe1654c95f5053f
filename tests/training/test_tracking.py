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


@pytest.mark.slow
def test_hosted_run_id_is_used_and_left_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Azure ML sets MLFLOW_RUN_ID per job/trial: metrics must land on that run, whose lifecycle the service owns."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    hosted = client.create_run(client.create_experiment("hosted")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", hosted)
    tracker = Tracker(uri, "apt")
    assert tracker.start({"lr": "0.1"}, {}) == hosted
    tracker.log_metrics({"val_loss": 1.5}, step=1)
    tracker.end("FINISHED")
    run = client.get_run(hosted)
    assert run.data.metrics["val_loss"] == 1.5 and run.data.params["lr"] == "0.1"
    assert run.info.status == "RUNNING"  # not terminated by us
