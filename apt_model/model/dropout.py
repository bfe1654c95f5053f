"""Dropout that a schedule can switch off part-way through a run without changing the compiled step.

``nn.Dropout``'s on/off is ``module.training``, a Python flag: flipping it mid-run makes ``torch.compile`` trace and
compile the whole step again (a minute on the GPU) and invalidates captured CUDA graphs. Here the switch is a tensor
(``on``, 1.0 or 0.0) that the step reads like any other input, so turning dropout off is an in-place write.

A model uses the switch only after :func:`enable_dropout_schedule` (before the step is compiled): without a schedule
the forward is exactly ``F.dropout``, so runs that never switch pay nothing for it. With one, dropout's random draws
are still made while it is off (the ``torch.where`` selects the undropped input); the schedule's epochs cost what
dropout's epochs cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ScheduledDropout", "enable_dropout_schedule", "set_dropout_on"]


class ScheduledDropout(nn.Module):
    """``nn.Dropout(p)`` with a tensor on/off switch (see the module's docstring)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)
        self.gated = False
        # Non-persistent: checkpoints are unchanged, and a resumed run sets it from its schedule.
        self.register_buffer("on", torch.ones(()), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        dropped = F.dropout(x, self.p, True)
        if not self.gated:
            return dropped
        return torch.where(self.on != 0, dropped, x)

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", scheduled" if self.gated else "")


def enable_dropout_schedule(model: nn.Module) -> int:
    """Make every :class:`ScheduledDropout` in ``model`` obey its switch; returns how many there are.

    Call before the model is compiled: the switch is part of the traced graph only from then on.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, ScheduledDropout):
            m.gated = True
            n += 1
    return n


@torch.no_grad()
def set_dropout_on(model: nn.Module, on: bool) -> None:
    """Turn dropout on or off in every scheduled :class:`ScheduledDropout` of ``model`` (in place)."""
    for m in model.modules():
        if isinstance(m, ScheduledDropout) and m.gated:
            m.on.fill_(1.0 if on else 0.0)
