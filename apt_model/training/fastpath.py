"""One optimizer step of the Playground loop — eager, or the fast path — shared with ``bench/train_step.py``.

A call of :class:`TrainStep` runs one accumulation window: forward + backward per micro-batch (each micro-batch's
mean CE weighted by its share of the window's target tokens), then unscaling (fp16), DBC-DAC on its cadence,
clipping, a finiteness check and the AdamW update. It returns host floats of the window loss and the pre-clip
gradient norm, read back together in one transfer — the step's only host synchronisation, which is what lets the
NaN policy act before a bad update is applied.

The fast path (``compiled=True``; ``TrainConfig.compile`` ``auto`` picks it on CUDA) compiles the loss computation
— the model forward with its autopoietic transforms and the cross-entropy — with ``torch.compile(dynamic=False)``,
so the transform's elementwise ops and per-matrix reductions fuse into a few kernels. On CUDA it also uses CUDA
graphs (``mode="reduce-overhead"``), which removes the launch overhead that dominates small batches; shapes must
repeat for the graphs to be reused, so the loop pads every batch to one fixed ``(max_src_len, max_tgt_len)`` when
compiled, and fills a short last batch with all-padding rows (no target tokens, so no effect on loss or gradient)
rather than presenting a new batch size, which would cost a second compilation and a second graph. There is no
``max-autotune``: its GEMM search costs minutes of start-up for little gain at these sizes.

Under CUDA graphs the parameters keep ``.grad`` buffers of their own, zeroed in place after each step: a gradient
that autograd stores by stealing the backward graph's output tensor lives in the graph's memory pool, and the next
micro-batch's replay overwrites it, so accumulating a second micro-batch into it fails ("accessing tensor output of
CUDAGraphs that has been overwritten by a subsequent run"; pytorch/pytorch#169545). With a buffer already there,
autograd adds the new gradient into it while the graph output is still valid.

**The whole step as CUDA graphs** (``step_graph``; on by default with CUDA graphs in bf16/fp32 and a fused AdamW).
Graphing the loss alone leaves the rest of the step to the host: autograd's gradient accumulation (one add per
parameter), clipping, the optimizer and the read-back cost ~12 ms of host time per step on an H200 host, more than the
GPU's own work at B=16 and most of it at B=256 (``bench/step_profile.py``, BENCHMARKS.md). So after
``STEP_GRAPH_WARMUP`` ordinary compiled steps the step is captured as three graphs that replay in order:

- ``first``: forward + backward of a window's first micro-batch. Captured with ``.grad`` unset, so autograd hands
  each parameter the graph's own gradient tensor: replays overwrite the gradients, no zeroing and no adds;
- ``more``: any further micro-batch of the window, accumulating into those gradients (captured when first needed);
- ``update``: clipping, the finiteness check and fused AdamW. The update is withheld **on the device** when the loss
  or the gradient norm is not finite (the optimizer's ``found_inf``, which also leaves the step count alone), so the
  NaN policy still acts before a bad update is applied, without a host round trip in the middle of the step.

DBC-DAC runs between ``first``/``more`` and ``update`` on its cadence, on the graph's gradient tensors in place.
Inputs are copied into static buffers and the learning rate into device tensors before each replay. Loss and norm
(for the report and the NaN policy) come back in a non-blocking copy: :meth:`TrainStep.launch` returns before they
arrive, and the Playground loop reads step n's only after launching step n + 1, so the GPU never waits for the
host's turn-around between steps. Only the NaN policy's reaction moves one step later (a bad update itself is already
withheld on the device); ``nan_policy=stop`` raises naming the bad step. A window whose batch shape is not
the captured one runs as an ordinary compiled step. With ``cuda_graphs=False`` the same three parts run uncaptured
(any batch shape), which is how the CPU tests check them against the ordinary step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from apt_model.config import TrainConfig
from apt_model.model.dbc_dac import DBCDAC
from apt_model.training.batching import Batch

# Inductor options for the compiled loss (torch.compile's ``options``), on top of the mode's; bench/train_step.py's
# ``--inductor-option`` sets them to compare. ``fallback_random``: dropout's random numbers from ATen's kernel, which
# draws four per Philox call, instead of inductor's one (torch 2.11 has no 4-at-a-time draw): the B=256 step ran
# 16.35 ms against 16.83 ms on the H200. ``combo_kernels``: inductor's horizontal fusion, which runs independent
# kernels of the graph as one launch, each on its own blocks, so small ones overlap instead of queueing: 15.76
# against 16.15 ms (BENCHMARKS.md).
INDUCTOR_OPTIONS: dict[str, object] = {"fallback_random": True, "combo_kernels": True}


def compile_seconds() -> dict[str, float]:
    """Seconds this process has spent in torch.compile's timed phases, summed per phase (``{}`` if it never compiled).

    The cold first epoch of a GPU run is mostly compilation (about a minute on an H200 against ~2 s for a later
    epoch), so the training report keeps this breakdown to show which phase that minute goes to. The phases nest
    (Dynamo's total contains the backend's), so they are not to be added up.
    """
    from torch._dynamo.utils import compilation_time_metrics

    return {name: round(sum(times), 3) for name, times in compilation_time_metrics.items() if times}


# Ordinary compiled steps before the capture: compilation, autotuning, cuBLAS and optimizer state all happen here,
# never inside a capture (a lazily created optimizer state would be re-zeroed by every replay).
STEP_GRAPH_WARMUP = 3


@dataclass
class StepOutput:
    loss: float  # token-weighted mean loss of the window (may be nan/inf)
    grad_norm: float  # global gradient norm before clipping (may be nan/inf)
    applied: bool  # False when the update was withheld because the loss or gradients were not finite

    @classmethod
    def withheld_unless_finite(cls, loss: float, grad_norm: float) -> StepOutput:
        """The whole-step path's outcome: its optimizer withholds the update when either number is not finite."""
        return cls(loss, grad_norm, applied=math.isfinite(loss) and math.isfinite(grad_norm))


