"""Row "training process SIGKILLed mid-run": the retry resumes from the last checkpoint, no epoch lost or repeated.

A real ``python -m apt_model train`` is SIGKILLed (its whole process group: nothing is given a chance to clean
up) once ``checkpoint_epoch_2.pt`` exists, then started again with ``--resume`` of the latest checkpoint. The
pipeline-level version (the Prefect stage is retried and resumes by itself) is
``tests/pipeline/test_pipeline_e2e.py::test_killed_training_resumes_from_last_checkpoint``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from apt_model.checkpoint import latest_checkpoint, load_checkpoint
from apt_model.io import sha256_file
from tests.reliability.helpers import (
    REPO,
    TRAIN_FLAGS,
    apt_cmd,
    child_env,
    count,
    run_apt,
    wait_for,
)

EPOCHS = 4


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _run_until_killed(
    argv: list[str], env: dict[str, str], tmp_path: Path, ready, timeout_s: float, what: str
) -> None:  # type: ignore[no-untyped-def]
    """Start ``apt`` in its own process group, SIGKILL the group once ``ready()``, and check it died of it.

    The launcher and any torchrun ranks share that group: SIGKILL of the group is a lost node.
    """
    log = (tmp_path / "first.log").open("wb")
    proc = subprocess.Popen(
        apt_cmd(*argv), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for(ready, timeout_s, what, proc)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        log.close()
    count("faults:sigkill-training")
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()


def _assert_complete_history(report: dict, epochs: int, resumed_at: int) -> None:
    assert report["status"] == "finished"
    assert [row["epoch"] for row in report["epochs"]] == list(
        range(1, epochs + 1)
    )  # none lost, none repeated
    assert [r["epoch"] for r in report["runtime"]["resumed_from"]] == [resumed_at]
    steps = [step for step, _ in report["batch_losses"]]
    per_epoch = report["runtime"]["steps_per_epoch"]
    # Every optimizer step exactly once: the killed epoch's partial steps were not kept, the resumed ones not doubled.
    assert steps == list(range(1, epochs * per_epoch + 1)), steps
    assert report["final"]["global_step"] == epochs * per_epoch


@pytest.mark.slow
def test_sigkilled_playground_run_resumes_without_losing_or_repeating_an_epoch(
    tmp_path: Path, rel_dataset: Path
) -> None:
    run = tmp_path / "run"
    env = child_env(tmp_path)
    argv = [*TRAIN_FLAGS, "--dataset", str(rel_dataset), "--save-dir", str(run), "--no-tracking"]
    argv += ["--epochs", str(EPOCHS), "--save-interval", "1"]
    _run_until_killed(
        argv, env, tmp_path, lambda: (run / "checkpoint_epoch_2.pt").exists(), 240, "checkpoint_epoch_2.pt"
    )
    assert not (run / "final_model.pt").exists(), "the run finished before it could be killed"

    resume = latest_checkpoint(run)
    assert resume is not None
    resumed_at = int(resume.stem.rsplit("_", 1)[1])
    assert resumed_at >= 2
    # Every checkpoint left behind loads (atomic writes) and the report written so far is valid JSON.
    for ckpt in sorted(run.glob("checkpoint_epoch_*.pt")):
        assert load_checkpoint(ckpt)["epoch"] == int(ckpt.stem.rsplit("_", 1)[1])
    json.loads((run / "experiment_report.json").read_text(encoding="utf-8"))

    second = run_apt([*argv, "--resume", str(resume)], env)
    assert second.returncode == 0, second.stderr
    report = json.loads((run / "experiment_report.json").read_text(encoding="utf-8"))
    _assert_complete_history(report, EPOCHS, resumed_at)
    # The checkpoints the report lists are the files on disk (content hash), one per epoch.
    listed = {c["epoch"]: c for c in report["checkpoints"]}
    assert sorted(listed) == list(range(1, EPOCHS + 1))
    for epoch, entry in listed.items():
        assert sha256_file(run / f"checkpoint_epoch_{epoch}.pt") == entry["sha256"]
    assert not list(run.glob(".*.tmp")), "a temp file of the killed process was left in the run dir"


def _deepspeed_usable() -> str | None:
    from apt_model.backends import BACKENDS

    if "deepspeed" not in BACKENDS:
        return "deepspeed backend not registered"
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # an install without the extra
        return f"deepspeed not importable ({exc.__class__.__name__})"
    return None


@pytest.mark.slow
def test_sigkilled_deepspeed_run_resumes_without_losing_or_repeating_an_epoch(
    tmp_path: Path, rel_dataset: Path
) -> None:
    why = _deepspeed_usable()
    if why:
        pytest.skip(why)
    run = tmp_path / "ds"
    # TORCH_EXTENSIONS_DIR is inherited (the Makefile's, else torch's default cache): DeepSpeed's CPU comm
    # extension is compiled once per machine, not once per test.
    env = child_env(tmp_path, DS_ACCELERATOR="cpu")
    common = [f for f in TRAIN_FLAGS if f not in ("--device", "cpu")]  # --device is a Playground flag
    argv = [*common, "--backend", "deepspeed", "--num-gpus", "1", "--zero-stage", "1", "--precision", "fp32"]
    argv += ["--dataset", str(rel_dataset), "--save-dir", str(run), "--no-tracking", "--epochs", "3"]
    argv += ["--save-interval", "1"]
    _run_until_killed(
        argv, env, tmp_path, lambda: (run / "checkpoint_epoch_1").is_dir(), 300, "checkpoint_epoch_1/"
    )
    assert not (run / "final_model").exists(), "the run finished before it could be killed"
    done = sorted(int(p.name.rsplit("_", 1)[1]) for p in run.glob("checkpoint_epoch_*") if p.is_dir())
    resumed_at = done[-1]
    second = run_apt(
        [*argv, "--load-checkpoint", str(run / f"checkpoint_epoch_{resumed_at}")], env, timeout=400
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    report = json.loads((run / "experiment_report.json").read_text(encoding="utf-8"))
    _assert_complete_history(report, 3, resumed_at)


def test_pipeline_retry_finds_a_deepspeed_checkpoint_folder(tmp_path: Path) -> None:
    from tasks.train import latest_checkpoint as stage_latest_checkpoint

    for epoch in (1, 2):
        (tmp_path / f"checkpoint_epoch_{epoch}").mkdir()
        (tmp_path / f"checkpoint_epoch_{epoch}" / "apt_state.pt").write_bytes(b"x")
    assert stage_latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch_2"
