"""Rows "process killed while writing" and "disk full during a save".

Killed mid-write: a forked child runs the real writer (``atomic_write_json``, ``write_dataset``,
``save_checkpoint``, ``export_pretrained``) with its low-level write slowed down *in the child only*: it writes
half of the bytes, says so, and sleeps; the parent SIGKILLs it. The previous file must be byte-identical and
load, and the leftover ``.name.*.tmp`` must never be picked up by a loader (and is refused when named directly).

Disk full: a real tiny tmpfs (when this process may mount one) and an injected ``OSError(ENOSPC)``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from apt_model.checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint
from apt_model.cli import main
from apt_model.data import load_dataset, write_dataset
from apt_model.errors import CheckpointError, DataError
from apt_model.io import atomic_write_json
from tests.reliability.helpers import TRAIN_FLAGS, assert_one_error_line, count, snapshot

# ------------------------------------------------------------------------------------------ kill mid-write


def _pause(ready: Path) -> None:
    ready.write_text("x")
    time.sleep(120)  # the parent SIGKILLs us here


def _half_then_pause(path: Path, data: bytes, ready: Path) -> None:
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
    _pause(ready)


def _kill_mid_write(slow_down: Callable[[Path], None], write: Callable[[], None], ready: Path) -> None:
    """Fork; the child patches its own writer (``slow_down``) and writes; SIGKILL it once it is mid-write."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 3
        try:
            slow_down(ready)
            write()
            code = 4  # the write finished: the parent's assertion names this
        except BaseException:
            code = 5
        finally:
            os._exit(code)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            done, status = os.waitpid(pid, os.WNOHANG)
            assert done == 0, f"writer exited with status {status} before it was killed"
            assert time.monotonic() < deadline, "writer never reached the middle of its write"
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    count("faults:sigkill-mid-write")


def _slow_write_bytes(ready: Path) -> None:
    def write_bytes(self: Path, data: bytes) -> int:
        _half_then_pause(self, bytes(data), ready)
        return 0

    Path.write_bytes = write_bytes  # type: ignore[method-assign]


def _slow_torch_save(ready: Path) -> None:
    import io

    import torch

    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        if hasattr(f, "write"):  # save_checkpoint hands torch.save an open file
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _pause(ready)
        else:
            _half_then_pause(Path(f), data, ready)

    torch.save = save


