"""apt_model.monitor: run discovery, status rules, the table and the loss overlay."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from apt_model.cli import main
from apt_model.errors import ConfigError
from apt_model.monitor import build_overlay_figure, find_runs, format_table, monitor, render_overlay


@pytest.fixture(autouse=True)
def _mpl_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path_factory.getbasetemp() / "mplconfig"))


def iso(seconds_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds_ago)).isoformat(timespec="seconds")


def make_run(root: Path, name: str, status: str, train: list, val: list, age: float = 1.0, **extra) -> Path:  # type: ignore[no-untyped-def,type-arg]
    d = root / name
    d.mkdir(parents=True)
    report = {
        "schema_version": 1,
        "backend": "playground",
        "status": status,
        "started_at": iso(age + 100),
        "updated_at": iso(age),
        "config": {"train": {"epochs": 10}},
        "epochs": [
            {"epoch": i + 1, "train_loss": t, "val_loss": v}
            for i, (t, v) in enumerate(zip(train, val, strict=True))
        ],
        "final": {},
        **extra,
    }
    (d / "experiment_report.json").write_text(json.dumps(report), encoding="utf-8")
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_run(tmp_path, "a_running", "running", [3.0, 2.0], [3.1, 2.5])
    make_run(tmp_path, "b_stalled", "running", [3.0], [3.2], age=3600)
    make_run(tmp_path, "c_done", "finished", [3.0, 2.0, 2.5], [3.0, 1.5, 1.8])
    make_run(
        tmp_path, "nested/d_failed", "failed", [3.0, "nan"], [3.0, None], final={"error": "loss became NaN"}
    )
    bad = tmp_path / "e_broken"
    bad.mkdir()
    (bad / "experiment_report.json").write_text("{", encoding="utf-8")
    make_run(tmp_path / ".hidden", "tmp", "running", [1.0], [1.0])  # atomic writers' temp dirs are skipped
    return tmp_path


def test_find_runs_statuses_and_numbers(root: Path) -> None:
    runs = {r.name: r for r in find_runs(root, stale_after=120)}
    assert sorted(runs) == ["a_running", "b_stalled", "c_done", "e_broken", "nested/d_failed"]
    assert runs["a_running"].status == "running" and runs["a_running"].epoch == 2
    assert runs["b_stalled"].status == "idle" and runs["b_stalled"].age_s >= 3600  # type: ignore[operator]
    c = runs["c_done"]
    assert c.status == "finished" and c.last_train_loss == 2.5 and c.best_train_loss == 2.0
    assert c.last_val_loss == 1.8 and c.best_val_loss == 1.5 and c.epochs_planned == 10
    f = runs["nested/d_failed"]
    assert f.status == "failed" and f.error == "loss became NaN" and f.best_train_loss == 3.0
    assert runs["e_broken"].status == "unreadable"


def test_table_and_overlay(root: Path, tmp_path: Path) -> None:
    from PIL import Image

    runs = find_runs(root)
    table = format_table(runs)
    assert (
        "c_done" in table
        and "idle" in table
        and "1 running, 1 idle, 1 finished, 1 failed, 1 unreadable" in table
    )
    fig = build_overlay_figure(runs)
    lines = {ln.get_gid(): ln for ln in fig.axes[0].get_lines()}
    assert list(lines["val:c_done"].get_ydata()) == [3.0, 1.5, 1.8]
    assert list(lines["train:nested/d_failed"].get_ydata()) == [3.0]  # the NaN epoch is not drawn
    out = render_overlay(runs, tmp_path / "overlay.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1200, 700)


def test_live_loop_until_done(tmp_path: Path) -> None:
    make_run(tmp_path, "r1", "finished", [2.0], [2.0])
    run = make_run(tmp_path, "r2", "running", [2.0], [2.0])
    calls = []

    def finish_later(seconds: float) -> None:
        calls.append(seconds)
        report = json.loads((run / "experiment_report.json").read_text(encoding="utf-8"))
        report["status"] = "finished"
        (run / "experiment_report.json").write_text(json.dumps(report), encoding="utf-8")

    stream = io.StringIO()
    runs = monitor(tmp_path, interval=0.01, until_done=True, stream=stream, rich=False, sleep=finish_later)
    assert calls == [0.01] and {r.status for r in runs} == {"finished"}
    assert stream.getvalue().count("r2") == 2


def test_cli_once_and_errors(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overlay = tmp_path / "o.png"
    assert main(["monitor", "--root", str(root), "--once", "--overlay", str(overlay)]) == 0
    out = capsys.readouterr().out
    assert "a_running" in out and overlay.is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv in (
        ["monitor", "--root", str(tmp_path / "missing"), "--once"],
        ["monitor", "--root", str(empty), "--once"],
        ["monitor", "--root", str(root), "--once", "--overlay", str(tmp_path)],
        ["monitor", "--root", str(root), "--interval", "0"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(ConfigError):
        find_runs(tmp_path / "missing")


def test_real_run_is_found(tmp_path: Path) -> None:
    """A report written by the training code's own writer is read correctly."""
    from apt_model.training.report import ExperimentReport

    rep = ExperimentReport(backend="playground", config={"train": {"epochs": 2}}, dataset={}, schedule={})
    rep.add_epoch({"epoch": 1, "train_loss": 2.0, "val_loss": float("nan"), "val_token_acc": 0.1, "lr": 1e-3,
                   "grad_norm": 1.0, "tokens_per_s": 5.0, "epoch_seconds": 1.0, "global_step": 3, "skipped_steps": 0})  # fmt: skip
    rep.write(tmp_path / "run" / "experiment_report.json")
    (r,) = find_runs(tmp_path)
    assert r.status == "running" and r.epoch == 1 and r.best_val_loss is None and r.age_s < 60  # type: ignore[operator]
