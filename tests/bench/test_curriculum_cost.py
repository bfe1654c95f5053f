"""bench/curriculum_cost.py: the host time a run's worked-steps curriculum adds, rebuilt against in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.curriculum_cost import main


def test_times_plain_rebuild_and_in_place_over_the_same_epochs(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    assert main(["--size", "small", "--epochs", "4", "--full", "1", "--ramp", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    plain, rebuild, in_place = result["results"]
    assert [r["kind"] for r in result["results"]] == ["plain", "rebuild", "in_place"]
    assert plain["target_changes"] == 0 and plain["added_s"] == 0
    assert (
        rebuild["target_changes"] == in_place["target_changes"] >= 2
    )  # steps, then at least one cut, then plain
    assert rebuild["batches"] == in_place["batches"] == plain["batches"] > 0


@pytest.mark.parametrize("argv", [["--full", "40", "--ramp", "20"], ["--ramp", "-1"]])
def test_refuses_a_schedule_that_does_not_end_in_plain_epochs(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
