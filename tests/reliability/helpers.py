"""Shared pieces of the reliability tests (RELIABILITY.md): subprocess runners, a small dataset, planted faults.

Counters: every generated (hypothesis) case and every injected fault is counted with ``count(...)``; the
reliability conftest prints the totals at the end of the session, which is where RELIABILITY.md's numbers come from.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.arith_data import write_arith_dataset

REPO = Path(__file__).resolve().parents[2]

COUNTS: Counter[str] = Counter()


def count(kind: str, n: int = 1) -> None:
    """Record ``n`` generated cases (``cases:<property>``) or injected faults (``faults:<what>``)."""
    COUNTS[kind] += n


# Flags of a tiny, fast CPU Playground run (the tiny preset; one thread per process is set in the env).
TRAIN_FLAGS = [
    "train", "--backend", "playground", "--preset", "tiny", "--batch-size", "16", "--gradient-accumulation", "1",
    "--lr", "3e-3", "--t0", "1", "--no-progress", "--device", "cpu", "--log-every", "1", "--no-dbc-dac",
]  # fmt: skip


def write_dataset_file(path: Path) -> Path:
    """64 sums + 12 zodiac facts (hardcore format, explicit val split): 4 training batches of 16."""
    return write_arith_dataset(path, name="reliability")


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment of a child ``apt`` process: repo importable, one thread, every tool's state under ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MPLCONFIGDIR=str(home / "mpl"),
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    env.update(extra)
    return env


def apt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "apt_model", *args]


def run_apt(
    args: Sequence[str], env: dict[str, str], *, timeout: float = 240, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        apt_cmd(*args), env=env, cwd=cwd or REPO, text=True, capture_output=True, timeout=timeout
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if line.strip()]


def assert_one_error_line(stderr: str, *needles: str) -> str:
    """The user sees exactly one ``error: ...`` line (no traceback), naming what went wrong."""
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got:\n{stderr}"
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under ``directory`` with its bytes (None for folders): to prove nothing was written."""
    out: dict[str, bytes | None] = {}
    for p in sorted(directory.rglob("*")):
        out[p.relative_to(directory).as_posix()] = p.read_bytes() if p.is_file() else None
    return out


# ------------------------------------------------------------------------------------------ malicious pickles
class Payload:
    """Unpickling this creates ``marker`` (a folder): proof that attacker code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def plant_malicious_checkpoints(directory: Path, marker: Path) -> list[Path]:
    """Two attacker files shaped like checkpoints: torch's zip format and a bare (legacy) pickle."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    zipped = directory / "evil_zip.pt"
    torch.save(
        {
            "format_version": 1,
            "model_config": {},
            "tokenizer_json": "{}",
            "model_state": {},
            "epoch": Payload(str(marker)),
        },
        zipped,
    )
    legacy = directory / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps({"model_config": Payload(str(marker))}, protocol=2))
    return [zipped, legacy]
