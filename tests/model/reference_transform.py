"""A deliberately simple reference of the autopoietic transform, written straight from the spec text.

One batch element at a time, one step per line, with different primitives from the batched version
(``F.conv2d`` 1x1 convolutions for the MLP like the original reference, ``torch.quantile`` for the IQR,
Python floats for the per-element statistics, the additive mask re-added in step 14). Only for tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def reference_probs(
    scores: Tensor,
    masked: Tensor | None,
    tau: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    eps: float,
) -> Tensor:
    """Attention probabilities [B, H, Lq, Lk] (float32) from scores that include the -inf additive mask."""
    bsz, n_heads, lq, lk = scores.shape
    if masked is None:
        masked = torch.zeros(1, lq, lk, dtype=torch.bool)
    masked = masked.expand(bsz, lq, lk)
    out_all = []
    for b in range(bsz):
        S = scores[b].float()
        mk = masked[b]
        additive = torch.zeros(lq, lk).masked_fill(mk, float("-inf"))
        # 1
        S = torch.nan_to_num(S, nan=0.0, posinf=10.0, neginf=-10.0).clamp(-15, 15)
        # 2
        M = S.mean(dim=0)
        # 3
        e = min(max(eps, 0.05), 0.8)
        A0 = (M.clamp(-8, 8) * e).clamp(-10, 10)
        # 4: 1x1 convolutions over a [1, 1, Lq, Lk] "image"
        hidden = F.conv2d(A0[None, None], w1.reshape(-1, 1, 1, 1), b1)
        hidden = F.relu(hidden.clamp(-5, 5))
        A = F.conv2d(hidden, w2.reshape(1, -1, 1, 1), b2)[0, 0].clamp(-5, 5)
        # 5
        Tay = (1 + 2.5 * A).clamp(0.5, 1.5)
        Tay[mk] = 1.0
        Sg = torch.sigmoid(Tay)
        # 6
        P = torch.softmax(M.clamp(-10, 10), dim=-1)
        Hm = -P * torch.log(P + 1e-6)
        Fz = torch.softmax(3 * Hm, dim=-1)
        # 7
        T = Sg * Fz
        # 8
        T = T * float(min(max((M.norm() + 1e-4) / (T.norm() + 1e-4), 0.8), 1.2))
        # 9
        tm = T.mean()
        om = M.mean()
        tv = max(float(((T - tm) ** 2).mean()), 1e-2)
        ov = max(float(((M - om) ** 2).mean()), 1e-2)
        g = min(max(math.sqrt(ov) / math.sqrt(tv), 0.8), 1.2)
        R = min(max(float(M.abs().max()), 1.0), 10.0)
        m = min(max(0.3 / math.log(1 + R), 0.1), 0.5)
        Tp = tm + m * g * (T - tm)
        # 10
        ratio = float(Hm.mean()) / math.log(lk) if lk > 1 else 0.0
        r = 0.4 + min(max(ratio, 0.0), 0.4)
        Fm = (1 - r) * Tp + r * M
        # 11
        tau0 = min(max(float(tau), 1.0), 1.5)
        flat = Fm.flatten()
        iqr = float(torch.quantile(flat, 0.75) - torch.quantile(flat, 0.25))
        t = min(max(tau0 * (1 + 0.1 * math.log1p(min(max(iqr, 0.5), 5.0))), 1.0), 2.0)
        Fm = (Fm / t).clamp(-15, 15)
        # 12
        if float((~torch.isfinite(Fm)).float().mean()) > 0.2:
            Fm = M.clamp(-10, 10)
        else:
            Fm = torch.nan_to_num(Fm, nan=0.0).clamp(-10, 10)
        # 13 + 14
        heads = []
        for h in range(n_heads):
            out = (Fm + 0.2 * (S[h] - M)).clamp(-15, 15) + additive
            p = torch.nan_to_num(torch.softmax(out, dim=-1), nan=0.0)
            heads.append(p)
        out_all.append(torch.stack(heads))
    return torch.stack(out_all)
