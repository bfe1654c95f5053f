"""`apt verify|diagnose|visualize|monitor`: registered, and every bad path or file is one `error:` line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apt_model.cli import build_parser, main


@pytest.fixture(autouse=True)
def _mpl_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path_factory.getbasetemp() / "mplconfig"))


def test_commands_are_registered() -> None:
    parser = build_parser()
    for cmd in ("verify", "diagnose", "visualize", "monitor"):
        args = parser.parse_args([cmd, *{"verify": ["--model", "m", "--dataset", "d"],
                                         "visualize": ["--log-dir", "x"]}.get(cmd, [])])  # fmt: skip
        assert callable(args.handler)


def _bad_files(tmp: Path) -> dict[str, Path]:
    junk = tmp / "junk.json"
    junk.write_text("{ not json", encoding="utf-8")
    wrong = tmp / "wrong.json"
    wrong.write_text(json.dumps({"something": 1}), encoding="utf-8")
    pt = tmp / "junk.pt"
    pt.write_bytes(b"\x80\x02garbage")
    ds = tmp / "ds.json"
    ds.write_text(json.dumps({"data": {"m": [{"input": "1 + 1 = ?", "output": "2"}]}}), encoding="utf-8")
    empty = tmp / "empty"
    empty.mkdir()
    return {"junk": junk, "wrong": wrong, "pt": pt, "ds": ds, "empty": empty, "missing": tmp / "missing"}


def cases(f: dict[str, Path]) -> list[list[str]]:
    s = {k: str(v) for k, v in f.items()}
    return [
        ["verify", "--model", s["missing"], "--dataset", s["ds"]],
        ["verify", "--model", s["pt"], "--dataset", s["ds"]],
        ["verify", "--model", s["empty"], "--dataset", s["ds"]],
        ["verify", "--model", s["pt"], "--dataset", s["missing"]],
        ["verify", "--model", s["pt"], "--dataset", s["junk"]],
        ["verify", "--model", s["pt"], "--dataset", s["wrong"]],
        ["verify", "--model", s["pt"], "--dataset", s["ds"], "--threshold", "m:0.5"],
        ["verify", "--model", s["pt"], "--dataset", s["ds"], "--threshold", "m=2"],
        ["verify", "--model", s["pt"], "--dataset", s["ds"], "--out", s["ds"]],
        ["verify", "--model", s["pt"], "--dataset", s["ds"], "--device", "cuda:7"],
        ["verify", "--model", s["pt"], "--dataset", s["ds"], "--batch-size", "0"],
        ["diagnose", "--run", s["missing"]],
        ["diagnose", "--run", s["empty"]],
        ["diagnose", "--dataset", s["missing"]],
        ["diagnose", "--dataset", s["junk"], "--no-env"],
        ["diagnose", "--model", s["missing"]],
        ["diagnose", "--verification", s["missing"]],
        ["diagnose", "--verification", s["junk"], "--no-env"],
        ["diagnose", "--out", s["empty"]],
        ["visualize", "--log-dir", s["missing"]],
        ["visualize", "--log-dir", s["empty"]],
        ["visualize", "--log-dir", s["ds"]],
        ["visualize", "--log-dir", s["missing"], "--mode", "realtime"],
        ["monitor", "--root", s["missing"]],
        ["monitor", "--root", s["ds"], "--once"],
        ["monitor", "--root", s["empty"], "--once"],
    ]


def test_bad_paths_and_files_give_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _bad_files(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in cases(files):
        rc = main(argv)
        captured = capsys.readouterr()
        assert rc == 2, (argv, captured.err)
        assert captured.err.startswith("error: "), (argv, captured.err)
        assert captured.err.count("\n") == 1, (argv, captured.err)
        assert "Traceback" not in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written by a refused command
