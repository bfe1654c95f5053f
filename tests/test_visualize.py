"""apt_model.visualize: the dashboard draws exactly the run's data; realtime mode stops by itself."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from apt_model.cli import main
from apt_model.visualize import (
    DPI,
    FIGSIZE,
    NO_DATA,
    build_figure,
    render_dashboard,
    watch,
)


@pytest.fixture(autouse=True)
def _mpl_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path_factory.getbasetemp() / "mplconfig"))


def axes_by_gid(fig):  # type: ignore[no-untyped-def]
    return {ax.get_gid(): ax for ax in fig.axes}


def line(ax, gid: str):  # type: ignore[no-untyped-def]
    found = [ln for ln in ax.get_lines() if ln.get_gid() == gid]
    assert len(found) == 1, f"no line {gid}"
    return found[0]


def texts(ax) -> str:  # type: ignore[no-untyped-def]
    return " | ".join(t.get_text() for t in ax.texts)


def test_offline_png_from_a_real_run(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    from PIL import Image

    run, data = run_and_data
    log_dir = tmp_path / "run"
    shutil.copytree(run, log_dir)
    assert main(["verify", "--model", str(log_dir), "--dataset", str(data), "--out", str(log_dir)]) == 0
    out = tmp_path / "dash.png"
    assert main(["visualize", "--log-dir", str(log_dir), "--mode", "offline", "--out", str(out)]) == 0
    with Image.open(out) as img:
        img.load()
        assert img.format == "PNG"
        assert img.size == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
    # Default output path.
    assert render_dashboard(log_dir) == log_dir / "training_dashboard.png"
    assert not list(log_dir.glob(".*.tmp"))  # the atomic writer left nothing behind


def test_figure_draws_exactly_the_reports_data(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    from apt_model.verify import verify_model

    run, data = run_and_data
    report = json.loads((run / "experiment_report.json").read_text(encoding="utf-8"))
    verification = verify_model(run, data, split="all").to_dict()
    fig = build_figure(report, verification)
    ax = axes_by_gid(fig)
    epochs = [e["epoch"] for e in report["epochs"]]
    for key, panel in (("train_loss", "loss"), ("val_loss", "loss"), ("lr", "lr"), ("grad_norm", "grad_norm"),
                       ("tokens_per_s", "tokens_per_s"), ("val_token_acc", "val_token_acc")):  # fmt: skip
        ln = line(ax[panel], key)
        assert list(ln.get_xdata()) == epochs
        assert list(ln.get_ydata()) == [e[key] for e in report["epochs"]], key
    spe = report["schedule"]["steps_per_epoch"]
    batch = line(ax["loss"], "batch_loss")
    assert list(batch.get_ydata()) == [b[1] for b in report["batch_losses"]]
    assert list(batch.get_xdata()) == [b[0] / spe for b in report["batch_losses"]]
    # Restart markers where the schedule says (T_0 = 1: after epoch 1).
    restarts = [ln for ln in ax["lr"].get_lines() if ln.get_gid() == "restart"]
    assert [r.get_xdata()[0] for r in restarts] == report["schedule"]["restart_epochs"] == [1]
    # Per-module bars = the verification's exact scores, in its order.
    bars = [p for p in ax["modules"].patches if p.get_gid() == "module_exact"]
    assert [b.get_height() for b in bars] == [m["exact"] for m in verification["modules"].values()]
    assert NO_DATA not in texts(ax["modules"])


def test_nonfinite_and_missing_data_are_said_not_drawn() -> None:
    report = {
        "status": "running",
        "epochs": [
            {"epoch": 1, "train_loss": 2.0, "val_loss": None, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0,
             "val_token_acc": None, "global_step": 4},
            {"epoch": 2, "train_loss": "nan", "val_loss": None, "lr": 1e-3, "grad_norm": "inf", "tokens_per_s": 10.0,
             "val_token_acc": None, "global_step": 8},
        ],
        "batch_losses": [],
    }  # fmt: skip
    ax = axes_by_gid(build_figure(report, None))
    assert list(line(ax["loss"], "train_loss").get_ydata()) == [2.0]
    assert "1 non-finite value(s) not drawn" in texts(ax["loss"])
    assert "1 non-finite value(s) not drawn" in texts(ax["grad_norm"])
    assert NO_DATA in texts(ax["val_token_acc"]) and NO_DATA in texts(ax["modules"])
    assert not [ln for ln in ax["val_token_acc"].get_lines()]
    empty = axes_by_gid(build_figure({"status": "running", "epochs": []}, None))
    assert all(NO_DATA in texts(a) for a in empty.values())
    assert all(not a.get_lines() for a in empty.values())


def _write_report(path: Path, report: dict) -> None:  # type: ignore[type-arg]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report), encoding="utf-8")
    tmp.replace(path)


def test_realtime_stops_when_the_run_finishes(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = run_and_data
    report = json.loads((run / "experiment_report.json").read_text(encoding="utf-8"))
    live = dict(report, status="running", epochs=report["epochs"][:1])
    log_dir = tmp_path / "live"
    log_dir.mkdir()
    _write_report(log_dir / "experiment_report.json", live)
    stream = io.StringIO()
    result: dict[str, object] = {}
    t = threading.Thread(
        target=lambda: result.update(
            r=watch(log_dir, interval=0.05, idle_timeout=60, stream=stream, rich=False)
        )
    )
    t.start()
    time.sleep(0.5)
    _write_report(
        log_dir / "experiment_report.json", dict(report, status="running", epochs=report["epochs"][:2])
    )
    time.sleep(0.5)
    _write_report(log_dir / "experiment_report.json", dict(report, status="finished"))
    t.join(timeout=30)
    assert not t.is_alive(), "realtime mode did not stop after the run finished"
    r = result["r"]
    assert r.reason == "finished" and r.renders >= 2  # type: ignore[attr-defined]
    assert (log_dir / "training_dashboard.png").is_file()
    text = stream.getvalue()
    assert "status: running" in text and "status: finished" in text
    first_fields = [ln.split()[0] for ln in text.splitlines() if ln.strip()]
    assert first_fields.count("1") == 1 and first_fields.count("3") == 1  # each epoch row printed once


def test_realtime_stops_when_idle(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = run_and_data
    log_dir = tmp_path / "stalled"
    log_dir.mkdir()
    report = json.loads((run / "experiment_report.json").read_text(encoding="utf-8"))
    _write_report(log_dir / "experiment_report.json", dict(report, status="running"))
    started = time.monotonic()
    r = watch(log_dir, interval=0.05, idle_timeout=0.4, stream=io.StringIO(), rich=False)
    assert r.reason == "idle" and r.renders == 1 and time.monotonic() - started < 10


def test_realtime_cli_exits_by_itself(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = run_and_data
    log_dir = tmp_path / "done"
    shutil.copytree(run, log_dir)
    assert main(["visualize", "--log-dir", str(log_dir), "--mode", "realtime", "--interval", "0.05"]) == 0


def test_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "experiment_report.json").write_text("[1, 2", encoding="utf-8")
    for argv in (
        ["visualize", "--log-dir", str(tmp_path / "missing")],
        ["visualize", "--log-dir", str(tmp_path)],  # no report
        ["visualize", "--log-dir", str(broken)],
        ["visualize", "--log-dir", str(broken), "--mode", "realtime"],
        ["visualize", "--log-dir", str(tmp_path / "missing"), "--mode", "realtime"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
