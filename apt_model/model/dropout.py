"""Dropout whose keep-mask is drawn eight entries per Philox call.

Dropout's random numbers were the largest single cost among the training step's fused elementwise kernels on the
H200 (BENCHMARKS.md): inductor draws one Philox call (four 32-bit words) per entry, ATen's uniform kernel one per
four entries plus an fp32 tensor in memory. An entry needs 16 random bits to be kept with probability ``1 − p`` to
within 2⁻¹⁶, so :func:`keep_mask` splits each Philox call into eight 16-bit draws, in one Triton kernel that writes
only the bool mask. The multiply by the mask and the ``1/(1 − p)`` scale stay ordinary torch ops, so inductor fuses
them into their neighbours (GELU, the residual add, LayerNorm) in the forward and the backward alike.

The mask op (``apt::dropout_keep_mask``) is tagged nondeterministic-seeded, so compilation neither merges two calls
nor recomputes one in the backward (which would draw a different mask); its Philox key is a fresh 64-bit seed drawn
by ATen's generator on the device, so each replay of a captured CUDA graph draws new masks. :func:`dropout` takes
this path for CUDA tensors (with Triton installed) and torch's own dropout elsewhere; the op itself also runs off
CUDA, as torch ops: a 16-bit integer per entry, kept when at least ``round(p · 2¹⁶)``.

``p`` is thus rounded to a multiple of 2⁻¹⁶ (0.1 → 0.100006); the survivors are scaled by ``1/(1 − p)`` with the
configured ``p``, as torch's dropout does.
"""

# No ``from __future__ import annotations`` here: torch.library reads the custom op's schema from real annotations.
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IMPLEMENTATIONS", "Dropout", "dropout", "keep_mask", "keep_threshold", "set_implementation"]

# ``mask``: keep_mask below; ``torch``: torch's own dropout (what bench/train_step.py compares against).
IMPLEMENTATIONS = ("mask", "torch")
_implementation = "mask"
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Entries per program of the mask kernel (BLOCK / 8 Philox calls).
BLOCK = 2048


def set_implementation(name: str) -> None:
    """Choose how training-mode dropout draws its mask, for this process: ``mask`` or ``torch``."""
    global _implementation
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"dropout implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    _implementation = name


def implementation() -> str:
    return _implementation


def keep_threshold(p: float) -> int:
    """An entry is kept when its uniform 16-bit draw is at least this: ``round(p · 2¹⁶)``."""
    return round(p * 65536)


@torch.library.custom_op("apt::dropout_keep_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def keep_mask(x: Tensor, p: float) -> Tensor:
    """A bool tensor shaped like ``x`` (contiguous): each entry ``True`` with probability ``1 − round(p·2¹⁶)/2¹⁶``,
    independently. ``x`` gives only the shape and device (and keeps distinct call sites distinct)."""
    threshold = keep_threshold(p)
    if x.is_cuda and _TRITON_INSTALLED:
        return _keep_mask_triton(x, threshold)
    bits = torch.randint(0, 65536, x.shape, dtype=torch.int32, device=x.device)
    return bits >= threshold


@keep_mask.register_fake
def _(x: Tensor, p: float) -> Tensor:
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


def _keep_mask_triton(x: Tensor, threshold: int) -> Tensor:
    from apt_model.model import _dropout_triton as kernels

    out = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    n = out.numel()
    if n == 0:
        return out
    # The Philox key: drawn on the device by ATen's generator, so a captured graph draws a new one on each replay
    # and a seeded run (torch.manual_seed) repeats its masks.
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    with torch.cuda.device(x.device):
        kernels.keep_mask_kernel[(-(-n // BLOCK),)](seed, out.view(torch.uint8), n, threshold, BLOCK=BLOCK)
    return out


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` with the mask from :func:`keep_mask` (under the ``mask`` implementation)."""
    if not training or p == 0.0:
        return x
    if _implementation == "torch" or p >= 1.0 or not (x.is_cuda and _TRITON_INSTALLED):
        # Off CUDA the mask kernel has nothing to win (the CPU draws one number per entry either way), and torch's
        # dropout keeps CPU runs exactly what they were (DeepSpeed's parity with Playground is tested there).
        return F.dropout(x, p, True)
    return x * keep_mask(x.detach(), p) * (1.0 / (1.0 - p))


class Dropout(nn.Module):
    """``nn.Dropout`` through :func:`dropout`; no parameters or buffers, so checkpoints are unchanged."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
