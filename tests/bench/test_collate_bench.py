"""bench/collate.py: an epoch's batches row by row against cut from the padded table, on the small data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.collate import main


def test_reports_both_ways_per_batch_size(tmp_path: Path) -> None:
    out = tmp_path / "collate.json"
    assert main(["--size", "small", "--batch-sizes", "16", "64", "--epochs", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["size"] == "small" and report["train_rows"] > 0
    assert [r["batch_size"] for r in report["rows"]] == [16, 64]
    for r in report["rows"]:
        assert r["batches"] == -(-report["train_rows"] // r["batch_size"])
        assert r["table_ms"] > 0 and r["row_by_row_ms"] > 0


@pytest.mark.parametrize(
    "argv", [["--epochs", "0"], ["--batch-sizes", "0"], ["--batch-sizes", "x"], ["--size", "huge"]]
)
def test_bad_arguments_exit_2_and_leave_the_output_alone(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "collate.json"
    out.write_text("earlier results\n")
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(out)])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert out.read_text() == "earlier results\n"
