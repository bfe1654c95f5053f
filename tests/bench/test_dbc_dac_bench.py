"""bench/dbc_dac.py: the DBC-DAC cost breakdown, on CPU with the tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.dbc_dac import main, parse_args


def test_reports_each_part_of_an_application(tmp_path: Path) -> None:
    out = tmp_path / "dbc.json"
    assert (
        main(["--device", "cpu", "--preset", "tiny", "--repeats", "2", "--warmup", "1", "--out", str(out)])
        == 0
    )
    report = json.loads(out.read_text())
    assert set(report["ms"]) == {"application", "dispatch", "clean_each", "clean_all", "stabilize"}
    assert all(v > 0 for v in report["ms"].values())
    # The tiny preset's only gradient above min_numel is the 5000 x 32 embedding.
    assert report["target_groups"] == {"5000x32": 1}
    assert report["ms_per_step_at_default_cadence"] == pytest.approx(
        report["ms"]["application"] / 20, abs=1e-3
    )


def test_bad_counts_are_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0", "--out", "x.json"])
