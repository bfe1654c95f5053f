"""The Playground step (``TrainStep``): gradient buffers under CUDA graphs, the whole step as graphs (uncaptured on
the CPU, captured on a GPU), and the compiled step on a GPU."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from apt_model.config import DBCDACConfig, TrainConfig, model_preset
from apt_model.model import DBCDAC, APTModel
from apt_model.model.dropout import enable_dropout_schedule, set_dropout_on
from apt_model.training.batching import Batch
from apt_model.training.fastpath import STEP_GRAPH_WARMUP, TrainStep, compile_seconds


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


def test_compile_seconds_reports_the_phases_a_compilation_spent_time_in() -> None:
    """The training report's ``compile_seconds``: torch.compile's timed phases, each a positive sum of seconds, and
    more of them after another compilation (Dynamo's eager backend: the tracing is timed, no code is generated)."""
    before = compile_seconds()

    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    torch.compile(twice, backend="eager", dynamic=False)(torch.ones(3))
    after = compile_seconds()
    assert after and all(isinstance(v, float) and v >= 0 for v in after.values())
    grown = [name for name, seconds in after.items() if seconds > before.get(name, 0.0)]
    assert grown, (before, after)


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


@pytest.mark.parametrize(
    ("options", "step_graph", "expected"),
    [
        ({}, False, {"options": {"triton.cudagraphs": True}}),  # = mode "reduce-overhead"
        ({}, True, {"options": {}}),  # = mode "default"
        ({"fallback_random": True}, False, {"options": {"triton.cudagraphs": True, "fallback_random": True}}),
        ({"fallback_random": True}, True, {"options": {"fallback_random": True}}),
    ],
)
def test_inductor_options_reach_the_compiled_loss_with_the_modes_graphs(
    monkeypatch: pytest.MonkeyPatch, options: dict, step_graph: bool, expected: dict
) -> None:
    """torch.compile takes a mode or options, not both: cudagraph trees (mode "reduce-overhead") go in as an option."""
    from apt_model.training import fastpath

    calls: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    monkeypatch.setattr(fastpath, "INDUCTOR_OPTIONS", options)
    model = APTModel(model_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    TrainStep(model, TrainConfig(), optimizer=opt, device=torch.device("cpu"), precision="fp32", pad_id=0,
              compiled=True, cuda_graphs=True, step_graph=step_graph)  # fmt: skip
    assert calls == [{**expected, "dynamic": False}]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the GPU machine)")
def test_compiled_step_with_cuda_graphs_accumulates_like_eager() -> None:
    """Two micro-batches per step through the compiled step with CUDA graphs (pytorch/pytorch#169545 made the
    second micro-batch's backward fail when ``.grad`` held the graph's output) give eager's losses."""
    cuda = torch.device("cuda")
    _, eager = make_step(cuda)
    _, fast = make_step(cuda, compiled=True, cuda_graphs=True)
    assert fast.graphs and fast.whole is None  # make_step's AdamW is not fused: the loss-only graphs
    for n in range(6):  # past cudagraph trees' warm-up and recording runs, into replays
        window = random_window(2, 8, cuda, seed=n)
        ref, out = eager(window, n + 1), fast(window, n + 1)
        assert out.applied
        assert out.loss == pytest.approx(ref.loss, rel=2e-3, abs=2e-3)


# -- the whole step as graphs -----------------------------------------------------------------------------------
def make_whole_pair(
    device: torch.device, **kw: object
) -> tuple[list[tuple[APTModel, TrainStep]], torch.Tensor]:
    """Two identical models and steps: the ordinary step, and the step-graph path configured by ``kw``.

    Both models' outputs are multiplied by one device tensor, ``poison`` (1 or nan), so a test can make a step's
    loss non-finite through the data a captured graph reads, not through Python state it baked in.
    """
    # Dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards): a graph compiled for
    # an earlier test's hook-less model of the same structure would be reused and never see the poison.
    torch._dynamo.reset()
    poison = torch.ones((), device=device)
    pair = []
    for step_graph in (False, True):
        torch.manual_seed(0)
        model = APTModel(model_preset("tiny", dropout=0.0)).to(device)
        model.register_forward_hook(lambda _m, _i, out: out * poison)
        cfg = TrainConfig(weight_decay=0.1, dbc_dac=DBCDACConfig(every_n_steps=2, min_numel=500))
        opt = torch.optim.AdamW(model.parameters(), lr=2.0**-10, weight_decay=cfg.weight_decay, fused=True)
        step = TrainStep(
            model,
            cfg,
            optimizer=opt,
            device=device,
            precision="fp32",
            pad_id=0,
            dbc=DBCDAC(cfg.dbc_dac, seed=0),
            step_graph=step_graph,
            **kw,  # type: ignore[arg-type]
        )
        pair.append((model, step))
    return pair, poison


def run_whole_pair(
    device: torch.device,
    n_steps: int,
    poisoned: int,
    rows: int,
    atol: float = 1e-6,
    vary_rows: bool = False,
    **kw: object,
) -> TrainStep:
    """Windows of two micro-batches and, every third step, one; a learning rate that changes every step; DBC-DAC
    every second step; step ``poisoned`` non-finite. The step-graph path gives the ordinary step's numbers.

    ``atol`` bounds the weights' difference. On the CPU the two paths do the same float arithmetic (1e-6). CUDA's
    fused AdamW computes its step size on the device from a tensor learning rate and on the host from a float one,
    which differ in the last bits, and the two compiled graphs need not pick the same kernels; Adam magnifies that on
    weights near zero (up to 3.2e-5 seen on the H200 after ten steps, once other tests had compiled first). A missing
    or doubled part of the step moves weights by the learning rate's order (1e-3)."""
    pair, poison = make_whole_pair(device, **kw)
    (ref_model, ref), (model, whole) = pair
    assert ref.whole is None and whole.whole is not None
    for n in range(1, n_steps + 1):
        window = random_window(1 if n % 3 == 0 else 2, rows - (vary_rows and n % 2), device, seed=n)
        for step in (ref, whole):
            for g in step.optimizer.param_groups:
                g["lr"] = 2.0**-10 * (1 + n / 8)  # exact in float32: the captured kernels read a float32 lr
        poison.fill_(float("nan") if n == poisoned else 1.0)
        before = [p.detach().clone() for p in model.parameters()]
        out_ref, out = ref(window, n), whole(window, n)
        assert out.applied == out_ref.applied == (n != poisoned)
        if n == poisoned:
            assert not math.isfinite(out.loss)
            for p0, p in zip(
                before, model.parameters(), strict=True
            ):  # withheld on the device: nothing moved
                torch.testing.assert_close(p, p0, rtol=0, atol=0)
        else:
            assert out.loss == pytest.approx(out_ref.loss, rel=1e-5)
            assert out.grad_norm == pytest.approx(out_ref.grad_norm, rel=1e-4)
        for p_ref, p in zip(ref_model.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=atol)
    # AdamW's step count skipped the poisoned step, as the ordinary path's did.
    steps = {float(s["step"]) for s in whole.optimizer.state.values()}
    assert steps == {float(s["step"]) for s in ref.optimizer.state.values()} == {n_steps - 1}
    for g in whole.optimizer.param_groups:  # the captured tensors went back to plain floats
        assert isinstance(g["lr"], float) and not g["capturable"]
    return whole


def test_whole_step_parts_uncaptured_match_the_ordinary_step() -> None:
    """The step-graph path's three parts run as they are (no GPU): gradient accumulation weighted per micro-batch,
    DBC-DAC between backward and update, clipping, the learning rate through device tensors, and a non-finite step
    withheld by the fused optimizer's ``found_inf`` instead of on the host: the ordinary step's losses and weights."""
    run_whole_pair(
        torch.device("cpu"), n_steps=7, poisoned=4, rows=4, vary_rows=True
    )  # uncaptured: any shape


def test_step_graph_refuses_what_it_cannot_withhold_on_the_device() -> None:
    cpu = torch.device("cpu")
    model = APTModel(model_preset("tiny"))
    unfused = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="fused Adam"):
        TrainStep(
            model, TrainConfig(), optimizer=unfused, device=cpu, precision="fp32", pad_id=0, step_graph=True
        )
    fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    with pytest.raises(ValueError, match="fp16"):
        TrainStep(
            model, TrainConfig(), optimizer=fused, device=cpu, precision="fp16", pad_id=0, step_graph=True
        )
    # Not asked for: the default picks it only with CUDA graphs.
    assert (
        TrainStep(model, TrainConfig(), optimizer=fused, device=cpu, precision="fp32", pad_id=0).whole is None
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the GPU machine)")
def test_whole_step_captured_replays_the_ordinary_numbers_on_cuda() -> None:
    """Captured: after the warm-up steps the step replays three CUDA graphs, .grad is the graph's own tensor
    (the same storage every step), and the numbers stay the ordinary compiled step's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    whole = run_whole_pair(torch.device("cuda"), n_steps=STEP_GRAPH_WARMUP + 7, poisoned=STEP_GRAPH_WARMUP + 4,
                           rows=8, atol=1e-4, compiled=True, cuda_graphs=True)  # fmt: skip
    assert whole.whole is not None and whole.whole.captured
    assert set(whole.whole.graphs) == {"first", "more", "update"}
    ptrs = [p.grad.data_ptr() for p in whole.params]  # type: ignore[union-attr]
    whole(random_window(2, 8, torch.device("cuda"), seed=99), 99)
    assert [p.grad.data_ptr() for p in whole.params] == ptrs  # type: ignore[union-attr]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the GPU machine)")
def test_default_fast_path_graphs_the_whole_step_and_trains_like_eager() -> None:
    cuda = torch.device("cuda")
    _, eager = make_step(cuda)
    torch.manual_seed(0)  # make_step's initialisation
    model = APTModel(model_preset("tiny", dropout=0.0)).to(cuda)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    fast = TrainStep(model, TrainConfig(weight_decay=0.1), optimizer=opt, device=cuda, precision="fp32", pad_id=0,
                     compiled=True)  # fmt: skip
    assert fast.whole is not None  # the default on CUDA with a fused AdamW
    for n in range(STEP_GRAPH_WARMUP + 4):
        window = random_window(2, 8, cuda, seed=n)
        ref, out = eager(window, n + 1), fast(window, n + 1)
        assert out.applied
        assert out.loss == pytest.approx(ref.loss, rel=2e-3, abs=2e-3)
    assert fast.whole.captured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the GPU machine)")
def test_results_read_one_step_late_change_nothing_on_cuda() -> None:
    """The loop reads step n's loss and norm after launching step n + 1. Two captured paths, one read at once and
    one a step late (fed from pageable CPU batches, which it pins), give the same outcomes — the poisoned step's
    ``applied=False`` included — and the same weights (a step lost or applied twice moves them by the learning rate's
    order, 1e-3)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cuda = torch.device("cuda")
    torch._dynamo.reset()
    poison = torch.ones((), device=cuda)  # one tensor for both: dynamo may share their compiled graph
    steps = []
    for _ in range(2):
        torch.manual_seed(0)
        model = APTModel(model_preset("tiny", dropout=0.0)).to(cuda)
        model.register_forward_hook(lambda _m, _i, out: out * poison)
        cfg = TrainConfig(weight_decay=0.1, dbc_dac=DBCDACConfig(every_n_steps=2, min_numel=500))
        opt = torch.optim.AdamW(model.parameters(), lr=2.0**-10, weight_decay=cfg.weight_decay, fused=True)
        steps.append(TrainStep(model, cfg, optimizer=opt, device=cuda, precision="fp32", pad_id=0,
                               compiled=True, dbc=DBCDAC(cfg.dbc_dac, seed=0)))  # fmt: skip
    now, late = steps
    n_steps, poisoned = STEP_GRAPH_WARMUP + 8, STEP_GRAPH_WARMUP + 5
    read_now, read_late, in_flight = [], [], None
    for n in range(1, n_steps + 1):
        window = random_window(1 if n % 3 == 0 else 2, 8, torch.device("cpu"), seed=n)
        for step in steps:
            for g in step.optimizer.param_groups:
                g["lr"] = 2.0**-10 * (1 + n / 8)
        poison.fill_(float("nan") if n == poisoned else 1.0)
        read_now.append(now([b.to(cuda) for b in window], n))
        launched = late.launch(window, n)
        if in_flight is not None:
            read_late.append(in_flight.result())
        in_flight = launched
    assert not in_flight.done  # the last step came back unread: it was on its way while the loop went on
    read_late.append(in_flight.result())
    assert late.whole is not None and late.whole.captured
    expected = [n != poisoned for n in range(1, n_steps + 1)]
    assert [r.applied for r in read_late] == [r.applied for r in read_now] == expected
    # Two runs of the same graphs differ in the last bits (the embeddings' backward adds with atomics: 7e-7 of the
    # norm seen on the H200), and Adam magnifies that on weights near zero, as in the test above (2.3e-5 seen); a
    # step lost or applied twice would move weights by ~1e-3.
    for a, b in zip(read_now, read_late, strict=True):
        if a.applied:
            assert (b.loss, b.grad_norm) == (
                pytest.approx(a.loss, rel=1e-5),
                pytest.approx(a.grad_norm, rel=1e-5),
            )
    for p_now, p_late in zip(now.model.parameters(), late.model.parameters(), strict=True):
        torch.testing.assert_close(p_late, p_now, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the GPU machine)")
