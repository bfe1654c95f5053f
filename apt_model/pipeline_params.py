"""The pipeline's parameters: one validated model shared by the Prefect flow, `apt pipeline run` and the docs.

The flow's signature is flat (so users type ``--param backend=playground --param epochs=3``); its first act is
``parse_params(...)``, which builds the real ``ModelConfig``/``TrainConfig``/``DataConfig`` inside the validators.
Any problem becomes one ``ConfigError`` line that starts with the offending field (``backend: unknown backend
'nope'; ...``) before any stage starts.

No Prefect import here: the validation is unit-tested on its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from apt_model.config import MODEL_PRESETS, DataConfig, ModelConfig, TrainConfig, model_preset
from apt_model.errors import AptError, ConfigError

# Backends the guide describes. Until one is registered in `apt_model.backends.BACKENDS`, selecting it fails with
# "not available" rather than "unknown", so a deployment aimed at a pool for it says what is missing.
GUIDE_BACKENDS = ("playground", "deepspeed", "azure", "huggingface")

# DataConfig fields that have their own flat parameter; the others go through `data_overrides`.
_DATA_PARAM = {
    "kind": "dataset_kind",
    "seed": "dataset_seed",
    "size": "dataset_size",
    "val_fraction": "val_fraction",
}
_FLAT_TRAIN = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "save_interval": "save_interval"}


class PipelineParams(BaseModel):
    """Every parameter of the `apt` flow. Field names are the `--param` names."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    # which engine trains
    backend: str = Field("playground", description="training backend: a key of apt_model.backends.BACKENDS")
    backend_options: dict[str, Any] = Field(default_factory=dict, description="backend-specific options")
    # HLBD data
    dataset_kind: str = Field("hardcore", description="hardcore | full")
    dataset_seed: int = Field(42, description="generator seed")
    dataset_size: str = Field("small", description="small | default | large | xl | xxl")
    val_fraction: float = Field(0.1, description="validation share, in (0, 0.5)")
    data_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="other DataConfig fields: max_src_len, max_tgt_len, repeat (e.g. 'zodiac=3,physics=3')",
    )
    # model
    preset: str = Field("tiny", description="model preset: tiny | playground | reference")
    model_overrides: dict[str, Any] = Field(
        default_factory=dict, description="ModelConfig fields over the preset"
    )
    # training
    epochs: int = Field(3, description="training epochs")
    batch_size: int = Field(16, description="batch size")
    lr: float = Field(3e-4, description="base learning rate")
    save_interval: int = Field(5, description="checkpoint every N epochs (what a retried stage resumes from)")
    train_seed: int = Field(42, description="training seed")
    train_overrides: dict[str, Any] = Field(default_factory=dict, description="other TrainConfig fields")
    train_timeout_s: int = Field(
        24 * 3600, description="the training stage is killed after this many seconds"
    )
    train_retries: int = Field(2, description="retries of the training stage after a crash (each resumes)")
    # verification gate
    verify_split: str = Field("val", description="split the gate is measured on: val | train | all")
    verify_sample: int | None = Field(None, description="verify on at most N pairs (None: all)")
    gate_thresholds: dict[str, float] = Field(
        default_factory=dict, description="verification gate thresholds"
    )
    # outputs and behaviour
    output_root: str = Field("runs/default", description="root of cache, reports, plots and MLflow store")
    refresh: bool = Field(False, description="rebuild data and model even when a verified cache entry exists")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow store (default: sqlite under output_root)"
    )
    experiment: str = Field("apt", description="MLflow experiment name")
    # scheduled retraining
    promote: bool = Field(
        False, description="register the model and move the champion alias when it is no worse"
    )
    resume_from_champion: bool = Field(False, description="continue training from the current champion")
    model_name: str = Field("apt-hlbd", description="MLflow registered model name")
    promote_tolerance: float = Field(0.0, description="accuracy the candidate may lose against the champion")

    @field_validator("backend")
    @classmethod
    def _backend_registered(cls, name: str) -> str:
        from apt_model.backends import BACKENDS

        available = ", ".join(sorted(BACKENDS)) or "none"
        spec = BACKENDS.get(name)
        if spec is None:
            if name in GUIDE_BACKENDS:
                raise ValueError(
                    f"backend {name!r} is not available in this installation (not registered; available: {available})"
                )
            raise ValueError(f"unknown backend {name!r}; available: {available}")
        missing = spec.missing()
        if missing:
            raise ValueError(
                f"backend {name!r} is not available: needs {', '.join(missing)}, which is not installed"
            )
        return name

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str) -> str:
        if value not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {value!r}; choose one of {', '.join(MODEL_PRESETS)}")
        return value

    @field_validator("epochs", "batch_size", "save_interval", "train_timeout_s")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1 (got {value})")
        return value

    @field_validator("train_retries")
    @classmethod
    def _non_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"must be >= 0 (got {value})")
        return value

    @field_validator("verify_split")
    @classmethod
    def _split(cls, value: str) -> str:
        if value not in ("val", "train", "all"):
            raise ValueError(f"must be val, train or all (got {value!r})")
        return value

    @field_validator("verify_sample")
    @classmethod
    def _sample(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be >= 1 or null (got {value})")
        return value

    @field_validator("output_root")
    @classmethod
    def _root(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("model_name", "experiment")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip() or "/" in value:
            raise ValueError(f"must be a non-empty name without '/' (got {value!r})")
        return value

    @model_validator(mode="after")
    def _build_configs(self) -> PipelineParams:
        # Build the real configs now: their own validation (e.g. n_heads must divide d_model) is the source of truth.
        for name, build in (
            ("data_overrides", self.data_config),
            ("model_overrides", self.model_cfg),
            ("train_overrides", self.train_cfg),
        ):
            try:
                build()
            except ConfigError as exc:
                message = str(exc)
                field_name = re.match(r"DataConfig\.(\w+):", message)
                if field_name:  # name the flat parameter, not the dataclass field
                    name = _DATA_PARAM.get(field_name.group(1), name)
                raise ValueError(f"{name}: {message}") from None
        clash = sorted(set(self.train_overrides) & (set(_FLAT_TRAIN) | {"seed"}))
        if clash:
            raise ValueError(f"train_overrides: set {', '.join(clash)} with the flat parameter instead")
        clash = sorted(set(self.data_overrides) & set(_DATA_PARAM))
        if clash:
            flat = ", ".join(_DATA_PARAM[k] for k in clash)
            raise ValueError(
                f"data_overrides: set {', '.join(clash)} with the flat parameter ({flat}) instead"
            )
        if self.resume_from_champion and not self.promote:
            # Continuing from the champion only makes sense in the retrain loop that can replace it.
            raise ValueError("resume_from_champion: needs promote=true (the retrain deployment)")
        return self

    # The configs the stages use (built fresh; the dataclasses are mutable).
    def data_config(self) -> DataConfig:
        return DataConfig.from_dict(
            {
                **self.data_overrides,
                "kind": self.dataset_kind,
                "seed": self.dataset_seed,
                "size": self.dataset_size,
                "val_fraction": self.val_fraction,
            }
        )

    def model_cfg(self, vocab_size: int | None = None) -> ModelConfig:
        overrides = dict(self.model_overrides)
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        return model_preset(self.preset, **overrides)

    def train_cfg(self) -> TrainConfig:
        return TrainConfig.from_dict(
            {
                **self.train_overrides,
                "epochs": self.epochs,
                "batch_size": self.batch_size,
                "lr": self.lr,
                "save_interval": self.save_interval,
                "seed": self.train_seed,
            }
        )

    @property
    def root(self) -> Path:
        return Path(self.output_root).expanduser().resolve()

    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def data_payload(self) -> dict[str, Any]:
        """What the generated dataset depends on (plus the generator version, added by the data stage)."""
        return {
            "kind": self.dataset_kind,
            "seed": self.dataset_seed,
            "size": self.dataset_size,
            "val_fraction": self.val_fraction,
        }


def parse_params(values: dict[str, Any] | None = None, **kwargs: Any) -> PipelineParams:
    """Validate; on failure raise one ``ConfigError`` line naming the field(s)."""
    data = {**(values or {}), **kwargs}
    try:
        return PipelineParams.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
    except AptError:
        raise


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown parameter"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_cli_value(text: str) -> Any:
    """`--param k=v` values: JSON when it parses (numbers, true/false, null, objects), else the raw string."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
