"""Fixtures of the reliability tests, plus the end-of-session totals quoted in RELIABILITY.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability.helpers import COUNTS, TRAIN_FLAGS, write_dataset_file


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may touch the user's MLflow/Prefect/matplotlib state."""
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / ".mpl"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


@pytest.fixture(scope="session")
def rel_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset_file(tmp_path_factory.mktemp("rel_data") / "arith.json")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, rel_dataset: Path) -> Path:
    """A real 2-epoch Playground run through the CLI (in process): checkpoint_epoch_1/2.pt, final_model(.pt|/).

    Tests copy what they damage; the run itself is read-only for them.
    """
    import torch

    from apt_model.cli import main

    run = tmp_path_factory.mktemp("rel_tiny") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = [*TRAIN_FLAGS, "--dataset", str(rel_dataset), "--save-dir", str(run), "--epochs", "2"]
        rc = main([*argv, "--save-interval", "1", "--no-tracking"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return run


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not COUNTS:
        return
    cases = {k.split(":", 1)[1]: v for k, v in COUNTS.items() if k.startswith("cases:")}
    faults = {k.split(":", 1)[1]: v for k, v in COUNTS.items() if k.startswith("faults:")}
    tr = terminalreporter
    tr.write_sep("-", "reliability totals (RELIABILITY.md)")
    tr.write_line(
        f"generated cases: {sum(cases.values())}  " + ", ".join(f"{k}={v}" for k, v in sorted(cases.items()))
    )
    tr.write_line(
        f"faults injected: {sum(faults.values())}  "
        + ", ".join(f"{k}={v}" for k, v in sorted(faults.items()))
    )
    if os.environ.get("APT_RELIABILITY_COUNTS"):
        import json

        Path(os.environ["APT_RELIABILITY_COUNTS"]).write_text(
            json.dumps({"cases": cases, "faults": faults}, indent=2)
        )