def test_replayed_steps_draw_new_dropout_masks_on_cuda() -> None:
    """Dropout's random numbers come from ATen's generator (``fallback_random``) inside the captured graphs; each
    replay must draw new ones. Same batch, learning rate 0 (the weights never move): the losses still differ from
    step to step, as eager's do, and only a frozen mask would repeat them."""
    cuda = torch.device("cuda")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = APTModel(model_preset("tiny", dropout=0.5)).to(cuda)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0, fused=True)
    fast = TrainStep(model, TrainConfig(weight_decay=0.0), optimizer=opt, device=cuda, precision="fp32", pad_id=0,
                     compiled=True)  # fmt: skip
    window = random_window(1, 8, cuda, seed=5)
    losses = [fast(window, n + 1).loss for n in range(STEP_GRAPH_WARMUP + 6)]
    assert fast.whole is not None and fast.whole.captured
    replayed = losses[STEP_GRAPH_WARMUP + 1 :]  # after the capture step
    assert len(set(replayed)) == len(replayed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the GPU machine)")
def test_dropout_schedule_switches_inside_the_captured_step_on_cuda() -> None:
    """``--dropout-epochs``: the switch is read by the captured whole step. Learning rate 0, one batch: with dropout
    on the replays' losses differ (new masks), switched off they repeat the eager no-dropout loss, and switched on
    again they differ again, all without a new capture."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cuda = torch.device("cuda")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = APTModel(model_preset("tiny", dropout=0.5)).to(cuda)
    enable_dropout_schedule(model)
    reference = copy.deepcopy(model)
    set_dropout_on(reference, False)
    cfg = TrainConfig(weight_decay=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0, fused=True)
    fast = TrainStep(model, cfg, optimizer=opt, device=cuda, precision="fp32", pad_id=0, compiled=True)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.0, weight_decay=0.0)
    eager = TrainStep(reference, cfg, optimizer=ref_opt, device=cuda, precision="fp32", pad_id=0)
    window = random_window(1, 8, cuda, seed=5)
    step = 0

    def losses(k: int) -> list[float]:
        nonlocal step
        out = []
        for _ in range(k):
            step += 1
            out.append(fast(window, step).loss)
        return out

    on = losses(STEP_GRAPH_WARMUP + 3)
    assert fast.whole is not None and fast.whole.captured
    graph = fast.whole.graphs["first"]
    set_dropout_on(model, False)
    off = losses(3)
    set_dropout_on(model, True)
    on_again = losses(3)
    expected = eager(window, 1).loss
    assert len(set(on[-3:])) == 3 and len(set(on_again)) == 3
    assert off == pytest.approx([expected] * 3, rel=1e-4)
    assert all(abs(x - expected) > 1e-3 for x in on_again)
    assert fast.whole.graphs["first"] is graph  # the same capture throughout
