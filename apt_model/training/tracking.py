"""MLflow experiment tracking — optional and failure-tolerant.

Where runs go: ``TrainRequest.tracking_uri`` when given, else the ``MLFLOW_TRACKING_URI`` environment variable,
else a local SQLite store ``sqlite:///<out_dir's parent>/mlflow.db`` (so the runs of sibling output folders share
one store and one MLflow UI: ``mlflow ui --backend-store-uri sqlite:///<dir>/mlflow.db``). For an experiment this
module creates in a SQLite store, artifacts go to ``<db folder>/mlartifacts``. A URI of ``none``/``off``/
``disabled`` (or an empty string) turns tracking off.

What is logged: the model/train/data configs as flattened params, per-epoch metrics (train_loss, val_loss,
val_token_acc, lr, grad_norm, tokens_per_s, epoch_seconds), tags (backend, dataset sha256), and at the end the
experiment report and the final export as artifacts.

Tracking must never kill training: every MLflow call is guarded; the first failure is logged as a warning and
tracking switches itself off for the rest of the run (``Tracker.error`` keeps the reason). ``mlflow`` is imported
lazily (it costs seconds) and only when tracking is on.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

DISABLED_URIS = ("", "none", "off", "disabled", "false")
METRIC_KEYS = ("train_loss", "val_loss", "val_token_acc", "lr", "grad_norm", "tokens_per_s", "epoch_seconds")

R = TypeVar("R")


def resolve_tracking_uri(requested: str | None, out_dir: str | Path) -> str | None:
    """The tracking URI to use, or ``None`` when tracking is off."""
    uri = requested if requested is not None else os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        db = Path(out_dir).resolve().parent / "mlflow.db"
        return f"sqlite:///{db}"
    if uri.strip().lower() in DISABLED_URIS:
        return None
    return uri


def flatten_params(prefix: str, d: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten_params(name, value))
        else:
            out[name] = str(value)[:500]  # MLflow caps param values
    return out


class Tracker:
    """A guarded MLflow run. All methods are no-ops once disabled or after the first failure."""

    def __init__(self, uri: str | None, experiment: str, run_name: str | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = None
        self.error: str | None = None
        self._client: Any = None
        self._owns_run = True  # False when logging into a run a hosting service created (MLFLOW_RUN_ID)

    @property
    def active(self) -> bool:
        return self.uri is not None and self.error is None

    def _guard(self, what: str, fn: Callable[[], R]) -> R | None:
        if not self.active:
            return None
        try:
            return fn()
        except Exception as exc:
            self.error = f"{what}: {exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log.warning("MLflow tracking disabled for this run (%s)", self.error)
            return None

    def start(
        self, params: dict[str, str], tags: dict[str, str], resume_run_id: str | None = None
    ) -> str | None:
        def _start() -> str:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.uri)
            self._client = client

            def log_params(run_id: str) -> None:
                items = list(params.items())
                for i in range(0, len(items), 100):  # log_batch caps at 100 params per call
                    client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])

            if resume_run_id:
                try:
                    run = client.get_run(resume_run_id)
                    client.update_run(run.info.run_id, status="RUNNING")
                    return run.info.run_id
                except Exception:
                    log.info("MLflow run %s not found in %s; starting a new run", resume_run_id, self.uri)
            hosted = os.environ.get("MLFLOW_RUN_ID")
            if hosted:
                # A hosted job (Azure ML sets MLFLOW_RUN_ID per job and sweep trial): log into that run, so the
                # service sees the metrics it ranks trials by; the service owns its lifecycle.
                self._owns_run = False
                log_params(hosted)
                return hosted
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                location = None
                if self.uri and self.uri.startswith("sqlite:///"):
                    location = (Path(self.uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
                exp_id = client.create_experiment(self.experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            run = client.create_run(exp_id, run_name=self.run_name, tags=tags)
            log_params(run.info.run_id)
            return run.info.run_id

        self.run_id = self._guard("start", _start)
        return self.run_id

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        def _log() -> None:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            batch = [
                Metric(k, float(v), ts, step)
                for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            ]
            if batch and self.run_id:
                self._client.log_batch(self.run_id, metrics=batch)

        self._guard("log_metrics", _log)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)

        def _log() -> None:
            if p.is_dir():
                self._client.log_artifacts(self.run_id, str(p), artifact_path=artifact_path)
            elif p.is_file():
                self._client.log_artifact(self.run_id, str(p), artifact_path=artifact_path)

        if self.run_id:
            self._guard("log_artifact", _log)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id and self._owns_run:
            self._guard("end", lambda: self._client.set_terminated(self.run_id, status=status))
