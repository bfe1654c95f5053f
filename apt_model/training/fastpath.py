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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from apt_model.config import TrainConfig
from apt_model.model.dbc_dac import DBCDAC
from apt_model.training.batching import Batch


@dataclass
class StepOutput:
    loss: float  # token-weighted mean loss of the window (may be nan/inf)
    grad_norm: float  # global gradient norm before clipping (may be nan/inf)
    applied: bool  # False when the update was withheld because the loss or gradients were not finite


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
        if compiled:
            self.graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
            mode = "reduce-overhead" if self.graphs else "default"
            self._loss = torch.compile(self._eager_loss, mode=mode, dynamic=False)

    def _own_grad_buffers(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _clear_grads(self) -> None:
        # set_to_none would hand the next backward's graph-pool outputs to .grad again (see the module docstring).
        self.optimizer.zero_grad(set_to_none=not self.graphs)

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
