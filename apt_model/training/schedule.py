"""Optimizer and learning-rate schedule shared by every backend ("Playground theory").

* **AdamW** with ``betas`` = (``adam_beta1``, ``adam_beta2``) from ``TrainConfig`` (0.9, 0.999) and its
  ``weight_decay`` (0.01) applied to matrices only: biases, LayerNorm weights, the embedding (tied to the output
  projection) and the autopoietic scalars (``tau``) are not decayed — decaying a norm gain or a temperature pulls it
  to zero, which is not regularisation. ``decay_embeddings`` puts the token embedding under the decay too.
* **CosineAnnealingWarmRestarts** (``torch.optim.lr_scheduler``; base ``lr``, ``eta_min = min_lr``, ``T_0 = t0``,
  ``T_mult = t_mult``), **stepped per optimizer step** with a fractional epoch:
  ``scheduler.step(global_step / steps_per_epoch)`` before each update. The curve is therefore the per-epoch curve
  of the guide made smooth; restarts fall on the same epoch boundaries (T_0 = 10, T_mult = 2 → after epochs 10,
  30, 70, 150, …), and because the position is computed from ``global_step`` alone, resuming is exact.
* Optional **linear warmup** over ``warmup_steps`` optimizer steps multiplies the cosine value
  (``(step + 1) / warmup_steps``), so the first update never uses the full base rate.
"""

from __future__ import annotations

from typing import Any

import torch

from apt_model.config import TrainConfig

SCHEDULE_KIND = "cosine_warm_restarts"
STEPPING = "per_step"


def param_groups(
    model: torch.nn.Module, weight_decay: float, *, decay_embeddings: bool = False
) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed matrices, and everything else (biases, norms, scalars, and the embeddings unless
    ``decay_embeddings``)."""
    kept = (torch.nn.LayerNorm,) if decay_embeddings else (torch.nn.LayerNorm, torch.nn.Embedding)
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, kept):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim < 2 or id(param) in no_decay_ids:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, *, fused: bool = False) -> torch.optim.AdamW:
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": 1e-8}
    if fused:
        kwargs["fused"] = True
    groups = param_groups(model, cfg.weight_decay, decay_embeddings=cfg.decay_embeddings)
    return torch.optim.AdamW(groups, **kwargs)


def restart_epochs(t0: int, t_mult: int, epochs: int) -> list[int]:
    """Epoch boundaries (counted in completed epochs) where the learning rate jumps back to its base value."""
    out, boundary, period = [], t0, t0
    while boundary < epochs:
        out.append(boundary)
        period *= t_mult
        boundary += period
    return out


class WarmRestartSchedule:
    """``CosineAnnealingWarmRestarts`` driven by the global optimizer step, plus linear warmup."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> None:
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1")
        self.optimizer = optimizer
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=cfg.t0, T_mult=cfg.t_mult, eta_min=cfg.min_lr
        )

    def set_step(self, global_step: int) -> float:
        """Set the learning rate for optimizer step ``global_step`` (0-based); returns it."""
        self.scheduler.step(global_step / self.steps_per_epoch)
        factor = 1.0
        if self.cfg.warmup_steps > 0 and global_step < self.cfg.warmup_steps:
            factor = (global_step + 1) / self.cfg.warmup_steps
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])

    def describe(self, epochs: int) -> dict[str, Any]:
        return {
            "kind": SCHEDULE_KIND,
            "base_lr": self.cfg.lr,
            "min_lr": self.cfg.min_lr,
            "t0": self.cfg.t0,
            "t_mult": self.cfg.t_mult,
            "warmup_steps": self.cfg.warmup_steps,
            "stepping": STEPPING,
            "steps_per_epoch": self.steps_per_epoch,
            "restart_epochs": restart_epochs(self.cfg.t0, self.cfg.t_mult, epochs),
        }
