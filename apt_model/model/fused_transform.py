"""Which implementation runs the autopoietic transform, and the fused one as a torch custom op.

``torch``: :func:`apt_model.model.autopoietic.autopoietic_transform` and the masked softmax as ordinary torch ops
(any device; compiled by inductor under ``torch.compile``). ``triton``: Triton kernels
(:mod:`apt_model.model._transform_triton`), three for the forward (row work, per-element statistics, head work) and
five for the backward, registered as the custom op ``apt::autopoietic_probs`` so that ``torch.compile`` keeps it
whole and an eager step (DeepSpeed's default) issues about a dozen kernels per transform instead of a few hundred.
``auto`` (the default) takes Triton for CUDA tensors when it is installed and the ``[Lq, Lk]`` tile fits, and torch
otherwise.

Triton is imported on the first fused call only, so ``import apt_model`` stays light.
"""

# No ``from __future__ import annotations`` here: torch.library reads the custom op's schema from real annotations.
import contextlib
import importlib.util
import math
import os

import torch
from torch import Tensor

__all__ = [
    "KERNELS",
    "MAX_TILE",
    "autopoietic_probs_op",
    "fits_fused",
    "fused_autopoietic_probs",
    "set_transform_kernel",
    "transform_kernel",
    "triton_available",
    "uses_fused",
]

KERNELS = ("auto", "triton", "torch")
# Largest padded [Lq, Lk] tile one program keeps in registers: 64 x 64, the largest measured (the Playground's
# lengths); a larger tile would spill registers, so longer sequences take the torch ops.
MAX_TILE = 64 * 64

# Warps of the per-element statistics programs (the backward's, and the forward's where STATS_FWD_WARPS is None);
# None: by tile size (8 for 64 x 64; the H200 ran the backward with 4 and 16 no faster, BENCHMARKS.md).
NUM_WARPS: int | None = None
# Warps of the statistics forward alone; None (or 0): as NUM_WARPS gives the backward. Its 32 bisection rounds are
# chains of small reductions, which fewer warps finish sooner: 38 instead of 45 us per transform with 4 warps at
# B=256 on the H200, where the backward, with more arithmetic per entry, took 36 instead of 20 (BENCHMARKS.md).
STATS_FWD_WARPS: int | None = 4
# Rows of one batch element per program of the row and head kernels (4 x 64 entries: one warp). On the H200 at
# B=256 these kernels ran 1.1-1.5x faster with 8 rows than with 16, 1.3-2x slower with 32, and 4 rows took 5% off
# the transform's time against 8 (BENCHMARKS.md).
ROWS_PER_PROGRAM = 4
# Warps of the row and head programs; None: one per 256 entries of the block (one warp at 4 x 64).
ROW_WARPS: int | None = None
# Independent per-matrix sums in one tuple reduction (the statistics programs are chains of reductions, and their
# number sets the time). None: yes, except under Triton's interpreter (the CPU tests), which runs a tuple reduction
# element by element in Python; there the kernels reduce one operand at a time (the same sums), and one test sets
# this to True to run the GPU's code path.
FUSE_REDUCTIONS: bool | None = None

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_kernel = "auto"


def set_transform_kernel(name: str) -> None:
    """Choose the implementation for this process: ``auto``, ``triton`` or ``torch``."""
    global _kernel
    if name not in KERNELS:
        raise ValueError(f"transform kernel must be one of {', '.join(KERNELS)}, got {name!r}")
    if name == "triton" and not triton_available():
        raise ValueError("transform kernel 'triton' needs Triton and a CUDA device; use 'auto' or 'torch'")
    _kernel = name


def transform_kernel() -> str:
    return _kernel


def triton_available() -> bool:
    return _TRITON_INSTALLED and torch.cuda.is_available()


