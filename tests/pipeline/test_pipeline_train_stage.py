"""The training stage's cache/resume wiring, without Prefect and without torch: the process runner is faked."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import tasks.train as train
from apt_model.pipeline_params import parse_params
from tasks.data import data_key


class FakeRunner:
    """Stands in for the training subprocess: writes what the playground backend writes; can 'die' mid-run."""

    def __init__(self, die_after: int | None = None) -> None:
        self.calls: list[dict] = []
        self.die_after = die_after

    def __call__(self, spec, work: Path, *, log, on_epoch=None, timeout_s=None):
        self.calls.append(spec)
        req = spec["request"]
        start = 0
        if req["resume"]:
            start = int(Path(req["resume"]).stem.rsplit("_", 1)[1])
        for epoch in range(start + 1, req["train"]["epochs"] + 1):
            (work / f"checkpoint_epoch_{epoch}.pt").write_bytes(f"ckpt{epoch}".encode())
            if on_epoch:
                on_epoch({"epoch": epoch, "train_loss": 1.0 / epoch})
            if self.die_after is not None and epoch == self.die_after:
                self.die_after = None
                raise train.TrainingCrashed("killed by signal 9")
        (work / "final_model.pt").write_bytes(b"final")
        (work / "final_model").mkdir(exist_ok=True)
        (work / "final_model" / "config.json").write_text("{}")
        (work / "experiment_report.json").write_text(
            '{"epochs": ['
            + ",".join(f'{{"epoch": {e}}}' for e in range(1, req["train"]["epochs"] + 1))
            + "]}"
        )
        return {
            "backend": "playground",
            "out_dir": str(work),
            "final_model": str(work / "final_model.pt"),
            "export_dir": str(work / "final_model"),
            "report": str(work / "experiment_report.json"),
            "last_checkpoint": str(work / f"checkpoint_epoch_{req['train']['epochs']}.pt"),
            "epochs_completed": req["train"]["epochs"],
            "global_step": 10,
            "metrics": {"train_loss": 0.5},
            "sha256": {},
            "mlflow_run_id": None,
            "extra": {},
        }


@pytest.fixture
def setup(tmp_path, monkeypatch):
    data_file = tmp_path / "hlbd.json"
    data_file.write_text("{}")
    data = {"path": str(data_file), "sha256": "d" * 64}
    params = parse_params(output_root=str(tmp_path / "out"), epochs=4, save_interval=1)
    return params, data


def test_crash_then_resume_then_cache_hit(setup, monkeypatch):
    params, data = setup
    fake = FakeRunner(die_after=2)
    monkeypatch.setattr(train, "run_training_process", fake)
    with pytest.raises(train.TrainingCrashed):
        train.build_model(params, data, log=lambda s: None)
    # the retried stage resumes from the last checkpoint the dead process left in the key's work dir
    out = train.build_model(params, data, log=lambda s: None)
    assert fake.calls[0]["request"]["resume"] is None
    assert fake.calls[1]["request"]["resume"].endswith("checkpoint_epoch_2.pt")
    assert out["resumed_from"].endswith("checkpoint_epoch_2.pt")
    assert not out["cache_hit"] and out["epochs_completed"] == 4
    assert Path(out["final_model"]).is_file() and Path(out["final_model"]).parent == Path(out["dir"])
    assert [r["epoch"] for r in out["history"]] == [1, 2, 3, 4]
    mtime = Path(out["final_model"]).stat().st_mtime_ns
    again = train.build_model(params, data, log=lambda s: None)
    assert again["cache_hit"] and len(fake.calls) == 2
    assert Path(again["final_model"]).stat().st_mtime_ns == mtime
    # deleting the cached checkpoint makes the next run retrain, from scratch
    Path(again["final_model"]).unlink()
    third = train.build_model(params, data, log=lambda s: None)
    assert not third["cache_hit"] and third["cache_reason"] == "final_model.pt missing"
    assert fake.calls[2]["request"]["resume"] is None


def test_key_depends_on_data_config_and_code(setup):
    params, data = setup
    k1, payload = train.train_key(params, data)
    assert payload["code_version"] and payload["data_sha256"] == data["sha256"]
    assert (
        train.train_key(parse_params(output_root=params.output_root, epochs=5, save_interval=1), data)[0]
        != k1
    )
    assert train.train_key(params, {**data, "sha256": "e" * 64})[0] != k1
    assert train.train_key(params, data, {"name": "m", "version": "1", "sha256": "x"})[0] != k1
    assert train.train_key(params, data)[0] == k1
    # data_overrides shape training (the key), not the data: the dataset's key stays.
    repeated = parse_params(
        output_root=params.output_root, epochs=params.epochs, save_interval=params.save_interval,
        data_overrides={"repeat": "zodiac=2"},
    )  # fmt: skip
    assert repeated.data_config().repeat == "zodiac=2"
    assert train.train_key(repeated, data)[0] != k1
    assert data_key(repeated) == data_key(params)


def test_latest_checkpoint(tmp_path):
    assert train.latest_checkpoint(tmp_path) is None
    for n in (2, 10, 9):
        (tmp_path / f"checkpoint_epoch_{n}.pt").write_text("x")
    (tmp_path / "checkpoint_epoch_99.pt.tmp").write_text("x")
    assert train.latest_checkpoint(tmp_path).name == "checkpoint_epoch_10.pt"


def test_kill_group_takes_children(tmp_path):
    script = "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, text=True)
    time.sleep(1.0)
    train._kill_group(proc)
    assert proc.poll() is not None
    time.sleep(0.3)
    assert _live_group_members(proc.pid) == []


def _live_group_members(pgid: int) -> list[int]:
    """Pids of the process group that are not zombies (an orphan's zombie may wait for a lazy init to reap it)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live
