"""Fixtures shared across test modules."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

ZODIAC = "鼠牛虎兔龙蛇马羊猴鸡狗猪"


def pytest_configure(config: pytest.Config) -> None:
    # `make test` runs two xdist workers on CI's two cores: one intra-op thread each, not two pairs contending.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def write_arith_dataset(path: Path) -> Path:
    """64 sums + 12 zodiac facts, hardcore format, an explicit val split (every 8th sum, 2 zodiac facts)."""
    arith = [{"input": f"{a} + {b} = ?", "output": str(a + b)} for a in range(8) for b in range(8)]
    zodiac = [{"input": f"{z}后面是什么生肖？", "output": ZODIAC[(i + 1) % 12]} for i, z in enumerate(ZODIAC)]
    val = [r["input"] for i, r in enumerate(arith) if i % 8 == 3] + [zodiac[4]["input"], zodiac[9]["input"]]
    doc = {
        "metadata": {"name": "test arithmetic", "splits": {"val": val}},
        "data": {"arithmetic": arith, "zodiac": zodiac},
    }
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def arith_dataset() -> Callable[[Path], Path]:
    """Writes the small arithmetic + zodiac dataset to the given path."""
    return write_arith_dataset


@pytest.fixture(scope="session")
def run_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real Playground run (tiny preset, CPU) trained by the CLI, shared by every test of the session."""
    from apt_model.cli import main

    base = tmp_path_factory.mktemp("apt_checks_tiny_run")
    run, data = base / "run", base / "arith.json"
    write_arith_dataset(data)
    rc = main(
        ["train", "--backend", "playground", "--preset", "tiny", "--dataset", str(data), "--save-dir", str(run),
         "--epochs", "3", "--batch-size", "16", "--gradient-accumulation", "1", "--lr", "3e-3", "--t0", "1",
         "--t-mult", "2", "--log-every", "1", "--no-tracking", "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    return run, data
