"""The training objective: teacher-forced cross-entropy on decoder targets only.

The encoder reads ``src`` (the pair's input) and nothing else; the decoder reads ``tgt_in = [BOS] output``
and is scored against ``tgt_out = output [EOS]``; padding targets are ignored. All results stay tensors on
the model's device (no ``.item()``), so a training step does not synchronise with the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apt_model.errors import DataError

__all__ = ["LossOutput", "seq2seq_loss"]


class LossOutput(NamedTuple):
    """``loss``: mean CE over non-pad target tokens (0-dim float32; ``0`` when there are none).
    ``n_tokens``: number of non-pad targets, ``n_correct``: of those, how many the argmax got right
    (0-dim int64 tensors)."""

    loss: Tensor
    n_tokens: Tensor
    n_correct: Tensor


def seq2seq_loss(
    model: nn.Module,
    src: Tensor,
    tgt_in: Tensor,
    tgt_out: Tensor,
    *,
    pad_id: int,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Cross-entropy of ``model(src, tgt_in)`` against ``tgt_out``, ignoring ``pad_id`` targets."""
    if tgt_in.shape != tgt_out.shape:
        raise DataError(
            f"tgt_in {tuple(tgt_in.shape)} and tgt_out {tuple(tgt_out.shape)} must have the same shape"
        )
    if src.dim() != 2 or src.shape[0] != tgt_in.shape[0]:
        raise DataError(
            f"src {tuple(src.shape)} must be [batch, length] with the batch of tgt_in {tuple(tgt_in.shape)}"
        )
    logits = model(src, tgt_in)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    target = tgt_out.reshape(-1)
    keep = target != pad_id
    total = F.cross_entropy(
        flat, target, ignore_index=pad_id, reduction="sum", label_smoothing=label_smoothing
    )
    n_tokens = keep.sum()
    loss = total / n_tokens.clamp(min=1).to(total.dtype)
    with torch.no_grad():
        n_correct = ((flat.argmax(dim=-1) == target) & keep).sum()
    return LossOutput(loss=loss, n_tokens=n_tokens, n_correct=n_correct)
