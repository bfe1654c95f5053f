"""bench/quality_run.py: the user path (generate, train, verify) and the score on another size's val split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from apt_model.data import generate
from bench.quality_run import cross_val, main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One epoch of the tiny preset on the small data, on CPU, also scored on the default size's val split."""
    out = tmp_path_factory.mktemp("quality")
    argv = [
        "--out",
        str(out),
        "--tag",
        "t",
        "--device",
        "cpu",
        "--data-size",
        "small",
        "--also-val-size",
        "default",
    ]
    assert main([*argv, "--", "--preset", "tiny", "--epochs", "1", "--compile", "off"]) == 0
    return out / "t", json.loads((out / "t" / "quality.json").read_text())


def test_runs_the_user_path_and_scores_the_other_sizes_val(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    _, report = tiny_run
    assert [s["name"] for s in report["steps"]] == [
        "generate", "train", "verify_train", "verify_val", "generate_default", "verify_val_default",
    ]  # fmt: skip
    assert all(s["rc"] == 0 for s in report["steps"])
    default_val = generate("hardcore", size="default")["metadata"]["split_counts"]["val"]
    cross = report["exact_val_default"]
    assert cross["n"] == default_val != report["exact_val"]["n"]
    # Both sizes hold out by the same keys, so none of default's val problems is one of small's training inputs.
    assert cross["val_inputs_in_our_training_split"] == 0
    assert set(cross["by_kind"]) == {"arithmetic", "geometry", "physics"}
    assert 0.0 <= cross["overall"] <= 1.0


def test_counts_the_other_val_problems_that_were_trained_on(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    run, _ = tiny_run
    # The same data with nothing held out: every val input of the small size is now a training input.
    doc = json.loads((run / "hardcore.json").read_text())
    small_val = len(doc["metadata"]["splits"]["val"])
    doc["metadata"]["splits"]["val"] = []
    all_train = run / "all_train.json"
    all_train.write_text(json.dumps(doc, ensure_ascii=False))
    report: dict[str, Any] = {"steps": []}
    cross_val("small", all_train, run / "run", run, report, run / "log.txt", "cpu")
    assert report["exact_val_small"]["val_inputs_in_our_training_split"] == small_val > 0
