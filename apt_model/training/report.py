"""``experiment_report.json``: the run's live record, rewritten atomically after every epoch.

The visualizer, the diagnoser, the monitor and the pipeline read this file, so its shape is a contract.
Schema (``schema_version`` 1; keys are always present, values may be ``null`` where noted)::

    {
      "schema_version": 1,
      "backend": "playground",                 # the backend that trained
      "status": "running" | "finished" | "failed",
      "started_at": "2025-01-01T12:00:00+00:00",   # ISO-8601 UTC; the first start (kept across resumes)
      "updated_at": "...",                          # last rewrite
      "config": {"model": {...}, "train": {...}, "data": {...}},   # ModelConfig/TrainConfig/DataConfig.to_dict()
      "dataset": {"path": str, "sha256": str, "n_train": int, "n_val": int},
      "runtime": {"device": "cpu"|"cuda:0"|..., "precision": "fp32"|"bf16"|"fp16", "compiled": bool, "transform_kernel": "triton"|"torch",
                  "pad_mode": "bucket"|"fixed", "steps_per_epoch": int, "n_parameters": int,
                  "resumed_from": [{"path": str, "epoch": int}, ...],
                  "phase_seconds": {"prepare": float, "setup": float, "finish": float},  # Playground: time outside epochs
                  "compile_seconds": {phase: float},         # Playground, compiled: torch.compile's phases (nested)
                  "first_launch_seconds": [float, ...],      # Playground: the first epoch's first 8 launches, each
                  "kernel_prewarm": {"rc": int, "seconds": float, "killed": bool, "child": {...}}},  # CUDA + Triton
      "epochs": [                                   # one row per finished epoch, in order
        {"epoch": int,             # 1-based
         "train_loss": float,      # token-weighted mean CE over the epoch's applied steps (null if all skipped)
         "val_loss": float|null,   # teacher-forced, token-weighted; null on epochs without evaluation
         "val_token_acc": float|null,   # argmax == target over non-pad target tokens
         "lr": float,              # learning rate of the epoch's last optimizer step
         "grad_norm": float|null,  # mean pre-clipping global grad norm of the epoch's applied steps
         "tokens_per_s": float,    # target tokens trained per second of epoch wall time
         "epoch_seconds": float,
         "global_step": int,       # optimizer steps done after this epoch (skipped steps included)
         "skipped_steps": int}     # steps skipped in this epoch (non-finite loss with nan_policy "skip")
      ],
      "batch_losses": [[global_step, loss], ...],   # every log_every-th optimizer step (1-based step numbers)
      "nan_events": [{"epoch": int, "global_step": int, "loss": float|"nan"|"inf", "grad_norm": ..., "action":
                      "stop"|"skip"}],
      "checkpoints": [{"epoch": int, "global_step": int, "path": str, "sha256": str}],
      "final": {} | {"epochs_completed", "global_step", "train_loss", "val_loss", "val_token_acc",
                     "best_val_loss", "best_epoch", "skipped_steps", "train_seconds", "final_model",
                     "export_dir"} | {"error": str, ...},   # filled when status leaves "running"
      "schedule": {"kind": "cosine_warm_restarts", "base_lr", "min_lr", "t0", "t_mult", "warmup_steps",
                   "stepping": "per_step", "steps_per_epoch", "restart_epochs": [10, 30, 70, ...]}
    }

Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has no such numbers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apt_model.io import atomic_write_json

SCHEMA_VERSION = 1
REPORT_FILE = "experiment_report.json"
STATUSES = ("running", "finished", "failed")
EPOCH_KEYS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_token_acc",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "epoch_seconds",
    "global_step",
    "skipped_steps",
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def json_float(x: float | None) -> float | str | None:
    """A float JSON can hold: non-finite values become "nan"/"inf"/"-inf"."""
    if x is None:
        return None
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


@dataclass
class ExperimentReport:
    backend: str
    config: dict[str, Any]
    dataset: dict[str, Any]
    schedule: dict[str, Any]
    runtime: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    started_at: str = field(default_factory=now_iso)
    updated_at: str = field(default_factory=now_iso)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    batch_losses: list[list[float]] = field(default_factory=list)
    nan_events: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)

    def add_epoch(self, row: dict[str, Any]) -> None:
        missing = [k for k in EPOCH_KEYS if k not in row]
        if missing:
            raise ValueError(f"epoch row lacks {missing}")
        self.epochs.append({k: row[k] for k in EPOCH_KEYS})

    @classmethod
    def for_run(
        cls,
        backend: str,
        prep: Any,
        request: Any,
        train: Any,
        *,
        schedule: dict[str, Any],
        runtime: dict[str, Any],
    ) -> ExperimentReport:
        """The report of a run: configs and dataset from the validated ``Prepared`` and its ``TrainRequest``."""
        return cls(
            backend=backend,
            config={
                "model": prep.model_config.to_dict(),
                "train": train.to_dict(),
                "data": request.data.to_dict(),
            },
            dataset={
                "path": str(request.dataset),
                "sha256": prep.dataset_sha256,
                "n_train": len(prep.train_examples),
                "n_val": len(prep.val_examples),
            },
            schedule=schedule,
            runtime=runtime,
        )

    def finish(self, **fields: Any) -> None:
        """Mark the run finished; ``final`` gets the last epoch's metrics, the best validation loss and the
        skipped-step total (derived from the epoch rows), plus the trainer's own ``fields``."""
        rows = self.epochs
        last = rows[-1] if rows else {}
        vals = [(r["val_loss"], r["epoch"]) for r in rows if isinstance(r.get("val_loss"), float)]
        best_loss, best_epoch = min(vals) if vals else (None, None)
        self.status = "finished"
        self.final = {
            "train_loss": last.get("train_loss"),
            "val_loss": last.get("val_loss"),
            "val_token_acc": last.get("val_token_acc"),
            "best_val_loss": best_loss,
            "best_epoch": best_epoch,
            "skipped_steps": sum(int(r.get("skipped_steps", 0)) for r in rows),
            **fields,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "backend": self.backend,
            "status": self.status,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "config": self.config,
            "dataset": self.dataset,
            "runtime": self.runtime,
            "epochs": self.epochs,
            "batch_losses": self.batch_losses,
            "nan_events": self.nan_events,
            "checkpoints": self.checkpoints,
            "final": self.final,
            "schedule": self.schedule,
        }

    def history(self) -> dict[str, Any]:
        """The part of the report a checkpoint carries, so a resumed run continues the same record."""
        return {
            "started_at": self.started_at,
            "epochs": [dict(r) for r in self.epochs],
            "batch_losses": [list(r) for r in self.batch_losses],
            "nan_events": [dict(r) for r in self.nan_events],
            "checkpoints": [dict(r) for r in self.checkpoints],
            "resumed_from": list(self.runtime.get("resumed_from", [])),
        }

    def restore_history(self, history: dict[str, Any]) -> None:
        self.started_at = history.get("started_at", self.started_at)
        self.epochs = [dict(r) for r in history.get("epochs", [])]
        self.batch_losses = [list(r) for r in history.get("batch_losses", [])]
        self.nan_events = [dict(r) for r in history.get("nan_events", [])]
        self.checkpoints = [dict(r) for r in history.get("checkpoints", [])]
        self.runtime["resumed_from"] = list(history.get("resumed_from", []))

    def write(self, path: str | Path) -> Path:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        self.updated_at = now_iso()
        atomic_write_json(path, self.to_dict())
        return Path(path)


def read_report(path: str | Path) -> dict[str, Any]:
    """The report as a dict (readers should check ``schema_version``)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
