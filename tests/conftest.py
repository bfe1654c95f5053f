"""Fixtures shared across test modules."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it defines its own language functions, i.e. on first import (torch's compiler
# imports it): set it before anything does, so that without a GPU the fused transform's kernels run under Triton's
# interpreter (tests/model/test_fused_transform.py). With a GPU they are compiled and run on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.arith_data import write_arith_dataset

# The longest files, longest first (test time on the 2-core development machine: 442, 261, 250, 100 s of the suite's
# ~1,430 s). `make test` runs `--dist loadfile`: xdist hands whole files to whichever worker is free, in collection
# order, so these starting last would leave one worker finishing them alone.
SLOW_FILES_FIRST = (
    "tests/pipeline/test_pipeline_e2e.py",
    "tests/backends/test_deepspeed.py",
    "tests/pipeline/test_pipeline_restart.py",
    "tests/model/test_fused_transform.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(SLOW_FILES_FIRST)}
    # A stable sort: every file keeps its own tests in order (some build on an earlier test of their file).
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def pytest_configure(config: pytest.Config) -> None:
    # `make test` runs two xdist workers on CI's two cores: one intra-op thread each, not two pairs contending.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models on a 2-core machine: one intra-op thread is several times faster than two, and immune to a
    busy machine (OpenMP spin-waits)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
