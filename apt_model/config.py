"""One config dataclass per concern: model, data, DBC-DAC, training.

Configs are plain dataclasses of JSON-able fields. They validate on construction (a ``ConfigError`` naming
the field), round-trip through ``to_dict``/``from_dict`` (and JSON/YAML files), and are saved beside every
checkpoint so a model can be rebuilt from its config alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self, TypeVar

from apt_model.data.pairs import SIZES
from apt_model.errors import ConfigError

T = TypeVar("T", bound="_Config")


class _Config:
    """Shared dict/JSON/YAML round-tripping and field checking."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Self:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        bad_keys = [k for k in data if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"{cls.__name__}: field names must be strings (got {bad_keys[0]!r})")
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            nested = _nested_config_type(known[name])
            kwargs[name] = nested.from_dict(value) if nested and isinstance(value, Mapping) else value
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - guarded by the unknown-field check
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cls.__name__}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Load from a ``.json`` or ``.yaml``/``.yml`` file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: cannot read config ({exc.__class__.__name__})") from None
        if p.suffix in {".yaml", ".yml"}:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{p}: expected a mapping at the top level")
            return cls.from_dict(data)
        return cls.from_json(text)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def _check(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{type(self).__name__}.{name}: {message} (got {getattr(self, name)!r})")

    def _check_types(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            expected = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            if expected == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{type(self).__name__}.{f.name}: expected true/false (got {value!r})")
            if expected == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{type(self).__name__}.{f.name}: expected an integer (got {value!r})")
            if expected == "float":
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise ConfigError(
                        f"{type(self).__name__}.{f.name}: expected a finite number (got {value!r})"
                    )
                object.__setattr__(self, f.name, float(value))
            if expected == "str" and not isinstance(value, str):
                raise ConfigError(f"{type(self).__name__}.{f.name}: expected a string (got {value!r})")


def _nested_config_type(f: dataclasses.Field[Any]) -> type[_Config] | None:
    name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    return {"DBCDACConfig": DBCDACConfig}.get(name)


@dataclass
class ModelConfig(_Config):
    """The APT encoder-decoder. Defaults are the reference implementation's."""

    vocab_size: int = 30522
    d_model: int = 768
    n_encoder_layers: int = 12
    n_decoder_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    dropout: float = 0.1
    eps: float = 1e-6
    alpha: float = 0.1
    init_tau: float = 1.0
    sr_ratio: int = 4
    use_autopoietic: bool = True
    max_len: int = 512
    pad_id: int = 0
    # The spec's N(0, 0.02). Against the unscaled sinusoidal positions (norm sqrt(d/2)) such token vectors are a few
    # percent of the input, and the model barely learns which token it reads (BENCHMARKS.md, quality runs); the
    # quality recipes raise it. Only the initialisation: a trained model's weights do not depend on it.
    embedding_init_std: float = 0.02

    def __post_init__(self) -> None:
        self._check_types()
        for name in (
            "vocab_size",
            "d_model",
            "n_encoder_layers",
            "n_decoder_layers",
            "n_heads",
            "d_ff",
            "sr_ratio",
            "max_len",
        ):
            self._check(getattr(self, name) > 0, name, "must be positive")
        self._check(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model}")
        self._check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self._check(self.eps > 0, "eps", "must be positive")
        self._check(self.init_tau > 0, "init_tau", "must be positive")
        self._check(self.embedding_init_std > 0, "embedding_init_std", "must be positive")
        self._check(0 <= self.pad_id < self.vocab_size, "pad_id", "must be a valid token id")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def autopoietic_hidden(self) -> int:
        """Width of the per-element MLP inside the autopoietic transform."""
        return max(16, self.d_model // self.sr_ratio)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Tests and CI: 2 layers, width 32.
    "tiny": dict(
        d_model=32, n_encoder_layers=2, n_decoder_layers=2, n_heads=4, d_ff=64, dropout=0.0, max_len=128
    ),
    # The guide's Playground config.
    "playground": dict(
        d_model=256, n_encoder_layers=6, n_decoder_layers=6, n_heads=8, d_ff=1024, max_len=256
    ),
    # The reference implementation's defaults.
    "reference": dict(),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return ModelConfig.from_dict({**MODEL_PRESETS[name], **overrides})


@dataclass
class DBCDACConfig(_Config):
    """Dimension-balanced compression + dimension-accompanying compensation of large 2-D gradients."""

    enabled: bool = True
    every_n_steps: int = 20
    min_numel: int = 150_000
    threshold: float = 1e-6
    rank_ratio_proj: float = 0.1
    rank_ratio_res: float = 0.05
    res_scale: float = 0.1
    iterations: int = 1

    def __post_init__(self) -> None:
        self._check_types()
        self._check(self.every_n_steps >= 1, "every_n_steps", "must be >= 1")
        self._check(self.min_numel >= 1, "min_numel", "must be >= 1")
        self._check(self.threshold > 0, "threshold", "must be positive")
        self._check(0 < self.rank_ratio_proj <= 1, "rank_ratio_proj", "must be in (0, 1]")
        self._check(0 < self.rank_ratio_res <= 1, "rank_ratio_res", "must be in (0, 1]")
        self._check(self.res_scale >= 0, "res_scale", "must be >= 0")
        self._check(self.iterations >= 0, "iterations", "must be >= 0")


@dataclass
class DataConfig(_Config):
    """Which HLBD dataset to generate (or load) and how to cut it into sequences."""

    kind: str = "hardcore"  # hardcore | full
    seed: int = 42
    size: str = "default"  # small | default | large: scales the computed problems
    val_fraction: float = 0.1
    max_src_len: int = 64
    max_tgt_len: int = 64
    # "MODULE=K,…": each training pair of MODULE appears K times an epoch (validation is untouched). Small fact
    # modules (zodiac, physics' facts) are seen too rarely to hold their held-out phrasings when the computed
    # problems dominate an epoch; repeating them costs little.
    repeat: str = ""

    def __post_init__(self) -> None:
        self._check_types()
        self._check(self.kind in ("hardcore", "full"), "kind", "must be 'hardcore' or 'full'")
        self._check(self.size in SIZES, "size", f"must be one of {', '.join(SIZES)}")
        self._check(0.0 < self.val_fraction < 0.5, "val_fraction", "must be in (0, 0.5)")
        self._check(self.max_src_len > 0, "max_src_len", "must be positive")
        self._check(self.max_tgt_len > 1, "max_tgt_len", "must be > 1")
        self.repeat_counts()

    def repeat_counts(self) -> dict[str, int]:
        """``repeat`` as {module: times}, or ConfigError naming what is wrong with it."""
        counts: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in self.repeat.split(","))):
            module, sep, times = item.partition("=")
            module = module.strip()
            self._check(
                bool(sep and module) and times.strip().isdigit(),
                "repeat",
                "each item must be MODULE=K, K a whole number",
            )
            self._check(module not in counts, "repeat", f"{module!r} given twice")
            self._check(1 <= int(times) <= 100, "repeat", f"{module}: K must be in 1..100")
            counts[module] = int(times)
        return counts


@dataclass
class TrainConfig(_Config):
    """Training semantics shared by every backend (so their runs are comparable)."""

    epochs: int = 100
    batch_size: int = 16
    grad_accum: int = 2
    lr: float = 3e-4
    min_lr: float = 1e-5
    t0: int = 10
    t_mult: int = 2
    weight_decay: float = 0.01
    # AdamW's moment decays (torch's defaults). On the HLBD recipe beta2 0.95 let no learning rate above 1e-3 train
    # and did not lift accuracy (BENCHMARKS.md, nineteenth session), so the defaults stay.
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    # Weight decay on the token embedding too, so on the tied output projection as well. Off: the usual exemption.
    decay_embeddings: bool = False
    clip_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    warmup_steps: int = 0
    # Dropout (ModelConfig.dropout) only in the first N epochs, then off; 0: in every epoch. Dropout slows fitting the
    # training set; switched off for the last epochs, the run fits it (BENCHMARKS.md, sixteenth session's quality runs).
    dropout_epochs: int = 0
    # The worked-steps curriculum (training/curriculum.py): HLBD's products of a two-digit multiplier trained on worked
    # steps (37 × 14 → 148+370=518) for worked_steps_epochs epochs, the steps removed over the next worked_steps_ramp,
    # the plain answers after; both 0: off. The data and every score stay plain. On the README recipe (8 and 30 of 52
    # epochs) physics' val went from 82.8-92.0% (mean 87.7%) to 93.4-97.1% (BENCHMARKS.md, twenty-seventh session).
    worked_steps_epochs: int = 0
    worked_steps_ramp: int = 0
    seed: int = 42
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    save_interval: int = 25
    eval_every: int = 1
    deterministic: bool = False
    compile: str = "auto"  # auto | on | off  (the fast GPU path)
    # What the compiled step replays from CUDA graphs: auto (step on CUDA in bf16/fp32, loss with fp16's scaler) |
    # step (the whole optimizer step) | loss (forward + backward only) | off
    cuda_graphs: str = "auto"
    transform_kernel: str = "auto"  # auto | triton | torch  (fused Triton autopoietic transform on CUDA)
    nan_policy: str = "stop"  # stop | skip
    log_every: int = 10
    dbc_dac: DBCDACConfig = field(default_factory=DBCDACConfig)

    def dropout_on(self, epoch: int) -> bool:
        """Whether dropout applies in the epoch with 0-based index ``epoch``."""
        return self.dropout_epochs == 0 or epoch < self.dropout_epochs

    @property
    def worked_steps(self) -> bool:
        """Whether the worked-steps curriculum is on."""
        return self.worked_steps_epochs > 0 or self.worked_steps_ramp > 0

    def __post_init__(self) -> None:
        if isinstance(self.dbc_dac, Mapping):
            self.dbc_dac = DBCDACConfig.from_dict(self.dbc_dac)
        if not isinstance(self.dbc_dac, DBCDACConfig):
            raise ConfigError(
                f"TrainConfig.dbc_dac: expected a mapping of DBC-DAC settings (got {self.dbc_dac!r})"
            )
        self._check_types()
        self._check(self.epochs >= 1, "epochs", "must be >= 1")
        self._check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self._check(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        self._check(self.lr > 0, "lr", "must be positive")
        self._check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}]")
        self._check(self.t0 >= 1, "t0", "must be >= 1")
        self._check(self.t_mult >= 1, "t_mult", "must be >= 1")
        self._check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self._check(0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
        self._check(0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
        self._check(self.clip_grad_norm > 0, "clip_grad_norm", "must be positive")
        self._check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        self._check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._check(self.dropout_epochs >= 0, "dropout_epochs", "must be >= 0 (0: dropout in every epoch)")
        self._check(self.worked_steps_epochs >= 0, "worked_steps_epochs", "must be >= 0 (0 with ramp 0: off)")
        self._check(self.worked_steps_ramp >= 0, "worked_steps_ramp", "must be >= 0 (0 with epochs 0: off)")
        self._check(
            not self.worked_steps or self.worked_steps_epochs + self.worked_steps_ramp < self.epochs,
            "worked_steps_epochs",
            f"plus worked_steps_ramp={self.worked_steps_ramp} must be below epochs={self.epochs}, so that the last "
            "epochs train the plain answers",
        )
        self._check(
            self.precision in ("auto", "fp32", "bf16", "fp16"),
            "precision",
            "must be auto, fp32, bf16 or fp16",
        )
        self._check(self.save_interval >= 1, "save_interval", "must be >= 1")
        self._check(self.eval_every >= 1, "eval_every", "must be >= 1")
        self._check(self.compile in ("auto", "on", "off"), "compile", "must be auto, on or off")
        self._check(
            self.cuda_graphs in ("auto", "step", "loss", "off"),
            "cuda_graphs",
            "must be auto, step, loss or off",
        )
        self._check(
            self.transform_kernel in ("auto", "triton", "torch"),
            "transform_kernel",
            "must be auto, triton or torch",
        )
        self._check(self.nan_policy in ("stop", "skip"), "nan_policy", "must be stop or skip")
        self._check(self.log_every >= 1, "log_every", "must be >= 1")
