"""The autopoietic transform of attention scores, batched (spec: ``shared/spec/apt-model.md``).

The spec's 14 steps are computed for the whole batch at once. Every statistic (mean, Frobenius norm,
variance, max, quantiles, NaN fraction) is taken per batch element ``b`` over its ``[Lq, Lk]`` matrix,
as a reduction over the last two dims. There is no Python loop over batch or heads, no ``.item()`` and no
data-dependent Python control flow (step 12 is a ``torch.where`` on a per-element boolean), so the
function traces under ``torch.compile(fullgraph=True)`` and can be captured in CUDA graphs.

Conventions
-----------
* ``scores`` ``[B, H, Lq, Lk]`` already contain the additive mask (``-inf`` where masked), exactly as the
  spec's input ``S``. ``masked`` is the boolean view of that mask, broadcastable to ``[B, Lq, Lk]``
  (``[B or 1, Lq or 1, Lk]``), ``True`` where masked; ``None`` means nothing is masked.
* The statistics of steps 2-12 include masked entries (which step 1 turns into ``-10``), as the spec is
  written. Consequences worth knowing: the amount of padding in a batch element changes its statistics,
  and in causal self-attention later query rows influence the statistics used by earlier rows.
* The transform runs in float32 whatever the input dtype (means/variances/quantiles of bf16 values are
  too coarse); probabilities are returned in the input dtype.
* Step 14: masked positions get exactly zero probability (see :func:`masked_softmax`). A query row whose
  keys are *all* masked (e.g. a padding query row) gets an all-zero probability row instead of NaN, so its
  attention output is exactly zero.
* ``log(Lk)`` in step 10 is ``0`` when ``Lk == 1``; the spec's ratio is then undefined, and we use ``0``
  (the float32 evaluation of the formula gives ``-inf``, clamped to ``0``, i.e. the same).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from apt_model.model.fused_transform import fused_autopoietic_probs, uses_fused

__all__ = [
    "AutopoieticTransform",
    "autopoietic_probs",
    "autopoietic_transform",
    "batched_quantile",
    "element_mlp",
    "masked_softmax",
]


def batched_quantile(x: Tensor, qs: tuple[float, ...]) -> list[Tensor]:
    """Quantiles of each ``x[b]`` over all its trailing values (``torch.quantile`` "linear" semantics).

    Sort + gather with linear interpolation: no 16M-element limit (``torch.quantile`` has one), and the
    interpolation indices are Python constants derived from the static shape, so it compiles cleanly.
    NaN sorts last, so (unlike ``torch.quantile``) a NaN only affects quantiles that reach it.
    """
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]
    srt = torch.sort(flat, dim=1).values
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        v_lo = srt[:, lo]
        out.append(v_lo + frac * (srt[:, hi] - v_lo) if frac > 0.0 else v_lo)
    return out


def element_mlp(a0: Tensor, w1: Tensor, b1: Tensor, w2: Tensor) -> Tensor:
    """Step 4 without its output bias: ``Σ_j w2_j · relu(clamp(a0 · w1_j + b1_j, −5, 5))`` for every element.

    Written as an elementwise product summed over ``h`` rather than a matmul, so that ``torch.compile`` fuses it
    into one reduction that never materialises the ``[B, Lq, Lk, h]`` hidden tensor, and recomputes it in the
    backward. A matmul would push that tensor (``h`` times the size of the scores) through memory both ways.
    """
    hidden = torch.relu(torch.clamp(a0.unsqueeze(-1) * w1[:, 0] + b1, -5.0, 5.0))
    return (hidden * w2[0]).sum(dim=-1)


def _per_b(x: Tensor) -> Tensor:
    """Reshape a per-batch-element statistic ``[B]`` to broadcast against ``[B, Lq, Lk]``."""
    return x[:, None, None]


def autopoietic_transform(
    scores: Tensor,
    masked: Tensor | None,
    tau: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    *,
    eps: float,
) -> Tensor:
    """Steps 1-14 of the spec: attention scores ``[B, H, Lq, Lk]`` → transformed logits (same shape).

    ``w1`` ``[h, 1]``, ``b1`` ``[h]``, ``w2`` ``[1, h]``, ``b2`` ``[1]`` are the per-element MLP (the
    reference's 1×1 convolutions), ``tau`` a scalar. Masked positions of the result are ``-inf``; use
    :func:`masked_softmax` (or :func:`autopoietic_probs`) to turn it into probabilities without NaN.
    """
    if scores.dim() != 4:
        raise ValueError(f"scores must be [B, H, Lq, Lk], got shape {tuple(scores.shape)}")
    lk = scores.shape[-1]
    s = scores.float()
    red = (-2, -1)

    # 1. clean and bound the raw scores (masked -inf → -10)
    s = torch.clamp(torch.nan_to_num(s, nan=0.0, posinf=10.0, neginf=-10.0), -15.0, 15.0)
    # 2. head mean
    m = s.mean(dim=1)  # [B, Lq, Lk]
    # 3. e is a constant of the config, not a parameter
    e = min(max(eps, 0.05), 0.8)
    a0 = torch.clamp(torch.clamp(m, -8.0, 8.0) * e, -10.0, 10.0)
    # 4. per-element MLP 1 → h → 1
    a = torch.clamp(element_mlp(a0, w1, b1, w2) + b2[0], -5.0, 5.0)
    # 5. bounded Taylor-like gate; masked positions use the neutral 1
    tay = torch.clamp(1.0 + 2.5 * a, 0.5, 1.5)
    if masked is not None:
        tay = torch.where(masked, 1.0, tay)
    sg = torch.sigmoid(tay)
    # 6. row entropy and its focus distribution
    p = torch.softmax(torch.clamp(m, -10.0, 10.0), dim=-1)
    hm = -p * torch.log(p + 1e-6)
    fz = torch.softmax(3.0 * hm, dim=-1)
    # 7.
    t = sg * fz
    # 8. energy balance against M (Frobenius norms per batch element)
    norm_m = torch.linalg.vector_norm(m, dim=red)
    norm_t = torch.linalg.vector_norm(t, dim=red)
    t = _per_b(torch.clamp((norm_m + 1e-4) / (norm_t + 1e-4), 0.8, 1.2)) * t
    # 9. spread matching
    tm = t.mean(dim=red)
    om = m.mean(dim=red)
    tv = torch.clamp(((t - _per_b(tm)) ** 2).mean(dim=red), min=1e-2)
    ov = torch.clamp(((m - _per_b(om)) ** 2).mean(dim=red), min=1e-2)
    g = torch.clamp(torch.sqrt(ov) / torch.sqrt(tv), 0.8, 1.2)
    big_r = torch.clamp(m.abs().amax(dim=red), 1.0, 10.0)
    mix = torch.clamp(0.3 / torch.log(1.0 + big_r), 0.1, 0.5)
    tm_b = _per_b(tm)
    t_prime = tm_b + _per_b(mix * g) * (t - tm_b)
    # 10. entropy mix with M
    if lk > 1:
        ratio = torch.clamp(hm.mean(dim=red) / math.log(lk), 0.0, 0.4)
    else:
        ratio = torch.zeros_like(norm_m)
    r = _per_b(0.4 + ratio)
    f = (1.0 - r) * t_prime + r * m
    # 11. IQR-adaptive temperature
    tau0 = torch.clamp(tau.float(), 1.0, 1.5)
    q25, q75 = batched_quantile(f, (0.25, 0.75))
    iqr = q75 - q25
    temp = torch.clamp(tau0 * (1.0 + 0.1 * torch.log1p(torch.clamp(iqr, 0.5, 5.0))), 1.0, 2.0)
    f = torch.clamp(f / _per_b(temp), -15.0, 15.0)
    # 12. fall back to M when more than 20% of F is not finite (a where, never Python control flow)
    bad_frac = (~torch.isfinite(f)).float().mean(dim=red)
    fallback = _per_b(bad_frac > 0.2)
    f = torch.where(
        fallback, torch.clamp(m, -10.0, 10.0), torch.clamp(torch.nan_to_num(f, nan=0.0), -10.0, 10.0)
    )
    # 13. per-head detail around the shared map
    out = torch.clamp(f.unsqueeze(1) + 0.2 * (s - m.unsqueeze(1)), -15.0, 15.0)
    # 14. re-apply the (whole) mask
    if masked is not None:
        out = out.masked_fill(masked.unsqueeze(1), float("-inf"))
    return out


def masked_softmax(logits: Tensor, masked: Tensor | None, dtype: torch.dtype | None = None) -> Tensor:
    """Softmax over the last dim with masked positions at exactly ``0`` and no NaN for all-masked rows.

    ``logits`` ``[B, H, Lq, Lk]``; ``masked`` broadcastable to ``[B, Lq, Lk]``. Masked logits are replaced
    by the most negative finite value, so ``exp`` underflows to exactly 0 next to any allowed entry and a
    fully masked row is uniform rather than NaN; the final fill then makes the masked (and fully masked)
    entries exactly zero.
    """
    if masked is None:
        return torch.softmax(logits, dim=-1, dtype=dtype)
    mask4 = masked.unsqueeze(1)
    filled = logits.masked_fill(mask4, torch.finfo(logits.dtype).min)
    return torch.softmax(filled, dim=-1, dtype=dtype).masked_fill(mask4, 0.0)


def _autopoietic_probs(
    scores: Tensor,
    masked: Tensor | None,
    tau: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    *,
    eps: float,
) -> Tensor:
    """Transform (steps 1-14) then the exact masked softmax; probabilities in ``scores.dtype``."""
    if masked is not None:  # the spec's -inf where masked (already there when the caller added it)
        scores = scores.masked_fill(masked.unsqueeze(1), float("-inf"))
    logits = autopoietic_transform(scores, masked, tau, w1, b1, w2, b2, eps=eps)
    return masked_softmax(logits, masked).to(scores.dtype)


# Under torch.compile the model's 18 transforms (6 encoder self, 6 decoder self, 6 cross) are traced and compiled
# once per input signature and the code is reused at every call site, instead of being inlined 18 times: on an
# H200 the fast path's first step (compilation) took 0.62x as long, steps ran at the same speed and losses matched
# to 4.5e-6 (bench/compile_time.py, BENCHMARKS.md). In eager mode the wrapper does nothing.
_autopoietic_probs_region = functools.update_wrapper(
    torch.compiler.nested_compile_region(_autopoietic_probs), _autopoietic_probs
)


def autopoietic_probs(
    scores: Tensor,
    masked: Tensor | None,
    tau: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    *,
    eps: float,
) -> Tensor:
    """Transform (steps 1-14) then the exact masked softmax; probabilities in ``scores.dtype``.

    Unlike :func:`autopoietic_transform`, ``scores`` need not hold ``-inf`` where ``masked``: masked entries are
    taken as ``-inf`` whatever they hold, and get no gradient. The fused kernels apply the mask as they read the
    scores, which saves the attention a masked fill of the scores (and its backward) before every transform.

    On CUDA with Triton this is the fused op (:mod:`apt_model.model.fused_transform`, chosen by
    ``set_transform_kernel``: three Triton kernels forward, five backward); elsewhere the torch ops of
    :func:`autopoietic_transform`.
    """
    if uses_fused(scores):
        return fused_autopoietic_probs(scores, masked, tau, w1, b1, w2, b2, eps)
    return _autopoietic_probs_region(scores, masked, tau, w1, b1, w2, b2, eps=eps)


class AutopoieticTransform(nn.Module):
    """Holds the transform's parameters: ``tau`` (scalar) and the per-element MLP ``w1, b1, w2, b2``.

    ``forward(scores, masked)`` returns attention probabilities (``[B, H, Lq, Lk]``, input dtype).
    """

    def __init__(self, hidden: int, *, init_tau: float = 1.0, eps: float = 1e-6) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.hidden = hidden
        self.eps = float(eps)
        self.init_tau = float(init_tau)
        self.tau = nn.Parameter(torch.empty(()))
        self.w1 = nn.Parameter(torch.empty(hidden, 1))
        self.b1 = nn.Parameter(torch.empty(hidden))
        self.w2 = nn.Parameter(torch.empty(1, hidden))
        self.b2 = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same fans as the reference's 1x1 convolutions: w1 (fan_in 1, fan_out h), w2 (fan_in h, fan_out 1).
        nn.init.xavier_uniform_(self.w1)
        nn.init.xavier_uniform_(self.w2)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)
        with torch.no_grad():
            self.tau.fill_(self.init_tau)

    def logits(self, scores: Tensor, masked: Tensor | None) -> Tensor:
        return autopoietic_transform(
            scores, masked, self.tau, self.w1, self.b1, self.w2, self.b2, eps=self.eps
        )

    def forward(self, scores: Tensor, masked: Tensor | None) -> Tensor:
        return autopoietic_probs(scores, masked, self.tau, self.w1, self.b1, self.w2, self.b2, eps=self.eps)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, eps={self.eps}"
