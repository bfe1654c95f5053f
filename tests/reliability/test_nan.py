"""Row "NaN/Inf loss or gradients": detected within one optimizer step; ``stop`` fails with a diagnosis, ``skip``
drops the update and goes on.

Loop-level tests (a NaN injected at an exact micro-batch): ``tests/training/test_loop.py::
test_nan_stop_writes_report_and_names_the_step`` and ``::test_nan_skip_counts_and_continues``. Here the same
through the CLI with a real divergence: a learning rate of 1e30 blows the weights up after the first update.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from apt_model.checkpoint import load_model
from apt_model.cli import main
from tests.reliability.helpers import TRAIN_FLAGS, assert_one_error_line, count


def _argv(run: Path, dataset: Path, policy: str) -> list[str]:
    return [*TRAIN_FLAGS, "--dataset", str(dataset), "--save-dir", str(run), "--no-tracking", "--epochs", "2",
            "--lr", "1e30", "--min-lr", "0", "--nan-policy", policy]  # fmt: skip


def test_cli_divergence_stops_at_the_first_bad_step(
    tmp_path: Path, rel_dataset: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    run = tmp_path / "run"
    count("faults:divergence")
    assert main(_argv(run, rel_dataset, "stop")) == 2
    line = assert_one_error_line(capsys.readouterr().err, "non-finite", "optimizer step")
    report = json.loads((run / "experiment_report.json").read_text(encoding="utf-8"))
    assert report["status"] == "failed" and report["final"]["error"] in line
    (event,) = report["nan_events"]
    bad_step = event["global_step"]
    assert event["action"] == "stop" and f"optimizer step {bad_step} " in line
    # Detected within one step: every step before the reported one had a finite loss, none after it ran.
    steps = [s for s, _ in report["batch_losses"]]
    assert steps == list(range(1, bad_step)) and all(math.isfinite(v) for _, v in report["batch_losses"])
    assert not (run / "final_model.pt").exists()


def test_cli_divergence_with_skip_drops_updates_and_finishes(
    tmp_path: Path, rel_dataset: Path, one_thread: None
) -> None:
    run = tmp_path / "run"
    count("faults:divergence")
    assert main(_argv(run, rel_dataset, "skip")) == 0
    report = json.loads((run / "experiment_report.json").read_text(encoding="utf-8"))
    total = 2 * report["runtime"]["steps_per_epoch"]
    skipped = report["final"]["skipped_steps"]
    assert report["status"] == "finished" and 1 <= skipped < total
    assert len(report["nan_events"]) == skipped and all(e["action"] == "skip" for e in report["nan_events"])
    model = load_model(run).model
    assert all(
        bool(p.isfinite().all()) for p in model.parameters()
    )  # a skipped update never reaches the weights
