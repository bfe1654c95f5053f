"""Multi-head attention whose scores go through the autopoietic transform (or plain SDPA).

Masks are given as boolean padding vectors plus a ``causal`` flag, and built inside:

* autopoietic path: ``masked = causal | key_padding | query_padding`` (``[B or 1, Lq, Lk]``). Padding
  *query* rows are masked too, so the content at padding positions cannot reach the per-matrix statistics
  of the transform (those rows become constant ``-10`` after step 1, and their probabilities are all zero).
* plain path (``use_autopoietic=False``): standard multi-head attention through
  ``F.scaled_dot_product_attention`` with ``causal | key_padding``; a query row whose keys are all masked
  (an all-padding sequence) outputs zeros instead of NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apt_model.model.autopoietic import AutopoieticTransform
from apt_model.model.dropout import ScheduledDropout

__all__ = ["AutopoieticAttention", "build_mask", "causal_mask"]


def causal_mask(lq: int, lk: int, device: torch.device | str | None = None) -> Tensor:
    """``[Lq, Lk]`` boolean, ``True`` where key ``j`` is in the future of query ``i`` (``j > i``)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).triu(diagonal=1)


def build_mask(
    lq: int,
    lk: int,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Combine the mask sources into one boolean ``[B or 1, Lq or 1, Lk]`` (``True`` = masked) or ``None``."""
    mask: Tensor | None = None
    if causal:
        mask = causal_mask(lq, lk, device).unsqueeze(0)
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, :]
        mask = kp if mask is None else mask | kp
    if query_padding_mask is not None:
        qp = query_padding_mask[:, :, None]
        mask = qp if mask is None else mask | qp
    return mask


class AutopoieticAttention(nn.Module):
    """Self / causal self / cross attention with the autopoietic transform between scores and softmax.

    ``forward(x, memory=None, ...)``: ``x`` ``[B, Lq, d]`` gives the queries; keys and values come from
    ``memory`` (cross-attention) or ``x`` (self-attention), or from precomputed ``kv`` (see
    :meth:`project_kv`, used to cache the cross-attention projections of the encoder output).

    Set ``capture_probs = True`` to keep the last attention probabilities (detached) in ``last_probs``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        dropout: float = 0.0,
        use_autopoietic: bool = True,
        hidden: int = 16,
        init_tau: float = 1.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.dropout = float(dropout)
        self.probs_dropout = ScheduledDropout(dropout)
        self.use_autopoietic = use_autopoietic
        # One [3d, d] input projection (q, k, v stacked, nn.MultiheadAttention's layout): a single matmul
        # for self-attention.
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.transform = AutopoieticTransform(hidden, init_tau=init_tau, eps=eps) if use_autopoietic else None
        self.capture_probs = False
        self.last_probs: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.d_head).transpose(1, 2)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Key and value heads ``[B, H, Lk, d_head]`` of ``memory``; cacheable across decoding steps."""
        d = self.d_model
        kv = F.linear(memory, self.in_proj_weight[d:], self.in_proj_bias[d:])
        k, v = kv.split(d, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        query_padding_mask: Tensor | None = None,
        causal: bool = False,
        kv: tuple[Tensor, Tensor] | None = None,
        return_probs: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attention output ``[B, Lq, d]`` (and probabilities ``[B, H, Lq, Lk]`` if ``return_probs``).

        ``key_padding_mask`` ``[B, Lk]`` / ``query_padding_mask`` ``[B, Lq]``: ``True`` at padding.
        """
        d = self.d_model
        if kv is not None:
            q = self._heads(F.linear(x, self.in_proj_weight[:d], self.in_proj_bias[:d]))
            k, v = kv
        elif memory is None:
            q, k, v = (
                self._heads(t) for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).split(d, -1)
            )
        else:
            q = self._heads(F.linear(x, self.in_proj_weight[:d], self.in_proj_bias[:d]))
            k, v = self.project_kv(memory)
        lq, lk = q.shape[-2], k.shape[-2]
        if causal and lq != lk:
            raise ValueError(f"causal attention needs Lq == Lk, got {lq} and {lk}")
        drop = self.dropout if self.training else 0.0

        probs: Tensor | None = None
        if self.transform is not None:
            masked = build_mask(
                lq,
                lk,
                causal=causal,
                key_padding_mask=key_padding_mask,
                query_padding_mask=query_padding_mask,
                device=q.device,
            )
            # The scale goes on q, where it fuses into q's layout copy, rather than into a pass over the scores;
            # the spec's -inf at masked entries is applied by the transform itself (autopoietic_probs).
            scores = torch.matmul(q * (1.0 / math.sqrt(self.d_head)), k.transpose(-2, -1))
            probs = self.transform(scores, masked)
            out = torch.matmul(self.probs_dropout(probs), v)
        else:
            masked = build_mask(lq, lk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
            dead: Tensor | None = None
            if masked is not None and key_padding_mask is not None:
                # A row with every key masked would be NaN: let it attend anywhere, then zero it.
                dead = masked.all(dim=-1, keepdim=True)
                masked = masked & ~dead
            allowed = None if masked is None else ~masked.unsqueeze(1)
            # A dropout schedule's switch applies to the probabilities, which SDPA never shows.
            if return_probs or self.capture_probs or (drop > 0 and self.probs_dropout.gated):
                scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d_head))
                if allowed is not None:
                    scores = scores.masked_fill(~allowed, float("-inf"))
                probs = torch.softmax(scores, dim=-1)
                if dead is not None:
                    probs = probs.masked_fill(dead.unsqueeze(1), 0.0)
                out = torch.matmul(self.probs_dropout(probs), v)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop)
                if dead is not None:
                    out = out.masked_fill(dead.unsqueeze(1), 0.0)

        if self.capture_probs and probs is not None:
            self.last_probs = probs.detach()
        b = out.shape[0]
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, d))
        if return_probs:
            assert probs is not None
            return out, probs
        return out

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, autopoietic={self.use_autopoietic}"
