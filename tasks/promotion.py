"""Champion/challenger promotion through the MLflow model registry — no Prefect here, so it is unit-tested alone.

Rule: the candidate becomes ``champion`` only when its verification gate passed **and** its exact-match accuracy,
measured on the same dataset split as the current champion is re-measured on now, is not below the champion's
(minus ``tolerance``). Every candidate is registered as a model version with tag ``outcome`` = ``promoted`` or
``rejected`` (and the reason), and an MLflow run records the comparison — so both outcomes are visible in MLflow.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CHAMPION_ALIAS = "champion"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: str
    candidate: float
    champion: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    candidate: float,
    gate_passed: bool,
    champion: float | None,
    *,
    tolerance: float = 0.0,
    metric: str = "exact",
) -> Decision:
    if not gate_passed:
        return Decision(False, "verification gate missed", metric, candidate, champion)
    if champion is None:
        return Decision(True, "no champion yet", metric, candidate, None)
    if candidate + tolerance < champion:
        return Decision(
            False,
            f"{metric} {candidate:.4f} is below the champion's {champion:.4f}",
            metric,
            candidate,
            champion,
        )
    return Decision(
        True, f"{metric} {candidate:.4f} >= champion's {champion:.4f}", metric, candidate, champion
    )


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # Artifacts beside the database, never in the current directory.
        location = (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def get_champion(tracking_uri: str, model_name: str) -> dict[str, Any] | None:
    """The current champion's model version (name, version, source, tags), or None."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        mv = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException:
        return None
    return {
        "name": model_name,
        "version": str(mv.version),
        "source": mv.source,
        "run_id": mv.run_id,
        "tags": dict(mv.tags or {}),
    }


def download_champion(champion: dict[str, Any], dest_root: Path) -> dict[str, Any]:
    """Fetch the champion's files (export + final_model.pt) into ``dest_root/<name>-v<version>`` once."""
    import mlflow.artifacts

    from apt_model.io import sha256_file

    dest = dest_root / f"{champion['name']}-v{champion['version']}"
    if not (dest / "config.json").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=dest.parent))
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(artifact_uri=champion["source"], dst_path=str(tmp))
            )
            shutil.rmtree(dest, ignore_errors=True)
            local.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    ckpt = dest / "final_model.pt"
    return {
        **champion,
        "dir": str(dest),
        "checkpoint": str(ckpt) if ckpt.is_file() else None,
        "sha256": sha256_file(ckpt) if ckpt.is_file() else champion["tags"].get("sha256", ""),
        "epochs": int(champion["tags"].get("epochs_completed", 0) or 0),
    }


def register_candidate(
    tracking_uri: str,
    *,
    experiment: str,
    model_name: str,
    trained: dict[str, Any],
    verification: dict[str, Any],
    decision: Decision,
    champion: dict[str, Any] | None,
    run_name: str,
) -> dict[str, Any]:
    """Log the comparison as an MLflow run, register the model version, tag the outcome, move the alias if promoted."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, experiment)
    outcome = "promoted" if decision.promote else "rejected"
    tags = {
        "apt.stage": "promotion",
        "apt.outcome": outcome,
        "apt.reason": decision.reason,
        "apt.model_name": model_name,
        "apt.train_run_id": trained.get("mlflow_run_id") or "",
        "apt.champion_version": (champion or {}).get("version", ""),
    }
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    client.log_metric(run_id, "candidate_exact", decision.candidate)
    if decision.champion is not None:
        client.log_metric(run_id, "champion_exact", decision.champion)
    client.log_metric(run_id, "promoted", 1.0 if decision.promote else 0.0)
    export = trained.get("export_dir")
    if export and Path(export).is_dir():
        client.log_artifacts(run_id, export, artifact_path="model")
    if trained.get("final_model") and Path(trained["final_model"]).is_file():
        client.log_artifact(run_id, trained["final_model"], artifact_path="model")
    for name in ("report_json", "report_md"):
        if verification.get(name):
            client.log_artifact(run_id, verification[name], artifact_path="verification")
    client.set_terminated(run_id, "FINISHED")

    with contextlib.suppress(MlflowException):  # already exists
        client.create_registered_model(model_name, description="APT models trained by the `apt` pipeline")
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
    mv = client.create_model_version(
        model_name,
        source=source,
        run_id=run_id,
        tags={
            "outcome": outcome,
            "reason": decision.reason,
            "exact": f"{decision.candidate:.6f}",
            "champion_exact": "" if decision.champion is None else f"{decision.champion:.6f}",
            "gate_passed": str(bool(verification.get("gate", {}).get("passed", False))).lower(),
            "epochs_completed": str(trained.get("epochs_completed") or ""),
            "sha256": (trained.get("sha256") or {}).get("final_model.pt", ""),
            "cache_key": trained.get("key", ""),
            "decided_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        },
    )
    if decision.promote:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, mv.version)
    return {"run_id": run_id, "version": str(mv.version), "outcome": outcome, "source": source}
