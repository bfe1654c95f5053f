"""Stage 2: train on the chosen backend in a subprocess, cached by data hash + configs + code version.

The subprocess runs in the cache key's stable work directory, so when it dies (OOM, SIGKILL, a lost node) the
retried stage finds its last ``checkpoint_epoch_N.pt`` there and resumes instead of starting over. It runs in its
own process group and is killed as a group when the stage is cancelled or times out. Training holds one slot of
the ``apt-gpu`` global concurrency limit so two runs never share a GPU by accident.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.states import Completed

from apt_model.cache import cache_key, code_version
from apt_model.checkpoint import latest_checkpoint
from apt_model.errors import ConfigError
from apt_model.io import atomic_write_json
from apt_model.pipeline_params import PipelineParams
from tasks.common import GPU_LIMIT, cache_for, retry_unless_config_error
from tasks.train_child import EPOCH_PREFIX, RESULT_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
PID_FILE = "train.pid"
REQUEST_FILE = "train_request.json"
# The ``apt-gpu`` slot is a lease the flow process renews (every 3/4 of it). When that process dies without
# releasing it (worker or machine lost, SIGKILL), the server frees the slot only once the lease expires: Prefect's
# default of 300 s held every retry and every other training on the host for up to 5 minutes. 60 s is the
# server's minimum.
GPU_LEASE_S = 60


class TrainingCrashed(RuntimeError):
    """The training process died or failed for a reason that may not recur: the stage is retried (and resumes)."""


def train_key(
    params: PipelineParams, data: dict[str, Any], champion: dict[str, Any] | None = None
) -> tuple[str, dict]:
    payload = {
        "backend": params.backend,
        "backend_options": params.backend_options,
        "data_sha256": data["sha256"],
        "data": params.data_config().to_dict(),
        "model": params.model_cfg().to_dict(),
        "train": params.train_cfg().to_dict(),
        "code_version": code_version(),
        # Continuing from a champion is a different model than training from scratch.
        "init_from": {"model": champion["name"], "version": champion["version"], "sha256": champion["sha256"]}
        if champion
        else None,
    }
    return cache_key("train", payload), payload


def _relative(result: dict[str, Any], work: Path) -> dict[str, Any]:
    out = dict(result)
    for name in ("out_dir", "final_model", "export_dir", "report", "last_checkpoint"):
        value = out.get(name)
        if value:
            with contextlib.suppress(ValueError):  # outside the work dir: keep as is
                out[name] = Path(value).resolve().relative_to(work.resolve()).as_posix() or "."
    return out


def _absolute(result: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(result)
    for name in ("out_dir", "final_model", "export_dir", "report", "last_checkpoint"):
        value = out.get(name)
        if value and not Path(value).is_absolute():
            out[name] = str((base / value).resolve())
    return out


def run_training_process(
    spec: dict[str, Any],
    work: Path,
    *,
    log: Callable[[str], None],
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run ``tasks.train_child`` on ``spec`` in ``work``; stream its output line by line; return the TrainResult dict."""
    request_path = work / REQUEST_FILE
    atomic_write_json(request_path, spec)
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    (work / RESULT_FILE).unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.train_child", str(request_path)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # own process group: killpg takes its workers (dataloaders, ranks) with it
    )
    pid_file = work / PID_FILE
    pid_file.write_text(f"{proc.pid}\n")
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s if timeout_s else None
    last_error = ""
    try:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"training exceeded train_timeout_s={timeout_s:.0f}") from None
                continue
            if line is None:
                break
            if line.startswith(EPOCH_PREFIX):
                try:
                    row = json.loads(line[len(EPOCH_PREFIX) :])
                except json.JSONDecodeError:
                    log(line)
                    continue
                log(_epoch_line(row, spec))
                if on_epoch is not None:
                    with contextlib.suppress(Exception):  # progress display must never fail training
                        on_epoch(row)
                continue
            if line.startswith("error: "):
                last_error = line[len("error: ") :]
            log(line)
        rc = proc.wait()
    finally:
        _kill_group(proc)
        pid_file.unlink(missing_ok=True)
    if rc == 2:
        raise ConfigError(last_error or "training rejected its configuration")
    if rc != 0:
        how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        raise TrainingCrashed(f"training process {proc.pid} failed ({how}); checkpoints kept in {work}")
    try:
        return json.loads((work / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingCrashed(
            f"training finished but {RESULT_FILE} is unreadable ({exc.__class__.__name__})"
        ) from None


def _epoch_line(row: dict[str, Any], spec: dict[str, Any]) -> str:
    total = spec["request"]["train"]["epochs"]
    parts = [f"epoch {row.get('epoch')}/{total}"]
    for k in ("train_loss", "val_loss", "val_token_acc", "lr"):
        v = row.get(k)
        if isinstance(v, int | float):
            parts.append(f"{k}={v:.4g}")
    return " ".join(parts)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def build_model(
    params: PipelineParams,
    data: dict[str, Any],
    *,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    slot: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    champion: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The training stage without Prefect: a verified cache hit, or a (resumed) training run published to the cache."""
    key, payload = train_key(params, data, champion)
    started: dict[str, Any] = {}

    def build(work: Path) -> dict[str, Any]:
        resume = latest_checkpoint(work)
        train_cfg = params.train_cfg()
        if resume is not None:
            log(f"resuming from {resume.name} left by an interrupted attempt")
        elif champion is not None:
            resume = Path(champion["checkpoint"])
            # Continue the champion for `epochs` more epochs.
            train_cfg = train_cfg.replace(epochs=int(champion.get("epochs", 0)) + params.epochs)
            log(f"continuing from champion {champion['name']} v{champion['version']} ({resume})")
        started["resumed_from"] = str(resume) if resume else None
        spec = {
            "backend": params.backend,
            "request": {
                "model": params.model_cfg().to_dict(),
                "train": train_cfg.to_dict(),
                "data": params.data_config().to_dict(),
                "dataset": data["path"],
                "out_dir": str(work),
                "resume": str(resume) if resume else None,
                "options": dict(params.backend_options),
                "tracking_uri": params.tracking_uri(),
                "experiment": params.experiment,
            },
        }
        with slot():
            result = run_training_process(
                spec, work, log=log, on_epoch=on_epoch, timeout_s=params.train_timeout_s
            )
        return {
            "result": _relative(result, work),
            "payload": payload,
            "history": _history(work),
            # Looked up once here, so a cached run's links need no MLflow round trip.
            "mlflow_experiment_id": _experiment_id(params.tracking_uri(), result.get("mlflow_run_id")),
        }

    outcome = cache_for(params).get_or_build(
        "train",
        key,
        build,
        refresh=params.refresh,
        resumable=True,
        on_wait=lambda e: log(f"another run is building {e.dir}; waiting for it"),
    )
    meta = outcome.manifest["meta"]
    result = _absolute(meta["result"], outcome.dir)
    return {
        "stage": "train",
        "dir": str(outcome.dir),
        "key": key,
        "cache_hit": outcome.hit,
        "cache_reason": outcome.reason,
        "backend": params.backend,
        "final_model": result.get("final_model"),
        "export_dir": result.get("export_dir"),
        "report": result.get("report"),
        "last_checkpoint": result.get("last_checkpoint"),
        "epochs_completed": result.get("epochs_completed"),
        "metrics": result.get("metrics", {}),
        "mlflow_run_id": result.get("mlflow_run_id"),
        "mlflow_experiment_id": meta.get("mlflow_experiment_id"),
        "sha256": {
            k: v for k, v in outcome.manifest["files"].items() if not k.startswith("checkpoint_epoch_")
        },
        "history": meta.get("history", []),
        "resumed_from": started.get("resumed_from"),
        "code_version": payload["code_version"],
    }


def _experiment_id(tracking_uri: str, run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        from mlflow.tracking import MlflowClient

        return str(MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)
    except Exception:  # a missing link must not fail a finished training
        return None


def _history(work: Path) -> list[dict[str, Any]]:
    try:
        report = json.loads((work / "experiment_report.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    keep = ("epoch", "train_loss", "val_loss", "val_token_acc", "lr")
    return [{k: row.get(k) for k in keep} for row in report.get("epochs", [])]


# ------------------------------------------------------------------------------------------------ the Prefect task
@task(
    name="train", retry_delay_seconds=3, retry_condition_fn=retry_unless_config_error, cache_policy=NO_CACHE
)
def train_model(params: PipelineParams, data: dict[str, Any], champion: dict[str, Any] | None = None) -> Any:
    """Retries come from ``with_options(retries=params.train_retries)`` in the flow; each retry resumes."""
    logger = get_run_logger()
    total = params.epochs + (int(champion.get("epochs", 0)) if champion else 0)
    progress_id = create_progress_artifact(
        progress=0.0, key="apt-training-progress", description=f"training {params.backend}: 0/{total} epochs"
    )

    def on_epoch(row: dict[str, Any]) -> None:
        epoch = int(row.get("epoch", 0))
        update_progress_artifact(
            artifact_id=progress_id,
            progress=min(100.0, 100.0 * epoch / max(total, 1)),
            description=f"training {params.backend}: {epoch}/{total} epochs, train_loss {row.get('train_loss')}",
        )

    @contextlib.contextmanager
    def gpu_slot() -> Iterator[None]:
        logger.info("waiting for a slot of the %r concurrency limit", GPU_LIMIT)
        # A failed renewal (server restarted or unreachable for a while) must not kill hours of training.
        with concurrency(
            GPU_LIMIT, occupy=1, strict=True, lease_duration=GPU_LEASE_S, raise_on_lease_renewal_failure=False
        ):
            logger.info("holding %r; starting the training process", GPU_LIMIT)
            yield

    manifest = build_model(params, data, log=logger.info, on_epoch=on_epoch, slot=gpu_slot, champion=champion)
    if manifest["cache_hit"]:
        update_progress_artifact(artifact_id=progress_id, progress=100.0, description="cached model reused")
        logger.info("cache hit: model %s verified at %s", manifest["key"], manifest["dir"])
        return Completed(name="Cached", message=f"verified cache hit {manifest['key']}", data=manifest)
    update_progress_artifact(artifact_id=progress_id, progress=100.0, description=f"trained {total} epochs")
    logger.info(
        "trained %s epochs (%s); model at %s",
        manifest["epochs_completed"],
        manifest["cache_reason"],
        manifest["dir"],
    )
    return manifest
