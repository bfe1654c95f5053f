"""End to end through a real Prefect server + process workers on 127.0.0.1, as users type it:
``prefect deployment run apt/full-pipeline --param ...``. Training is the tiny preset on the small HLBD set."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

# The tiny model on the small set; verification on a sample keeps the non-training stages short.
BASE = {"epochs": 3, "batch_size": 64, "save_interval": 1, "verify_sample": 40}
# The first run, its cached rerun, the rerun after its checkpoint is deleted and the retraining runs: eight epochs,
# so that training dominates the first run's wall time (the cached rerun must take <= 1/5 of it). A cached rerun
# still verifies, diagnoses and visualizes (~6-7 s here); with three epochs the first run took 29.7-41 s, and a
# fresh clone's suite once measured 6.6 s against 29.7 s.
FIRST = {**BASE, "epochs": 8}
STAGES = {"generate-hlbd", "train", "verify", "diagnose", "visualize", "publish-links"}
_first: dict = {}


def _wall(fr: dict) -> float:
    start = datetime.fromisoformat(fr["start_time"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(fr["end_time"].replace("Z", "+00:00"))
    return (end - start).total_seconds()


def _by_name(task_runs: list[dict]) -> dict[str, dict]:
    out = {}
    for tr in task_runs:
        out[tr["name"].rsplit("-", 1)[0]] = tr
    return out


def test_bad_parameters_fail_before_any_stage(live_stack):
    from apt_model.backends import BACKENDS

    cases = [
        ("apt/full-pipeline", {"backend": "nope"}, "backend: unknown backend 'nope'"),
        ("apt/full-pipeline", {"model_overrides": {"d_model": 30}}, "model_overrides: ModelConfig.n_heads"),
    ]
    if "deepspeed" not in BACKENDS:  # once registered, the deployment works (no change in the pipeline)
        cases.append(("apt/full-pipeline-deepspeed", {}, "backend: backend 'deepspeed' is not available"))
    ids = [(live_stack.run_deployment(name, **params), expected) for name, params, expected in cases]
    for run_id, expected in ids:
        fr = live_stack.wait(run_id, timeout_s=300)
        assert fr["state"]["type"] == "FAILED", fr["state"]
        assert expected in fr["state"]["message"], fr["state"]["message"]
        assert live_stack.task_runs(run_id) == []  # no stage started


def test_full_pipeline_run(live_stack):
    run_id = live_stack.run_deployment("apt/full-pipeline", **FIRST)
    fr = live_stack.wait(run_id)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    tasks = _by_name(live_stack.task_runs(run_id))
    assert set(tasks) >= STAGES
    assert all(tasks[s]["state"]["type"] == "COMPLETED" for s in STAGES)
    assert tasks["train"]["state"]["name"] == "Completed"  # built, not cached
    arts = {a["key"]: a for a in live_stack.artifacts(run_id) if a.get("key")}
    assert arts["apt-verification-report"]["type"] == "markdown"
    assert "# Verification report" in arts["apt-verification-report"]["data"]
    assert arts["apt-module-accuracy"]["type"] == "table"
    rows = json.loads(arts["apt-module-accuracy"]["data"])
    assert {r["module"] for r in rows} >= {"arithmetic", "overall"}
    assert arts["apt-training-curves"]["type"] == "markdown"
    assert "data:image/png;base64,iVBOR" in arts["apt-training-curves"]["data"]
    assert "| 1 |" in arts["apt-training-curves"]["data"]  # the loss table
    # Prefect stores a link artifact as the markdown "[text](url)".
    assert (
        "](file://" in arts["apt-checkpoint"]["data"] and "final_model.pt" in arts["apt-checkpoint"]["data"]
    )
    assert "/#/experiments/" in arts["apt-mlflow-run"]["data"]
    assert (
        arts["apt-training-progress"]["type"] == "progress"
        and float(arts["apt-training-progress"]["data"]) == 100.0
    )
    summary = live_stack.result_summary(run_id)
    _first.update(run_id=run_id, wall=_wall(fr), summary=summary)
    _first["mtimes"] = {
        p: Path(p).stat().st_mtime_ns for p in (summary["data"]["path"], summary["train"]["final_model"])
    }


def test_identical_run_hits_both_caches(live_stack):
    if not _first:
        pytest.skip("needs the first run")
    run_id = live_stack.run_deployment("apt/full-pipeline", **FIRST)
    fr = live_stack.wait(run_id)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    tasks = _by_name(live_stack.task_runs(run_id))
    assert tasks["generate-hlbd"]["state"]["name"] == "Cached"
    assert tasks["train"]["state"]["name"] == "Cached"
    summary = live_stack.result_summary(run_id)
    assert summary["data"]["cache_hit"] and summary["train"]["cache_hit"]
    assert summary["train"]["final_model"] == _first["summary"]["train"]["final_model"]
    for path, mtime in _first["mtimes"].items():
        assert Path(path).stat().st_mtime_ns == mtime  # nothing regenerated or retrained
    assert _wall(fr) <= _first["wall"] / 5, (_wall(fr), _first["wall"])


def test_deleted_checkpoint_is_retrained(live_stack):
    if not _first:
        pytest.skip("needs the first run")
    final = Path(_first["summary"]["train"]["final_model"])
    final.unlink()
    run_id = live_stack.run_deployment("apt/full-pipeline", **FIRST)
    fr = live_stack.wait(run_id)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    tasks = _by_name(live_stack.task_runs(run_id))
    assert tasks["generate-hlbd"]["state"]["name"] == "Cached"
    assert tasks["train"]["state"]["name"] == "Completed"
    assert final.is_file()


def test_killed_training_resumes_from_last_checkpoint(live_stack):
    params = {**BASE, "epochs": 2, "train_seed": 7}
    run_id = live_stack.run_deployment("apt/full-pipeline", **params)
    work_root = live_stack.output_root / "cache" / "train" / ".work"
    deadline = time.monotonic() + 900
    killed = None
    while time.monotonic() < deadline and killed is None:
        for work in work_root.glob("*") if work_root.is_dir() else []:
            pid_file = work / "train.pid"
            if (work / "checkpoint_epoch_1.pt").is_file() and pid_file.is_file():
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed = (work.name, pid)
                break
        time.sleep(0.5)
    assert killed, "never saw the training process with a checkpoint"
    fr = live_stack.wait(run_id)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    train = _by_name(live_stack.task_runs(run_id))["train"]
    assert train["run_count"] == 2  # failed once (SIGKILL), retried
    entry = live_stack.output_root / "cache" / "train" / killed[0]
    report = json.loads((entry / "experiment_report.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]  # none missing, none repeated
    assert [r["epoch"] for r in report["runtime"]["resumed_from"]] == [1]


def test_concurrent_identical_runs_build_once(live_stack):
    params = {**BASE, "epochs": 1, "train_seed": 11}
    ids: list[str] = []
    threads = [
        threading.Thread(target=lambda: ids.append(live_stack.run_deployment("apt/full-pipeline", **params)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    frs = [live_stack.wait(i) for i in ids]
    assert all(fr["state"]["type"] == "COMPLETED" for fr in frs), [fr["state"] for fr in frs]
    summaries = [live_stack.result_summary(i) for i in ids]
    if summaries[0]["train"]["key"] != summaries[1]["train"]["key"]:
        # The key holds the library's code version: only a checkout edited between the two runs gets here.
        pytest.skip("apt_model sources changed between the two runs (different code_version)")
    names = sorted(_by_name(live_stack.task_runs(i))["train"]["state"]["name"] for i in ids)
    assert names == ["Cached", "Completed"]
    from apt_model.cache import Cache, verify_entry

    summary = summaries[0]
    assert (
        verify_entry(Cache(live_stack.output_root / "cache").entry("train", summary["train"]["key"]))[1]
        == "ok"
    )


def test_retrain_promotes_only_when_not_worse(live_stack):
    if not _first:
        pytest.skip("needs the first run")
    first = live_stack.run_deployment("apt/retrain", **FIRST)  # the first run's model: a cache hit
    fr = live_stack.wait(first)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    # The same model again but with a gate it cannot pass: a worse candidate is registered and rejected.
    second = live_stack.run_deployment("apt/retrain", **FIRST, gate_thresholds={"overall": 0.99})
    fr2 = live_stack.wait(second)
    assert fr2["state"]["type"] == "COMPLETED", fr2["state"]
    a1 = {a["key"]: a for a in live_stack.artifacts(first) if a.get("key")}
    a2 = {a["key"]: a for a in live_stack.artifacts(second) if a.get("key")}
    assert "PROMOTED" in a1["apt-promotion"]["data"]
    assert "NOT promoted" in a2["apt-promotion"]["data"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{live_stack.output_root / 'mlflow.db'}")
    versions = {str(v.version): v for v in client.search_model_versions("name='apt-hlbd'")}
    outcomes = sorted(v.tags.get("outcome") for v in versions.values())
    assert outcomes == ["promoted", "rejected"]
    champion = client.get_model_version_by_alias("apt-hlbd", "champion")
    assert champion.tags["outcome"] == "promoted"


def test_retrain_continues_from_champion(live_stack):
    if not _first:
        pytest.skip("needs the first run")
    run_id = live_stack.run_deployment("apt/retrain", **{**FIRST, "epochs": 1}, resume_from_champion=True)
    fr = live_stack.wait(run_id)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    summary = live_stack.result_summary(run_id)
    assert not summary["train"]["cache_hit"]
    report = json.loads((Path(summary["train"]["dir"]) / "experiment_report.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == list(range(1, 10))  # the champion's 8 epochs + one more
    assert report["runtime"]["resumed_from"][0]["path"].endswith("final_model.pt")
    assert summary["promotion"]["outcome"] in ("promoted", "rejected")


def test_deepspeed_deployment_runs_on_two_cpu_processes(live_stack):
    """The `full-pipeline-deepspeed` deployment through the stack's multi-GPU pool: 2 gloo processes on CPU."""
    run_id = live_stack.run_deployment(
        "apt/full-pipeline-deepspeed",
        preset="tiny",
        epochs=1,
        batch_size=16,
        verify_sample=20,
        backend_options={"num_gpus": 2, "zero_stage": 2},
    )
    fr = live_stack.wait(run_id)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    tasks = _by_name(live_stack.task_runs(run_id))
    assert set(tasks) >= STAGES and all(tasks[s]["state"]["type"] == "COMPLETED" for s in STAGES)
    summary = live_stack.result_summary(run_id)
    report = json.loads((Path(summary["train"]["dir"]) / "experiment_report.json").read_text())
    assert report["backend"] == "deepspeed" and report["status"] == "finished"
    assert report["runtime"]["world_size"] == 2 and report["runtime"]["zero_stage"] == 2
    assert summary["verification"]["overall"]["n"] == 20  # the consolidated export verified


def test_stack_up_is_idempotent(live_stack):
    again = live_stack.stack_cmd(
        "up", "--output-root", str(live_stack.output_root), "--workers", "apt-local-gpu"
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "server already running" in again.stdout
    assert "worker for apt-local-gpu already running" in again.stdout
    # The zombie-run automation is kept, not replaced (replacing it would forget the runs it watches), and not doubled.
    assert "automation apt-crash-zombie-flow-runs unchanged" in again.stdout
    found = live_stack.http.post("/automations/filter", json={}).json()
    assert [a["name"] for a in found].count("apt-crash-zombie-flow-runs") == 1