class PendingStep:
    """A launched optimizer step; :meth:`result` has its :class:`StepOutput`, waiting for the device if needed.

    The ordinary step decides on the host whether to apply the update, so it is resolved before it is returned. The
    whole-step graphs withhold a bad update on the device: their loss and norm travel back in a non-blocking copy,
    and a caller that asks for them only after launching the next step (the Playground loop) keeps the GPU fed
    instead of idling through the host's turn-around between steps.
    """

    def __init__(
        self,
        output: StepOutput | None = None,
        *,
        host: Tensor | None = None,
        ready: torch.cuda.Event | None = None,
    ) -> None:
        self._output = output
        self._host = host
        self._ready = ready

    @property
    def done(self) -> bool:
        return self._output is not None

    def result(self) -> StepOutput:
        if self._output is None:
            assert self._host is not None and self._ready is not None
            self._ready.synchronize()
            self._output = StepOutput.withheld_unless_finite(*self._host.tolist())
            self._host = self._ready = None
        return self._output


class TrainStep:
    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        *,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        precision: str,
        pad_id: int,
        compiled: bool = False,
        cuda_graphs: bool | None = None,
        step_graph: bool | None = None,
        scaler: torch.amp.GradScaler | None = None,
        dbc: DBCDAC | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.optimizer = optimizer
        self.device = device
        self.precision = precision
        self.pad_id = pad_id
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.dbc = dbc
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._loss: Callable[[Tensor, Tensor, Tensor], Tensor] = self._eager_loss
        self.graphs = False
        self.whole: _WholeStep | None = None
        if compiled:
            self.graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if step_graph is None:
            step_graph = compiled and self.graphs and whole_step_supported(optimizer, precision, self.scaler)
        elif step_graph and not whole_step_supported(optimizer, precision, self.scaler):
            raise ValueError(
                "step_graph needs a fused Adam/AdamW optimizer and bf16/fp32 (no fp16 loss scaling)"
            )
        if compiled:
            # With the whole step graphed, the loss is compiled without cudagraph trees (we capture it ourselves).
            # torch.compile takes a mode or options, not both: mode "reduce-overhead" is the option below.
            tree_graphs = {"triton.cudagraphs": True} if self.graphs and not step_graph else {}
            self._loss = torch.compile(
                self._eager_loss, options={**tree_graphs, **INDUCTOR_OPTIONS}, dynamic=False
            )
        if step_graph:
            self.whole = _WholeStep(self, capture=self.graphs)
            if self.graphs and dbc is not None:
                # Eagerly, an application issues ~560 kernels from the host (~19 ms on the H200 host), longer than
                # the forward/backward graph it overlaps; replayed from its own graph it takes ~1 ms of host time.
                # It recaptures whenever the gradients' storage changes, so this is safe before our capture too.
                dbc.cuda_graph = True

    def _own_grad_buffers(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _clear_grads(self) -> None:
        # set_to_none would hand the next backward's graph-pool outputs to .grad again (see the module docstring);
        # once the whole step is captured, .grad *is* the graph's gradient output and must stay attached.
        self.optimizer.zero_grad(set_to_none=not self.graphs and not (self.whole and self.whole.captured))

    def _eager_loss(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> Tensor:
        # Through the loop module's attribute, so the objective stays the one every backend (and test) shares.
        from apt_model.training import loop

        with loop.autocast_context(self.device, self.precision):
            out = loop.compute_loss(
                self.model,
                Batch(src, tgt_in, tgt_out, 0),
                pad_id=self.pad_id,
                label_smoothing=self.cfg.label_smoothing,
            )
        return out.loss

    def backward(self, window: list[Batch]) -> Tensor:
        """Backward over one accumulation window; returns its token-weighted mean loss (0-dim, on device).

        Weighting each micro-batch's mean by its share of the window's target tokens makes the accumulated
        gradient equal to that of one batch holding every row of the window — short last windows included.
        """
        n_window = max(sum(b.n_tokens for b in window), 1)
        if self.graphs:
            self._own_grad_buffers()
        loss_acc = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in window:
            b = batch.to(self.device, non_blocking=True)
            weight = batch.n_tokens / n_window
            # Under CUDA graphs the output lives in the graph's memory pool until the next replay: use it now.
            loss = self._loss(b.src, b.tgt_in, b.tgt_out)
            self.scaler.scale(loss * weight).backward()
            loss_acc += loss.detach().float() * weight
        return loss_acc

    def __call__(self, window: list[Batch], step_number: int) -> StepOutput:
        """Run one optimizer step; ``step_number`` is the 1-based optimizer step (DBC-DAC's cadence)."""
        return self.launch(window, step_number).result()

    def launch(self, window: list[Batch], step_number: int) -> PendingStep:
        """Start one optimizer step; its outcome may still be on the device (see :class:`PendingStep`).

        Steps run in launch order whenever their results are read; a caller may hold one step's result while it
        launches the next.
        """
        if self.whole is None:
            return PendingStep(self._ordinary_step(window, step_number))
        if self.whole.ready_for(window):
            return self.whole.launch(window, step_number)
        if self.whole.captured:
            self.optimizer.zero_grad(set_to_none=False)  # the graphs leave the last step's gradients in place
        with self.whole.side_stream():  # warm-up steps on the stream the capture will use
            return PendingStep(self._ordinary_step(window, step_number))

    def _ordinary_step(self, window: list[Batch], step_number: int) -> StepOutput:
        loss_acc = self.backward(window)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.dbc is not None:
            # On the accumulated, unscaled gradient, before clipping.
            self.dbc.step(self.params, step_number)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad_norm)
        loss_f, norm_f = torch.stack([loss_acc, grad_norm.float()]).tolist()  # the step's one host sync
        # With fp16 loss scaling, inf gradients are the scaler's business (it skips and lowers the scale).
        finite = math.isfinite(loss_f) and (self.scaler.is_enabled() or math.isfinite(norm_f))
        if not finite:
            self._clear_grads()
            return StepOutput(loss_f, norm_f, applied=False)
        self.scaler.step(self.optimizer)  # with the scaler disabled this is optimizer.step()
        self.scaler.update()
        self._clear_grads()
        return StepOutput(loss_f, norm_f, applied=True)


def whole_step_supported(
    optimizer: torch.optim.Optimizer, precision: str, scaler: torch.amp.GradScaler | None
) -> bool:
    """The whole-step path withholds bad updates through the fused Adam kernels' ``found_inf``; fp16's loss scaler
    already owns that flag (and its scale changes on the host), so it keeps the ordinary step."""
    fused = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups
    )
    return fused and precision != "fp16" and not (scaler is not None and scaler.is_enabled())


