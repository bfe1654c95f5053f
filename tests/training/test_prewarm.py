"""The kernel pre-warm child (``training/prewarm.py``): when it runs, that it runs the model in a real child
process, that a failing or late child costs the run nothing, and that the loop reaps it, reports it, and kills it
when the run fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from apt_model.config import model_preset
from apt_model.training import loop, prewarm
from apt_model.training.report import read_report
from tests.training.test_loop import request


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models: one intra-op thread (see the root conftest's ``one_thread``)."""


def test_wanted_only_for_a_compiled_cuda_run_with_the_fused_transform(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv(prewarm.ENV_SWITCH, raising=False)
    assert prewarm.wanted(cuda, True, "triton")
    assert not prewarm.wanted(cpu, True, "triton")
    assert not prewarm.wanted(cuda, False, "triton")
    assert not prewarm.wanted(cuda, True, "torch")
    monkeypatch.setenv(prewarm.ENV_SWITCH, "0")
    assert not prewarm.wanted(cuda, True, "triton")


def test_a_failing_child_is_reported_and_nothing_else() -> None:
    child = prewarm.start(
        model_preset("tiny"), device=torch.device("cuda", 99), precision="bf16", src_len=12, tgt_len=6
    )
    result = child.reap(timeout=120)
    assert result["rc"] != 0 and "child" not in result


def test_a_child_still_running_at_reaping_time_is_killed() -> None:
    child = prewarm.start(
        model_preset("tiny"), device=torch.device("cpu"), precision="fp32", src_len=12, tgt_len=6
    )
    result = child.reap(timeout=0.01)  # the child needs seconds just to import torch
    assert result["killed"] and result["rc"] != 0 and child.process.poll() is not None


def test_loop_starts_the_child_and_reaps_it_after_the_first_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU the child is not wanted; forced here (the child then runs the model on the CPU) the run starts it
    once, reaps it after epoch 1 and keeps its outcome in the report."""
    started: list[prewarm.Prewarm] = []
    real_start = prewarm.start

    def start_and_let_finish(*args: object, **kwargs: object) -> prewarm.Prewarm:
        # a tiny CPU epoch ends before a child has imported torch; a GPU run's first epoch outlasts its child
        child = real_start(*args, **kwargs)  # type: ignore[arg-type]
        child.process.wait(timeout=120)
        started.append(child)
        return child

    monkeypatch.setattr(prewarm, "wanted", lambda *a: True)
    monkeypatch.setattr(prewarm, "start", start_and_let_finish)
    req = request(tmp_path, epochs=2)
    req.options = {**req.options, "pad": "fixed", "device": "cpu"}
    result = loop.run_training(req)
    report = read_report(result.report)
    assert len(started) == 1 and started[0].process.returncode == 0
    outcome = report["runtime"]["kernel_prewarm"]
    assert outcome["rc"] == 0 and outcome["seconds"] > 0 and not outcome["killed"]
    # the child ran a training-shaped step and an evaluation forward, and said how long they took
    assert set(outcome["child"]) == {"train_step", "eval_forward", "total"}
    assert all(v >= 0 for v in outcome["child"].values())


def test_no_child_on_the_cpu_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prewarm, "start", lambda *a, **kw: pytest.fail("started a child on the CPU"))
    req = request(tmp_path, epochs=1)
    req.options = {**req.options, "pad": "fixed", "device": "cpu"}
    report = read_report(loop.run_training(req).report)
    assert "kernel_prewarm" not in report["runtime"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and Triton")
def test_child_fills_the_triton_cache_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child compiles the fused transform's kernels into the cache directory it inherits."""
    cache = tmp_path / "triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    child = prewarm.start(
        model_preset("tiny"), device=torch.device("cuda", 0), precision="bf16", src_len=12, tgt_len=6
    )
    result = child.reap(timeout=300)
    assert result["rc"] == 0, result
    # three forward and five backward kernels, at least, each in its own cache entry
    assert len([p for p in cache.iterdir() if p.is_dir()]) >= 8, sorted(os.listdir(cache))


@pytest.mark.parametrize("error", [RuntimeError, loop.TrainingDivergedError])
def test_a_run_that_fails_in_its_first_epoch_kills_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    started: list[prewarm.Prewarm] = []
    real_start = prewarm.start
    monkeypatch.setattr(prewarm, "wanted", lambda *a: True)
    monkeypatch.setattr(
        prewarm, "start", lambda *a, **kw: started.append(real_start(*a, **kw)) or started[-1]
    )

    def broken_epoch(self: object, progress: object) -> dict:
        raise error("the first epoch broke")

    monkeypatch.setattr(loop._Trainer, "_train_epoch", broken_epoch)
    req = request(tmp_path, epochs=1)
    req.options = {**req.options, "pad": "fixed", "device": "cpu"}
    with pytest.raises(error, match="the first epoch broke"):
        loop.run_training(req)
    assert len(started) == 1 and started[0].process.poll() is not None  # gone, not left running
