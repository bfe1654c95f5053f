"""The Playground step (``TrainStep``): gradient buffers under CUDA graphs, and the compiled step on a GPU."""

from __future__ import annotations

import pytest
import torch

from apt_model.config import TrainConfig, model_preset
from apt_model.model import APTModel
from apt_model.training.batching import Batch
from apt_model.training.fastpath import TrainStep


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models: one intra-op thread (see the root conftest's ``one_thread``)."""


def random_window(n_batches: int, rows: int, device: torch.device, seed: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    window = []
    for _ in range(n_batches):
        src = torch.randint(4, 60, (rows, 12), generator=gen)
        tgt = torch.randint(4, 60, (rows, 6), generator=gen)
        tgt[:, -2:] = 0  # some padding in the targets
        tgt_in = torch.cat([torch.full((rows, 1), 2), tgt[:, :-1]], dim=1)
        window.append(Batch(src, tgt_in, tgt, int((tgt != 0).sum())).to(device))
    return window


def make_step(device: torch.device, **kw: object) -> tuple[APTModel, TrainStep]:
    torch.manual_seed(0)
    model = APTModel(model_preset("tiny", dropout=0.0)).to(device)
    cfg = TrainConfig(weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=cfg.weight_decay)
    return model, TrainStep(model, cfg, optimizer=opt, device=device, precision="fp32", pad_id=0, **kw)  # type: ignore[arg-type]


def test_graph_mode_keeps_its_own_grad_buffers_and_trains_identically() -> None:
    """Under CUDA graphs the step accumulates into ``.grad`` buffers it owns and zeroes them in place; the updates
    equal those of the ``set_to_none`` path (every parameter gets a gradient, so AdamW sees the same inputs)."""
    cpu = torch.device("cpu")
    ref_model, ref = make_step(cpu)
    model, step = make_step(cpu)
    step.graphs = True  # the CUDA-graph gradient handling, without needing a GPU to compile for
    buffers = None
    for n in range(3):
        window = random_window(2, 4, cpu, seed=n)
        out_ref, out = ref(window, n + 1), step(window, n + 1)
        assert out.loss == pytest.approx(out_ref.loss, rel=1e-6)
        assert all(p.grad is None for p in ref_model.parameters())
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and not g.any() for g in grads)  # zeroed in place, not dropped
        ptrs = [g.data_ptr() for g in grads if g is not None]
        buffers = buffers or ptrs
        assert ptrs == buffers  # the same buffers every step
    for p_ref, p in zip(ref_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the GPU machine)")
def test_compiled_step_with_cuda_graphs_accumulates_like_eager() -> None:
    """Two micro-batches per step through the compiled step with CUDA graphs (pytorch/pytorch#169545 made the
    second micro-batch's backward fail when ``.grad`` held the graph's output) give eager's losses."""
    cuda = torch.device("cuda")
    _, eager = make_step(cuda)
    _, fast = make_step(cuda, compiled=True, cuda_graphs=True)
    assert fast.graphs
    for n in range(6):  # past cudagraph trees' warm-up and recording runs, into replays
        window = random_window(2, 8, cuda, seed=n)
        ref, out = eager(window, n + 1), fast(window, n + 1)
        assert out.applied
        assert out.loss == pytest.approx(ref.loss, rel=2e-3, abs=2e-3)