def _tile(lq: int, lk: int) -> tuple[int, int]:
    return max(16, _next_pow2(lq)), max(16, _next_pow2(lk))


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def fits_fused(lq: int, lk: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take ``[.., Lq, Lk]`` scores of this dtype (tile within the register budget)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    bq, bk = _tile(lq, lk)
    return bq * bk <= MAX_TILE


def uses_fused(scores: Tensor) -> bool:
    """Whether :func:`apt_model.model.autopoietic.autopoietic_probs` takes the fused kernel for these scores."""
    if _kernel == "torch" or not _TRITON_INSTALLED or not scores.is_cuda:
        return False
    return fits_fused(scores.shape[-2], scores.shape[-1], scores.dtype)


def _launch_args(scores: Tensor, masked: Tensor | None) -> tuple[Tensor, tuple, dict, dict]:
    """The mask and its strides, the statistics kernels' arguments, and the row and head kernels' block sizes."""
    batch, _, lq, lk = scores.shape
    n = lq * lk
    pos25, pos75 = 0.25 * (n - 1), 0.75 * (n - 1)
    lo25, lo75 = math.floor(pos25), math.floor(pos75)
    bq, bk = _tile(lq, lk)
    if masked is not None:
        if masked.dim() != 3 or masked.shape[-1] != lk:
            raise ValueError(f"masked must be [B or 1, Lq or 1, Lk={lk}], got shape {tuple(masked.shape)}")
        mask = masked.expand(batch, lq, lk).view(torch.uint8)
        mask_strides = mask.stride()
    else:
        mask, mask_strides = scores, (0, 0, 0)
    stats = {
        "n_f": float(n),
        "log_lk": math.log(lk) if lk > 1 else 1.0,
        "has_ratio": 1.0 if lk > 1 else 0.0,  # step 10's ratio is 0 when Lk == 1
        "lo25": lo25,
        "frac25": pos25 - lo25,
        "lo75": lo75,
        "frac75": pos75 - lo75,
        "BQ": bq,
        "BK": bk,
        "num_warps": NUM_WARPS or min(16, max(4, bq * bk // 512)),
        "FUSE": FUSE_REDUCTIONS if FUSE_REDUCTIONS is not None else os.environ.get("TRITON_INTERPRET") != "1",
    }
    rb = min(bq, ROWS_PER_PROGRAM)
    warps = ROW_WARPS or max(1, min(8, rb * bk // 256))
    rows = {"RB": rb, "BK": bk, "HAS_MASK": masked is not None, "num_warps": warps}
    return mask, mask_strides, stats, rows


# Entries per program of the kernel that sums the MLP's parameter gradients (one [128, HP] tile each). On the H200
# at B=256 this ran in 65 us; the same sums kept in registers over several blocks per program took 95-171 us
# (blocks of 32-128; BENCHMARKS.md).
MLP_BLOCK = 128
MLP_WARPS = 4
# Whether a forward that will be differentiated keeps step 4's A_pre and derivative psi per entry (two float32 maps,
# 8 MB per transform at B=256) so that the backward's row kernel skips its pass over the MLP's units — the pass
# that the row kernels spend most of their time in; False recomputes them there.
SAVE_MLP = True
# The module's launch settings above, by name: what bench/transform.py sweeps and bench/train_step.py can set.
LAUNCH_SETTINGS = (
    "NUM_WARPS",
    "STATS_FWD_WARPS",
    "ROWS_PER_PROGRAM",
    "ROW_WARPS",
    "MLP_BLOCK",
    "MLP_WARPS",
    "SAVE_MLP",
)


def parse_launch_setting(text: str) -> tuple[str, int]:
    """``KNOB=N`` with KNOB one of :data:`LAUNCH_SETTINGS` and N a non-negative integer (what the bench scripts
    take on their command lines); ValueError naming what is wrong otherwise."""
    name, _, value = text.partition("=")
    if name not in LAUNCH_SETTINGS or not value.isdigit():
        raise ValueError(f"{text}: expected KNOB=N with KNOB one of {', '.join(LAUNCH_SETTINGS)}")
    return name, int(value)


def _step3_e(eps: float) -> float:
    return min(max(eps, 0.05), 0.8)


def _hidden_pow2(hidden: int) -> int:
    return max(16, _next_pow2(hidden))


def _cuda_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward(
    scores: Tensor, masked: Tensor | None, tau, w1, b1, w2, b2, eps: float, save_mlp: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from apt_model.model import _transform_triton as kernels

    batch, heads, lq, lk = scores.shape
    mask, mask_strides, stats, rows = _launch_args(scores, masked)
    dev = scores.device
    probs = torch.empty((batch, heads, lq, lk), dtype=scores.dtype, device=dev)
    # Kept for the backward: per batch element, the keys of the entries at the quantiles' ranks, and the float32
    # maps M, T0, Hm and F - 0.2 M (planes W_M, W_T0, W_HM, W_BASE; every entry is written by the kernels).
    keys = torch.empty((batch, 4), dtype=torch.int32, device=dev)
    work = torch.empty((batch, 4, lq, lk), dtype=torch.float32, device=dev)
    # Step 4's A_pre and psi for the backward (planes 0, 1), or nothing.
    saved = torch.empty((batch, 2, lq, lk) if save_mlp else (0,), dtype=torch.float32, device=dev)
    if batch > 0:
        n_e, row_blocks = lq * lk, -(-lq // rows["RB"])
        e = _step3_e(eps)
        with _cuda_guard(scores):
            kernels.rows_fwd_kernel[(batch, row_blocks)](
                scores, mask, work, saved if save_mlp else work, w1, b1, w2, b2, lq, lk, n_e, heads,
                *scores.stride(), *mask_strides, e, HID=w1.shape[0], HP=_hidden_pow2(w1.shape[0]),
                SAVE_MLP=save_mlp, **rows,
            )  # fmt: skip
            fwd_stats = {**stats, "num_warps": STATS_FWD_WARPS or stats["num_warps"]}
            kernels.stats_fwd_kernel[(batch,)](work, keys, tau, lq, lk, n_e, **fwd_stats)
            kernels.heads_fwd_kernel[(batch, heads, row_blocks)](
                scores, mask, work, probs, lq, lk, n_e, heads, *scores.stride(), *mask_strides,
                *probs.stride()[:3], **rows,
            )  # fmt: skip
    return probs, keys, work, saved


def _backward(
    grad: Tensor,
    scores: Tensor,
    masked: Tensor | None,
    keys: Tensor,
    work: Tensor,
    saved: Tensor,
    tau,
    w1,
    b1,
    w2,
    b2,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from apt_model.model import _transform_triton as kernels

    batch, heads, lq, lk = scores.shape
    hidden = w1.shape[0]
    dev = scores.device
    mask, mask_strides, stats, rows = _launch_args(scores, masked)
    n_e, row_blocks = lq * lk, -(-lq // rows["RB"])
    d_scores = torch.empty((batch, heads, lq, lk), dtype=scores.dtype, device=dev)
    # The gradients at F, T0, M (the statistics' share) and M (all of it, over H): planes G_DF, G_DT0, G_DMS, G_DM.
    grads = torch.empty((batch, 4, lq, lk), dtype=torch.float32, device=dev)
    # What the MLP's parameter gradients are made of, per entry: A0 and the gradient at the MLP's output.
    a0 = torch.empty((batch, lq, lk), dtype=torch.float32, device=dev)
    d_a = torch.empty((batch, lq, lk), dtype=torch.float32, device=dev)
    # Every entry of these is written by the kernels (no fill needed).
    d_tau, d_hmean = (torch.empty(batch, dtype=torch.float32, device=dev) for _ in range(2))
    d_b2 = torch.empty((batch, row_blocks), dtype=torch.float32, device=dev)
    n_elem = batch * n_e
    hp = _hidden_pow2(hidden)
    programs = -(-n_elem // MLP_BLOCK)
    # Per-program partial sums, added up below (deterministic, no atomics), in one buffer so that one reduction
    # sums all three: three small reductions per transform were 54 launches per training step.
    partials = torch.empty((3, hp, programs), dtype=torch.float32, device=dev)
    d_w1, d_b1, d_w2 = partials.unbind(0)
    if batch > 0:
        e = _step3_e(eps)
        with _cuda_guard(scores):
            kernels.heads_bwd_kernel[(batch, row_blocks)](
                scores, mask, work, grad, grads, lq, lk, n_e, heads, *scores.stride(), *mask_strides,
                *grad.stride(), **rows,
            )  # fmt: skip
            kernels.stats_bwd_kernel[(batch,)](work, grads, keys, tau, d_tau, d_hmean, lq, lk, n_e, **stats)
            have_saved = saved.numel() > 0
            kernels.rows_bwd_kernel[(batch, row_blocks)](
                mask, work, saved if have_saved else work, grads, d_hmean, a0, d_a, d_b2, w1, b1, w2, b2, lq, lk,
                n_e, heads, *mask_strides, e, HID=hidden, HP=hp, SAVED_MLP=have_saved, **rows,
            )  # fmt: skip
            kernels.scores_bwd_kernel[(batch, heads, row_blocks)](
                scores, mask, work, grad, grads, d_scores, lq, lk, n_e, heads, *scores.stride(), *mask_strides,
                *grad.stride(), *d_scores.stride()[:3], **rows,
            )  # fmt: skip
            kernels.mlp_param_grad_kernel[(programs,)](
                a0, d_a, w1, b1, w2, d_w1, d_b1, d_w2, n_elem, HID=hidden, HP=hp, BLOCK=MLP_BLOCK, num_warps=MLP_WARPS
            )  # fmt: skip
    return (
        d_scores,
        d_tau.sum().to(tau.dtype).reshape(tau.shape),
        # rows: w1, b1, w2 (split by the autograd wrapper: outputs may not alias); the sum runs along memory
        partials[:, :hidden].sum(2),
        d_b2.sum().to(b2.dtype).reshape(b2.shape),
    )


@torch.library.custom_op("apt::autopoietic_probs", mutates_args=())
def autopoietic_probs_op(
    scores: Tensor,
    masked: Tensor | None,
    tau: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    eps: float,
    save_mlp: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 1-14 and the masked softmax, fused: probabilities ``[B, H, Lq, Lk]`` in ``scores.dtype``; and, saved
    for the backward, the ``[B, 4]`` int32 keys of the quantiles' order statistics, the ``[B, 4, Lq, Lk]``
    float32 maps ``M``, ``T0``, ``Hm``, ``F - 0.2 M``, and (``save_mlp``; else empty) the ``[B, 2, Lq, Lk]`` maps
    of step 4's ``A_pre`` and ``dA_pre/dA0``."""
    return _forward(scores, masked, tau, w1, b1, w2, b2, eps, save_mlp)


@autopoietic_probs_op.register_fake
def _(scores, masked, tau, w1, b1, w2, b2, eps, save_mlp):
    batch, _, lq, lk = scores.shape
    return (
        scores.new_empty(scores.shape),
        scores.new_empty((batch, 4), dtype=torch.int32),
        scores.new_empty((batch, 4, lq, lk), dtype=torch.float32),
        scores.new_empty((batch, 2, lq, lk) if save_mlp else (0,), dtype=torch.float32),
    )


def fused_autopoietic_probs(
    scores: Tensor,
    masked: Tensor | None,
    tau: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    eps: float,
) -> Tensor:
    """The fused transform's probabilities (see :func:`autopoietic_probs_op`)."""
    differentiated = torch.is_grad_enabled() and any(t.requires_grad for t in (scores, tau, w1, b1, w2, b2))
    return autopoietic_probs_op(scores, masked, tau, w1, b1, w2, b2, eps, bool(SAVE_MLP) and differentiated)[
        0
    ]


@torch.library.custom_op("apt::autopoietic_probs_backward", mutates_args=())
def autopoietic_probs_backward_op(
    grad: Tensor,
    scores: Tensor,
    masked: Tensor | None,
    keys: Tensor,
    work: Tensor,
    saved: Tensor,
    tau: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward(grad, scores, masked, keys, work, saved, tau, w1, b1, w2, b2, eps)


@autopoietic_probs_backward_op.register_fake
def _(grad, scores, masked, keys, work, saved, tau, w1, b1, w2, b2, eps):
    mlp = w1.new_empty((3, w1.shape[0]), dtype=torch.float32)
    return scores.new_empty(scores.shape), tau.new_empty(tau.shape), mlp, b2.new_empty(b2.shape)


def _setup_context(ctx, inputs, output) -> None:
    scores, masked, tau, w1, b1, w2, b2, eps, _save_mlp = inputs
    ctx.save_for_backward(scores, masked, output[1], output[2], output[3], tau, w1, b1, w2, b2)
    ctx.eps = eps


def _autograd_backward(ctx, grad, _grad_keys, _grad_work, _grad_saved):
    scores, masked, keys, work, saved, tau, w1, b1, w2, b2 = ctx.saved_tensors
    d_scores, d_tau, d_mlp, d_b2 = torch.ops.apt.autopoietic_probs_backward(
        grad, scores, masked, keys, work, saved, tau, w1, b1, w2, b2, ctx.eps
    )
    d_w1, d_b1, d_w2 = (g.to(x.dtype).reshape(x.shape) for g, x in zip(d_mlp, (w1, b1, w2), strict=True))
    return d_scores, None, d_tau, d_w1, d_b1, d_w2, d_b2, None, None


autopoietic_probs_op.register_autograd(_autograd_backward, setup_context=_setup_context)