def _slow_safetensors(ready: Path) -> None:
    import safetensors.torch as st

    real = st.save_model

    def save_model(model: Any, filename: str, *args: Any, **kwargs: Any) -> None:
        real(model, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        _half_then_pause(Path(filename), data, ready)

    st.save_model = save_model


def _pause_inside_replace_dir(ready: Path) -> None:
    """Die in the middle of ``replace_dir``: right after the swap, before the old directory is removed."""
    import apt_model.io as aio

    real = aio._exchange

    def exchange(a: Path, b: Path) -> bool:
        swapped = real(a, b)
        assert swapped, "this kernel/filesystem cannot exchange directories atomically"
        _pause(ready)
        return swapped

    aio._exchange = exchange  # type: ignore[assignment]


def _leftovers(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def test_killed_report_write_keeps_the_previous_report(tmp_path: Path) -> None:
    target = tmp_path / "experiment_report.json"
    atomic_write_json(target, {"status": "running", "epochs": [{"epoch": 1}]})
    before = target.read_bytes()
    _kill_mid_write(
        _slow_write_bytes,
        lambda: atomic_write_json(
            target, {"status": "running", "epochs": [{"epoch": e} for e in (1, 2)] * 500}
        ),
        tmp_path / "ready",
    )
    assert target.read_bytes() == before
    assert json.loads(target.read_text(encoding="utf-8"))["epochs"] == [{"epoch": 1}]
    (leftover,) = _leftovers(tmp_path)
    assert leftover.name.startswith(".experiment_report.json.") and leftover.stat().st_size > 0
    with pytest.raises(json.JSONDecodeError):
        json.loads(leftover.read_text(encoding="utf-8"))  # what a non-atomic write would have left in place


def test_killed_dataset_write_keeps_the_previous_dataset(tmp_path: Path, rel_dataset: Path) -> None:
    target = tmp_path / "hlbd.json"
    old_doc = json.loads(rel_dataset.read_text(encoding="utf-8"))
    write_dataset(old_doc, target)
    before, old = target.read_bytes(), load_dataset(target)
    new_doc = {**old_doc, "metadata": {"name": "new"}}
    new_doc["data"] = {**old_doc["data"], "more": [{"input": f"q{i}", "output": "a"} for i in range(2000)]}
    _kill_mid_write(_slow_write_bytes, lambda: write_dataset(new_doc, target), tmp_path / "ready")
    assert target.read_bytes() == before
    assert load_dataset(target).pairs == old.pairs
    (leftover,) = _leftovers(tmp_path)
    with pytest.raises(DataError):  # a partial file is refused even when named directly
        load_dataset(leftover)


@pytest.mark.parametrize("name", ["checkpoint_epoch_3.pt", "final_model.pt"])
def test_killed_checkpoint_write_is_never_picked_up(tmp_path: Path, tiny_run: Path, name: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = snapshot(run)
    state = load_checkpoint(run / "checkpoint_epoch_2.pt")
    state["epoch"] = 3
    _kill_mid_write(_slow_torch_save, lambda: save_checkpoint(run / name, state), tmp_path / "ready")
    (leftover,) = _leftovers(run)
    assert leftover.name.startswith(f".{name}.")
    assert {k: v for k, v in snapshot(run).items() if k != leftover.name} == before  # nothing else changed
    assert latest_checkpoint(run) == run / "checkpoint_epoch_2.pt"  # the temp file is not a checkpoint
    assert load_checkpoint(latest_checkpoint(run))["epoch"] == 2
    loaded = load_model(run)  # a run dir resolves to final_model/ (then final_model.pt), never to the temp
    assert loaded.source == run / "final_model"
    assert load_model(run / "final_model.pt").config == loaded.config
    with pytest.raises(CheckpointError):
        load_checkpoint(leftover)


def test_resumed_run_removes_the_killed_writes_temporaries_and_nothing_else(
    tmp_path: Path, tiny_run: Path, rel_dataset: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = load_checkpoint(run / "checkpoint_epoch_2.pt")
    state["epoch"] = 3
    # A real leftover: a checkpoint write killed half way (as SIGKILL leaves it), plus an export's staging folder.
    _kill_mid_write(
        _slow_torch_save, lambda: save_checkpoint(run / "checkpoint_epoch_3.pt", state), tmp_path / "r"
    )
    staging = run / ".final_model.k2j3x9.tmp"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    # Not the run's to remove: another writer's temporary (a dashboard being rendered) and a user's file.
    foreign = [run / ".training_dashboard.png.a1b2c3.png.tmp", run / ".notes.tmp"]
    for path in foreign:
        path.write_text("keep")
    assert len(_leftovers(run)) == 4

    argv = [
        *TRAIN_FLAGS,
        "--dataset",
        str(rel_dataset),
        "--save-dir",
        str(run),
        "--epochs",
        "3",
        "--save-interval",
        "1",
    ]
    assert main([*argv, "--no-tracking", "--resume", str(run / "checkpoint_epoch_2.pt")]) == 0

    assert _leftovers(run) == sorted(foreign)
    assert load_checkpoint(run / "checkpoint_epoch_3.pt")["epoch"] == 3
    assert json.loads((run / "experiment_report.json").read_text(encoding="utf-8"))["status"] == "finished"


def test_killed_export_write_keeps_the_previous_export(tmp_path: Path, tiny_run: Path) -> None:
    from apt_model.checkpoint import export_pretrained

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = snapshot(run / "final_model")
    loaded = load_model(run / "final_model.pt")
    _kill_mid_write(
        _slow_safetensors,
        lambda: export_pretrained(run / "final_model", loaded.model, loaded.config, loaded.tokenizer),
        tmp_path / "ready",
    )
    assert snapshot(run / "final_model") == before
    assert load_model(run).source == run / "final_model"
    (leftover,) = _leftovers(run)
    assert leftover.is_dir() and leftover.name.startswith(".final_model.")
    with pytest.raises(CheckpointError):
        load_model(leftover)


def test_export_killed_while_replacing_keeps_an_export(tmp_path: Path, tiny_run: Path) -> None:
    from apt_model.checkpoint import export_pretrained

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    loaded = load_model(run / "final_model.pt")
    _kill_mid_write(
        _pause_inside_replace_dir,
        lambda: export_pretrained(run / "final_model", loaded.model, loaded.config, loaded.tokenizer),
        tmp_path / "ready",
    )
    assert (run / "final_model" / "model.safetensors").is_file()
    assert load_model(run / "final_model").source == run / "final_model"


# ------------------------------------------------------------------------------------------------ disk full
@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        mounted = None
    if mounted is None or mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?); the injected-ENOSPC test covers this row")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)


def _inject_enospc(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.save`` writes part of the checkpoint and then the disk is full."""
    import torch

    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        part = buf.getvalue()[: len(buf.getvalue()) // 3]
        if hasattr(f, "write"):  # save_checkpoint hands torch.save an open file
            f.write(part)
            name = f.name
        else:
            Path(f).write_bytes(part)
            name = str(f)
        count("faults:enospc")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)

    monkeypatch.setattr(torch, "save", save)


def test_enospc_during_save_checkpoint_keeps_the_previous_file(
    tmp_path: Path, tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "final_model.pt"
    shutil.copy(tiny_run / "final_model.pt", target)
    before = target.read_bytes()
    state = load_checkpoint(target)
    _inject_enospc(monkeypatch)
    with pytest.raises(OSError) as info:
        save_checkpoint(target, state)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == before and load_checkpoint(target)["epoch"] == state["epoch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model.pt"]  # no temp file left behind


def _save_on_full_tmpfs(tmp_path: Path, tiny_run: Path) -> tuple[type, int | None, str]:
    """A 96 KiB tmpfs: a report fits, a checkpoint (~660 KB) does not. Returns the save error's type/errno/text."""
    disk = tmp_path / "small"
    report = disk / "experiment_report.json"
    with _tmpfs(disk, "96k"):
        atomic_write_json(report, {"status": "running"})
        before = report.read_bytes()
        error: tuple[type, int | None, str] | None = None
        try:
            save_checkpoint(
                disk / "checkpoint_epoch_3.pt", load_checkpoint(tiny_run / "checkpoint_epoch_2.pt")
            )
        except (
            Exception
        ) as exc:  # its traceback is dropped here: it pins torch's writer and its open temp file
            error = (type(exc), getattr(exc, "errno", None), str(exc))
        count("faults:enospc")
        assert error is not None, "a 660 KB checkpoint fitted on a 96 KiB disk"
        assert report.read_bytes() == before
        assert sorted(p.name for p in disk.iterdir()) == ["experiment_report.json"]  # temp file removed
        # The space of the refused temp file came back: the next (small) write succeeds.
        atomic_write_json(report, {"status": "finished"})
        assert json.loads(report.read_text(encoding="utf-8")) == {"status": "finished"}
    return error


def test_real_full_tmpfs_keeps_previous_files(tmp_path: Path, tiny_run: Path) -> None:
    _save_on_full_tmpfs(tmp_path, tiny_run)


def test_real_full_tmpfs_error_says_disk_full(tmp_path: Path, tiny_run: Path) -> None:
    kind, code, text = _save_on_full_tmpfs(tmp_path, tiny_run)
    assert issubclass(kind, OSError) and code == errno.ENOSPC, (kind, text)


def _full_disk_run(tmp_path: Path, tiny_run: Path) -> tuple[Path, dict[str, bytes]]:
    """A 2-epoch run to resume for a third epoch, whose checkpoint will hit a full disk."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "experiment_report.json"):
        shutil.copy(tiny_run / name, run / name)
    return run, {
        name: (run / name).read_bytes() for name in ("checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt")
    }


def _resume_argv(run: Path, dataset: Path) -> list[str]:
    return [*TRAIN_FLAGS, "--dataset", str(dataset), "--save-dir", str(run), "--no-tracking",
            "--epochs", "3", "--save-interval", "1", "--resume", str(run / "checkpoint_epoch_2.pt")]  # fmt: skip


def test_cli_train_on_a_full_disk_fails_and_keeps_previous_checkpoints(
    tmp_path: Path, tiny_run: Path, rel_dataset: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    run, before = _full_disk_run(tmp_path, tiny_run)
    _inject_enospc(monkeypatch)
    rc = main(_resume_argv(run, rel_dataset))
    assert rc != 0  # never a silent success
    for name, data in before.items():
        assert (run / name).read_bytes() == data
    assert latest_checkpoint(run) == run / "checkpoint_epoch_2.pt"
    assert load_checkpoint(run / "checkpoint_epoch_2.pt")["epoch"] == 2
    assert not list(run.glob(".*.tmp")) and not (run / "checkpoint_epoch_3.pt").exists()
    report = json.loads((run / "experiment_report.json").read_text(encoding="utf-8"))
    assert report["status"] == "failed" and "No space left" in report["final"]["error"]
    # The run can be resumed once space is back.
    monkeypatch.undo()
    assert main(_resume_argv(run, rel_dataset)) == 0
    done = json.loads((run / "experiment_report.json").read_text(encoding="utf-8"))
    assert [r["epoch"] for r in done["epochs"]] == [1, 2, 3] and done["status"] == "finished"


def test_cli_train_on_a_full_disk_prints_one_error_line(
    tmp_path: Path,
    tiny_run: Path,
    rel_dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    run, _ = _full_disk_run(tmp_path, tiny_run)
    _inject_enospc(monkeypatch)
    rc = main(_resume_argv(run, rel_dataset))
    assert rc not in (0, None)
    assert_one_error_line(capsys.readouterr().err, "No space left on device")