class _WholeStep:
    """The step's three parts (see the module docstring), captured as CUDA graphs or run as they are."""

    def __init__(self, step: TrainStep, *, capture: bool) -> None:
        self.step = step
        self.capture = capture
        self.warmup_left = STEP_GRAPH_WARMUP if capture else 0
        dev = step.device
        self.weight = torch.zeros((), dtype=torch.float32, device=dev)
        self.loss_acc = torch.zeros((), dtype=torch.float32, device=dev)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=dev)
        self.out = torch.zeros(2, dtype=torch.float32, device=dev)
        self.lrs = [torch.zeros((), dtype=torch.float32, device=dev) for _ in step.optimizer.param_groups]
        self.inputs: tuple[Tensor, Tensor, Tensor] | None = None
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.stream: torch.cuda.Stream | None = None
        self.captured = False
        # Host copies of (loss, norm) for the steps whose results are still being read: two, so that one step's
        # copy can land while the caller still holds the previous one. A slot is read out before it is reused.
        self.readback: list[tuple[Tensor, torch.cuda.Event]] = []
        self.readback_owner: list[PendingStep | None] = []
        self.launches = 0

    def ready_for(self, window: list[Batch]) -> bool:
        """True when this window runs here; warm-up windows and odd shapes take the ordinary compiled step."""
        if not self.capture:
            return True  # uncaptured, any shape runs
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return False
        first = window[0]
        if self.inputs is None:
            dev = self.step.device
            self.inputs = tuple(
                torch.empty_like(t, device=dev) for t in (first.src, first.tgt_in, first.tgt_out)
            )
        return all(
            (b.src.shape, b.tgt_in.shape, b.tgt_out.shape) == tuple(t.shape for t in self.inputs)
            for b in window
        )

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        if not self.capture:
            yield
            return
        side = self._side_stream()
        current = torch.cuda.current_stream(self.step.device)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                yield
        finally:
            current.wait_stream(side)

    def _side_stream(self) -> torch.cuda.Stream:
        """The stream of the warm-up steps and the captures (one, made on first use)."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.step.device)
        return self.stream

    # -- the three parts ---------------------------------------------------------------------------------------
    def _micro_batch(self, first: bool) -> None:
        src, tgt_in, tgt_out = self.inputs  # type: ignore[misc]
        loss = self.step._loss(src, tgt_in, tgt_out)
        (loss * self.weight).backward()
        share = loss.detach().float() * self.weight
        if first:
            self.loss_acc.copy_(share)
        else:
            self.loss_acc.add_(share)

    def _update(self) -> None:
        step, opt = self.step, self.step.optimizer
        norm = torch.nn.utils.clip_grad_norm_(step.params, step.cfg.clip_grad_norm)
        finite = torch.isfinite(self.loss_acc) & torch.isfinite(norm)
        self.found_inf.copy_((~finite).float())
        self.out.copy_(torch.stack([self.loss_acc, norm.float()]))
        # The captured kernels read the learning rate from device tensors (refilled before each replay) and
        # skip the update where found_inf is 1; the param groups keep their plain floats for everyone else.
        saved = [(g["lr"], g.get("capturable", False)) for g in opt.param_groups]
        for g, lr in zip(opt.param_groups, self.lrs, strict=True):
            g["lr"] = lr
            g["capturable"] = self.capture
        opt.found_inf = self.found_inf  # type: ignore[attr-defined]
        try:
            opt.step()
        finally:
            del opt.found_inf  # type: ignore[attr-defined]
            for g, (lr, capturable) in zip(opt.param_groups, saved, strict=True):
                g["lr"] = lr
                g["capturable"] = capturable

    # -- running them ------------------------------------------------------------------------------------------
    def _run(self, name: str, fn: Callable[[], None]) -> None:
        if not self.capture:
            fn()
            return
        graph = self.graphs.get(name)
        if graph is None:
            side = self._side_stream()
            first = self.graphs.get("first")
            graph = torch.cuda.CUDAGraph()
            side.wait_stream(torch.cuda.current_stream(self.step.device))
            # One memory pool for all three: they always replay one after another, never concurrently.
            with torch.cuda.graph(graph, pool=first.pool() if first is not None else None, stream=side):
                fn()
            torch.cuda.current_stream(self.step.device).wait_stream(side)
            self.graphs[name] = graph
            self.captured = True
        graph.replay()

    def _read_back(self) -> PendingStep:
        """(loss, norm) of the step just replayed, copied to the host without waiting for it."""
        if not self.readback:
            self.readback = [
                (torch.empty(2, dtype=torch.float32, pin_memory=True), torch.cuda.Event()) for _ in range(2)
            ]
            self.readback_owner = [None, None]
        slot = self.launches % 2
        self.launches += 1
        previous = self.readback_owner[slot]
        if previous is not None:
            previous.result()  # its values leave the slot before this step's overwrite them
        host, ready = self.readback[slot]
        host.copy_(self.out, non_blocking=True)
        ready.record()
        pending = PendingStep(host=host, ready=ready)
        self.readback_owner[slot] = pending
        return pending

    def launch(self, window: list[Batch], step_number: int) -> PendingStep:
        step = self.step
        if self.capture and "first" not in self.graphs:
            # Capturing with .grad unset makes the graph's gradient tensors the parameters' .grad.
            step.optimizer.zero_grad(set_to_none=True)
        n_window = max(sum(b.n_tokens for b in window), 1)
        for i, batch in enumerate(window):
            tensors = (batch.src, batch.tgt_in, batch.tgt_out)
            if self.capture:  # the graphs read these buffers
                for static, t in zip(self.inputs, tensors, strict=True):  # type: ignore[arg-type]
                    if t.device.type == "cpu" and not t.is_pinned():
                        # From pageable memory the copy may wait for the GPU to drain, which would undo the
                        # late read-back; pinned blocks are reused only once the copies that read them are done.
                        t = t.pin_memory()
                    static.copy_(t, non_blocking=True)
            else:
                self.inputs = tuple(t.to(step.device, non_blocking=True) for t in tensors)  # type: ignore[assignment]
            self.weight.fill_(batch.n_tokens / n_window)
            if i == 0:
                self._run("first", lambda: self._micro_batch(True))
            else:
                self._run("more", lambda: self._micro_batch(False))
        if step.dbc is not None:
            step.dbc.step(step.params, step_number)  # in place, on the gradients the graphs write
        for lr, group in zip(self.lrs, step.optimizer.param_groups, strict=True):
            lr.fill_(float(group["lr"]))
        self._run("update", self._update)
        if self.capture:
            return self._read_back()
        output = StepOutput.withheld_unless_finite(*self.out.tolist())
        step._clear_grads()
        return PendingStep(output)
