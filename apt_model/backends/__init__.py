"""Training backends: one small protocol and one registry.

The CLI (``apt train --backend``, ``apt train --list-backends``), the Prefect flow's ``backend`` parameter and the
docs all read ``BACKENDS``. Entries name the implementing class by import path so that listing backends never
imports DeepSpeed, transformers or azure-ai-ml; each backend imports its heavy stack inside ``train``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from apt_model.config import DataConfig, ModelConfig, TrainConfig
from apt_model.errors import ConfigError


@dataclass
class TrainRequest:
    """Everything a backend needs to train one model. Plain data: it can cross a process boundary as JSON."""

    model: ModelConfig
    train: TrainConfig
    dataset: Path
    out_dir: Path
    resume: Path | None = None
    data: DataConfig = field(default_factory=DataConfig)
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific, validated by the backend
    tracking_uri: str | None = None  # MLflow; None → local SQLite store under out_dir's parent
    experiment: str = "apt"
    # Called once per finished epoch with the epoch's report row (the pipeline turns it into a progress artifact).
    on_epoch: Callable[[dict[str, Any]], None] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "data": self.data.to_dict(),
            "dataset": str(self.dataset),
            "out_dir": str(self.out_dir),
            "resume": str(self.resume) if self.resume else None,
            "options": dict(self.options),
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainRequest:
        return cls(
            model=ModelConfig.from_dict(d["model"]),
            train=TrainConfig.from_dict(d["train"]),
            data=DataConfig.from_dict(d.get("data") or {}),
            dataset=Path(d["dataset"]),
            out_dir=Path(d["out_dir"]),
            resume=Path(d["resume"]) if d.get("resume") else None,
            options=dict(d.get("options") or {}),
            tracking_uri=d.get("tracking_uri"),
            experiment=d.get("experiment", "apt"),
        )


@dataclass
class TrainResult:
    """The manifest a backend returns: small, JSON-able, passed between pipeline stages."""

    backend: str
    out_dir: str
    final_model: str  # a path that `apt verify --model` and `load_model` accept
    export_dir: str | None  # config.json + model.safetensors + tokenizer.json
    report: str  # experiment_report.json
    last_checkpoint: str | None
    epochs_completed: int
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> hash, for cache checks
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@runtime_checkable
class Backend(Protocol):
    name: str
    summary: str
    extra: str | None  # the pip extra that brings its stack, e.g. "deepspeed"; None when core

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Backend-specific flags of `apt train` (the guide's names)."""

    def options_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        """Collect this backend's flags into `TrainRequest.options`."""

    def validate(self, request: TrainRequest) -> None:
        """Raise `ConfigError` for anything wrong, before any work starts."""

    def train(self, request: TrainRequest) -> TrainResult: ...


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str  # "module:Class"
    summary: str
    requires: tuple[str, ...] = ()  # importable modules its stack needs
    extra: str | None = None

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    @property
    def installed(self) -> bool:
        return not self.missing()

    def load(self) -> Backend:
        module_name, _, cls_name = self.target.partition(":")
        backend = getattr(importlib.import_module(module_name), cls_name)()
        return backend


BACKENDS: dict[str, BackendSpec] = {}


def register(spec: BackendSpec) -> None:
    BACKENDS[spec.name] = spec


register(
    BackendSpec(
        "playground",
        "apt_model.backends.playground:PlaygroundBackend",
        "one local GPU (or CPU): cosine warm restarts, mixed precision, accumulation, DBC-DAC",
    )
)
register(
    BackendSpec(
        "deepspeed",
        "apt_model.backends.deepspeed_backend:DeepSpeedBackend",
        "several GPUs (or CPU processes): ZeRO 1/2/3, CPU offload, fp16/bf16, sharded data",
        requires=("deepspeed",),
        extra="deepspeed",
    )
)
register(
    BackendSpec(
        "huggingface",
        "apt_model.backends.huggingface:HuggingFaceBackend",
        "transformers Trainer: TensorBoard, W&B, early stopping, Hub upload, DeepSpeed via the Trainer",
        requires=("transformers", "accelerate"),
        extra="hf",
    )
)
register(
    BackendSpec(
        "azure",
        "apt_model.backends.azure:AzureBackend",
        "Azure ML: managed compute cluster, command and sweep jobs, MLflow tracking, follow and fetch",
        requires=("azure.ai.ml", "azure.identity"),
        extra="azure",
    )
)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; a clear error when it is unknown or its extra is not installed."""
    spec = BACKENDS.get(name)
    if spec is None:
        raise ConfigError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    missing = spec.missing()
    if missing:
        hint = f" (pip install 'apt-pipeline[{spec.extra}]')" if spec.extra else ""
        raise ConfigError(f"backend {name!r} needs {', '.join(missing)}, which is not installed{hint}")
    return spec.load()


def describe_backends() -> list[dict[str, Any]]:
    """One row per registered backend, for `--list-backends` and the docs."""
    return [
        {
            "name": spec.name,
            "summary": spec.summary,
            "extra": spec.extra,
            "installed": spec.installed,
            "missing": spec.missing(),
        }
        for spec in BACKENDS.values()
    ]
