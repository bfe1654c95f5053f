"""The Hugging Face backend: the ``transformers`` Trainer driving the shared training semantics.

What is shared with the Playground backend (so the runs are comparable — on CPU in fp32 the per-step losses
agree): ``prepare`` (validation, dataset, tokenizer, model config), the objective
(``training.loop.compute_loss`` → ``seq2seq_loss``, through a ``Trainer.compute_loss`` override), the batches
(``Batcher`` order, through ``get_train_dataloader``), token-weighted accumulation windows (short last window
included), AdamW param groups + ``WarmRestartSchedule`` stepped per optimizer step (``create_optimizer`` /
``create_scheduler``), DBC-DAC then clipping on the accumulated gradient (a ``TrainerCallback``'s
``on_pre_optimizer_step``; the Trainer's own clipping is off), the NaN policy, teacher-forced token-weighted
validation (``evaluate`` override, metric ``eval_loss``), ``experiment_report.json`` and MLflow (``Tracker``).

What the Trainer adds: ``checkpoint-N/`` folders (config.json, model.safetensors, optimizer/scheduler/RNG state,
``trainer_state.json``, plus ``apt_state.json`` with the report history), ``--resume-from-checkpoint``,
TensorBoard event files under ``<out_dir>/logs`` (always), Weights & Biases (``--wandb``; offline unless
``WANDB_API_KEY`` is set), early stopping (``--early-stopping``: best model by ``eval_loss`` loaded at the end),
``--deepspeed ds_config.json`` (ZeRO through accelerate; the clipping is then DeepSpeed's and DBC-DAC is not
applied because ZeRO owns the gradients), and the Hub upload of ``final_model/`` when ``HF_HUB_TOKEN`` is set
(``--hub-repo-id``; the token is never logged or written).

Outputs: ``checkpoint-N/``, ``final_model/`` (:func:`apt_model.hf.save_hf`: ``AutoModelForSeq2SeqLM`` /
``AutoTokenizer`` load it), ``final_model.pt`` (the native checkpoint ``load_model`` / ``apt verify`` read),
``logs/``, ``experiment_report.json``, ``train_result.json``.

Backend options (``TrainRequest.options``; the CLI flags in brackets): ``fp16``/``bf16`` [--fp16/--bf16],
``learning_rate`` [--learning-rate], ``max_grad_norm`` [--max-grad-norm], ``logging_steps`` [--logging-steps],
``save_steps`` [--save-steps], ``save_total_limit`` [--save-total-limit], ``gradient_accumulation_steps``
[--gradient-accumulation-steps] (each overrides the matching ``TrainConfig`` field: lr, clip_grad_norm,
log_every, grad_accum, precision), ``early_stopping``, ``early_stopping_patience``, ``early_stopping_threshold``,
``wandb``, ``wandb_project``, ``deepspeed`` (a JSON file), ``resume_from_checkpoint`` (a ``checkpoint-N`` dir),
``hub_repo_id``, ``hub_private``, and the loop's ``device``, ``pad``, ``progress``, ``overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apt_model.backends import TrainRequest, TrainResult
from apt_model.errors import CheckpointError, ConfigError

log = logging.getLogger("apt_model.training")

NAME = "huggingface"
SUMMARY = "transformers Trainer: TensorBoard, W&B, early stopping, Hub upload, DeepSpeed via the Trainer"
LOOP_OPTIONS = ("device", "pad", "progress", "overwrite")
HF_OPTIONS = (
    "fp16",
    "bf16",
    "learning_rate",
    "max_grad_norm",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "gradient_accumulation_steps",
    "early_stopping",
    "early_stopping_patience",
    "early_stopping_threshold",
    "wandb",
    "wandb_project",
    "deepspeed",
    "resume_from_checkpoint",
    "hub_repo_id",
    "hub_private",
)
OPTION_KEYS = LOOP_OPTIONS + HF_OPTIONS
APT_STATE = "apt_state.json"
LOGS_DIR = "logs"
HUB_TOKEN_ENV = "HF_HUB_TOKEN"
DEFAULT_WANDB_PROJECT = "apt-hlbd-training"
CHECKPOINT_DIR_RE = re.compile(r"^checkpoint-(\d+)$")
# DeepSpeed config keys the Trainer fills from its arguments: "auto" or a value equal to ours.
DS_AUTO_KEYS = {
    "train_micro_batch_size_per_gpu": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_clipping": "clip_grad_norm",
}


# ------------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class HFSettings:
    """The validated backend options, with the TrainConfig they imply."""

    train: Any  # TrainConfig with the flag overrides applied
    save_steps: int | None
    save_total_limit: int | None
    early_stopping: bool
    patience: int
    threshold: float
    wandb: bool
    wandb_project: str
    deepspeed: Path | None
    deepspeed_config: dict[str, Any] | None
    resume_from_checkpoint: Path | None
    hub_repo_id: str | None
    hub_private: bool


def _positive_int(opts: dict[str, Any], key: str, flag: str, *, minimum: int = 1) -> int | None:
    value = opts.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag} must be an integer >= {minimum} (got {value!r})")
    return value


def _positive_float(opts: dict[str, Any], key: str, flag: str, *, allow_zero: bool = False) -> float | None:
    value = opts.get(key)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{flag} must be a finite number {bound} (got {value!r})")
    return float(value)


def _load_deepspeed_config(path: Path, train: Any) -> dict[str, Any]:
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "--deepspeed needs the deepspeed package, which is not installed (pip install deepspeed)"
        )
    if not path.is_file():
        raise ConfigError(f"--deepspeed {path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"--deepspeed {path}: not a readable JSON file ({exc.__class__.__name__})"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--deepspeed {path}: expected a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in data:
            raise ConfigError(
                f"--deepspeed {path}: remove the {section!r} section — the backend uses the shared AdamW and "
                "cosine warm restarts (set lr/t0/min_lr through the train config)"
            )
    stage = (data.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"--deepspeed {path}: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")
    for key, field in DS_AUTO_KEYS.items():
        value = data.get(key, "auto")
        if value != "auto" and value != getattr(train, field):
            raise ConfigError(
                f"--deepspeed {path}: {key} is {value!r} but the train config says {getattr(train, field)!r}; "
                'use "auto"'
            )
    for key in ("fp16", "bf16"):
        enabled = (data.get(key) or {}).get("enabled", False)
        if enabled not in ("auto", False) and train.precision != key:
            raise ConfigError(
                f"--deepspeed {path}: {key}.enabled is set but the run's precision is {train.precision}"
            )
    return data


def resolve_settings(request: TrainRequest) -> HFSettings:
    """Check the backend options (cheap checks only: no dataset is read). Raises ``ConfigError``."""
    opts = dict(request.options)
    unknown = sorted(set(opts) - set(OPTION_KEYS))
    if unknown:
        raise ConfigError(f"huggingface backend: unknown option(s) {', '.join(unknown)}")
    fp16, bf16 = bool(opts.get("fp16")), bool(opts.get("bf16"))
    if fp16 and bf16:
        raise ConfigError("--fp16 and --bf16 are mutually exclusive; pick one")
    changes: dict[str, Any] = {}
    flag_precision = "fp16" if fp16 else "bf16" if bf16 else None
    if flag_precision:
        if request.train.precision not in ("auto", flag_precision):
            raise ConfigError(
                f"--{flag_precision} contradicts TrainConfig.precision={request.train.precision!r}"
            )
        changes["precision"] = flag_precision
    for key, flag, field in (
        ("learning_rate", "--learning-rate", "lr"),
        ("max_grad_norm", "--max-grad-norm", "clip_grad_norm"),
    ):
        value = _positive_float(opts, key, flag)
        if value is not None:
            changes[field] = value
    for key, flag, field in (
        ("gradient_accumulation_steps", "--gradient-accumulation-steps", "grad_accum"),
        ("logging_steps", "--logging-steps", "log_every"),
    ):
        value_i = _positive_int(opts, key, flag)
        if value_i is not None:
            changes[field] = value_i
    try:
        train = request.train.replace(**changes)
    except ConfigError as exc:
        raise ConfigError(f"huggingface backend flags give an invalid train config: {exc}") from None

    save_steps = _positive_int(opts, "save_steps", "--save-steps")
    save_total_limit = _positive_int(opts, "save_total_limit", "--save-total-limit")
    early = bool(opts.get("early_stopping"))
    patience = _positive_int(opts, "early_stopping_patience", "--early-stopping-patience")
    threshold = _positive_float(
        opts, "early_stopping_threshold", "--early-stopping-threshold", allow_zero=True
    )
    if not early and (patience is not None or threshold is not None):
        raise ConfigError("--early-stopping-patience/--early-stopping-threshold need --early-stopping")
    if early and save_steps is not None:
        raise ConfigError(
            "--early-stopping evaluates and saves at epoch ends; drop --save-steps (the best checkpoint must be saved)"
        )

    wandb = bool(opts.get("wandb"))
    project = opts.get("wandb_project")
    if project is not None and not wandb:
        raise ConfigError("--wandb-project needs --wandb")
    if wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb needs the wandb package, which is not installed (pip install wandb)")

    ds_path = Path(opts["deepspeed"]) if opts.get("deepspeed") else None
    ds_config = _load_deepspeed_config(ds_path, train) if ds_path is not None else None

    resume = Path(opts["resume_from_checkpoint"]) if opts.get("resume_from_checkpoint") else None
    if request.resume is not None:
        if resume is not None:
            raise ConfigError("give either resume or --resume-from-checkpoint, not both")
        resume = Path(request.resume)
    if resume is not None and (not resume.is_dir() or not (resume / "trainer_state.json").is_file()):
        raise CheckpointError(
            f"{resume}: not a Trainer checkpoint directory (expected checkpoint-N/ with trainer_state.json); "
            "the huggingface backend resumes from --resume-from-checkpoint <out_dir>/checkpoint-N"
        )

    repo_id = opts.get("hub_repo_id")
    if repo_id is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(str(repo_id))
        except HFValidationError as exc:
            raise ConfigError(f"--hub-repo-id {repo_id!r}: {str(exc).splitlines()[0]}") from None
    return HFSettings(
        train=train,
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        early_stopping=early,
        patience=patience if patience is not None else 1,
        threshold=threshold if threshold is not None else 0.0,
        wandb=wandb,
        wandb_project=str(project or DEFAULT_WANDB_PROJECT),
        deepspeed=ds_path,
        deepspeed_config=ds_config,
        resume_from_checkpoint=resume,
        hub_repo_id=str(repo_id) if repo_id is not None else None,
        hub_private=bool(opts.get("hub_private", False)),
    )


def _existing_run(out_dir: Path) -> list[str]:
    if not out_dir.is_dir():
        return []
    found = [p.name for p in out_dir.iterdir() if CHECKPOINT_DIR_RE.match(p.name) and p.is_dir()]
    found += [
        n for n in ("experiment_report.json", "final_model", "final_model.pt") if (out_dir / n).exists()
    ]
    return sorted(found)


def _check_resume(settings: HFSettings, prep: Any) -> dict[str, Any]:
    """The checkpoint's model config must be the requested one, and it must come from the same dataset."""
    ckpt = settings.resume_from_checkpoint
    assert ckpt is not None
    try:
        raw = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{ckpt / 'config.json'}: cannot read ({exc.__class__.__name__})") from None
    want = prep.model_config.to_dict()
    diff = [f"{k}: {raw.get(k)!r} vs {v!r}" for k, v in want.items() if raw.get(k) != v]
    if diff:
        raise CheckpointError(
            f"{ckpt}: checkpoint model config differs from the requested one ({'; '.join(diff[:4])})"
        )
    state_path = ckpt / APT_STATE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing (not a checkpoint of the huggingface backend)")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_path}: cannot read ({exc.__class__.__name__})") from None
    sha = state.get("dataset_sha256")
    if sha and sha != prep.dataset_sha256:
        raise CheckpointError(
            f"{ckpt}: checkpoint was trained on dataset sha256 {sha[:12]}…, but the dataset has "
            f"{prep.dataset_sha256[:12]}…"
        )
    return state


# ------------------------------------------------------------------------------------------------- backend


class HuggingFaceBackend:
    name = NAME
    summary = SUMMARY
    extra: str | None = "hf"

    def __init__(self) -> None:
        self._prepared: tuple[str, Any] | None = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        a = parser.add_argument
        a(
            "--fp16",
            action="store_true",
            default=False,
            help="huggingface/deepspeed: fp16 mixed precision (CUDA)",
        )
        a("--bf16", action="store_true", default=False, help="huggingface/deepspeed: bf16 mixed precision")
        a(
            "--learning-rate",
            dest="hf_learning_rate",
            type=float,
            default=None,
            help="huggingface: same as --lr",
        )
        a("--max-grad-norm", dest="hf_max_grad_norm", type=float, default=None, help="huggingface: clip norm")
        a(
            "--logging-steps",
            dest="hf_logging_steps",
            type=int,
            default=None,
            help="huggingface: log every N steps",
        )
        a(
            "--save-steps",
            dest="hf_save_steps",
            type=int,
            default=None,
            help="huggingface: checkpoint-N every N steps",
        )
        a(
            "--save-total-limit",
            dest="hf_save_total_limit",
            type=int,
            default=None,
            help="huggingface: keep N",
        )
        a(
            "--gradient-accumulation-steps",
            dest="hf_gradient_accumulation_steps",
            type=int,
            default=None,
            help="huggingface: same as --gradient-accumulation",
        )
        a(
            "--early-stopping",
            dest="hf_early_stopping",
            action="store_true",
            default=False,
            help="huggingface",
        )
        a("--early-stopping-patience", dest="hf_early_stopping_patience", type=int, default=None)
        a("--early-stopping-threshold", dest="hf_early_stopping_threshold", type=float, default=None)
        a(
            "--wandb",
            dest="hf_wandb",
            action="store_true",
            default=False,
            help="huggingface: Weights & Biases",
        )
        a("--wandb-project", dest="hf_wandb_project", default=None, help="huggingface: W&B project")
        a("--deepspeed", dest="hf_deepspeed", type=Path, default=None, help="huggingface: ds_config.json")
        a(
            "--resume-from-checkpoint",
            dest="hf_resume_from_checkpoint",
            type=Path,
            default=None,
            help="huggingface: continue from <out_dir>/checkpoint-N",
        )
        a(
            "--hub-repo-id",
            dest="hf_hub_repo_id",
            default=None,
            help="huggingface: Hub repo (upload needs HF_HUB_TOKEN)",
        )
        a("--hub-private", dest="hf_hub_private", action="store_true", default=False, help="huggingface")

    def options_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        for key in ("fp16", "bf16"):
            if getattr(args, key, False):
                opts[key] = True
        for key in HF_OPTIONS:
            value = getattr(args, f"hf_{key}", None)
            if value is None or value is False:
                continue
            opts[key] = str(value) if isinstance(value, Path) else value
        return opts

    @staticmethod
    def _key(request: TrainRequest) -> str:
        return json.dumps(request.to_dict(), sort_keys=True, default=str)

    def validate(self, request: TrainRequest) -> None:
        from apt_model.training.loop import prepare, resolve_device

        if request.train.cuda_graphs != "auto":
            raise ConfigError(
                "huggingface backend: --cuda-graphs is the playground backend's (the Trainer runs the step); "
                "leave it at auto"
            )
        settings = resolve_settings(request)
        out_dir = Path(request.out_dir)
        opts = {k: v for k, v in request.options.items() if k in ("device", "pad")}
        if settings.resume_from_checkpoint is None and not request.options.get("overwrite", False):
            existing = _existing_run(out_dir)
            if existing:
                raise ConfigError(
                    f"{out_dir}: save dir already holds a run ({', '.join(existing[:3])}); resume it with "
                    "--resume-from-checkpoint, pick another dir, or pass overwrite"
                )
        # prepare() checks everything else; its own resume/existing-run logic is the Playground's (.pt files).
        sub = dataclasses.replace(
            request, train=settings.train, resume=None, options={**opts, "overwrite": True}
        )
        if settings.train.precision == "fp16" and resolve_device(opts.get("device")).type != "cuda":
            raise ConfigError("--fp16 needs a CUDA device (use --bf16 or fp32 on CPU)")
        prep = prepare(sub)
        if settings.early_stopping and not prep.val_examples:
            raise ConfigError(
                f"--early-stopping needs a validation split, but {request.dataset} has no val pairs"
            )
        resume_state = _check_resume(settings, prep) if settings.resume_from_checkpoint is not None else None
        self._prepared = (self._key(request), (settings, prep, resume_state))

    def train(self, request: TrainRequest) -> TrainResult:
        if self._prepared is None or self._prepared[0] != self._key(request):
            self.validate(request)
        assert self._prepared is not None
        settings, prep, resume_state = self._prepared[1]
        self._prepared = None
        return _Run(request, settings, prep, resume_state).fit()


# ------------------------------------------------------------------------------------------------- the run


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def upload_to_hub(folder: Path, repo_id: str, token: str, *, private: bool = False) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder``; returns the repo URL. Errors never carry the token."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload APT model (apt_model huggingface backend)",
        )
    except Exception as exc:
        msg = _redact(
            f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", token
        )
        raise RuntimeError(msg) from None
    return str(getattr(url, "url", url) or f"https://huggingface.co/{repo_id}")


class _Run:
    """One training run: builds the Trainer pieces and writes the outputs."""

    def __init__(
        self, request: TrainRequest, settings: HFSettings, prep: Any, resume_state: dict[str, Any] | None
    ):
        self.request = request
        self.s = settings
        self.cfg = settings.train
        self.prep = prep
        self.resume_state = resume_state
        self.out_dir = Path(request.out_dir)

    def fit(self) -> TrainResult:
        from transformers import EarlyStoppingCallback, TrainingArguments
        from transformers.integrations import TensorBoardCallback
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from apt_model.hf import APTConfig, APTForConditionalGeneration
        from apt_model.model import DBCDAC
        from apt_model.model.dropout import enable_dropout_schedule
        from apt_model.training.loop import _deterministic, seed_everything

        cfg, prep = self.cfg, self.prep
        seed_everything(cfg.seed)  # before the model is built: the same initial weights as the Playground
        model = APTForConditionalGeneration(APTConfig.from_model_config(prep.model_config))
        if cfg.dropout_epochs:
            enable_dropout_schedule(model)
        use_cpu = prep.device.type == "cpu"
        has_val = bool(prep.val_examples)
        report_to = ["tensorboard"] + (["wandb"] if self.s.wandb else [])
        ds = self.s.deepspeed is not None
        args = TrainingArguments(
            output_dir=str(self.out_dir),
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,  # the optimizer is build_optimizer's; these keep the Trainer's record true
            adam_beta2=cfg.adam_beta2,
            warmup_steps=cfg.warmup_steps,
            # Clipping happens after DBC-DAC in _StepCallback (the shared order); under DeepSpeed the engine clips.
            max_grad_norm=cfg.clip_grad_norm if ds else 0.0,
            num_train_epochs=cfg.epochs,
            logging_strategy="steps",
            logging_steps=cfg.log_every,
            eval_strategy="epoch" if has_val else "no",
            save_strategy="steps" if self.s.save_steps else "epoch",
            save_steps=self.s.save_steps or 500,
            save_total_limit=self.s.save_total_limit,
            load_best_model_at_end=self.s.early_stopping,
            metric_for_best_model="eval_loss" if self.s.early_stopping else None,
            greater_is_better=False if self.s.early_stopping else None,
            report_to=report_to,
            run_name=self.out_dir.name,
            fp16=prep.precision == "fp16",
            bf16=prep.precision == "bf16",
            use_cpu=use_cpu,
            seed=cfg.seed,
            remove_unused_columns=False,
            dataloader_pin_memory=not use_cpu,
            disable_tqdm=not bool(self.request.options.get("progress", True)),
            deepspeed=str(self.s.deepspeed) if ds else None,
            ddp_backend="gloo" if use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
            label_names=["labels"],
        )
        callbacks: list[Any] = []
        if self.s.early_stopping:
            callbacks.append(EarlyStoppingCallback(self.s.patience, self.s.threshold))
        self.trainer = trainer = _AptTrainer(
            model=model,
            args=args,
            train_dataset=prep.train_examples,
            eval_dataset=prep.val_examples if has_val else None,  # evaluate() reads the Batcher's batches
            callbacks=callbacks,
            apt_run=self,
        )
        for cb in list(trainer.callback_handler.callbacks):
            if isinstance(cb, TensorBoardCallback):
                cb.logging_dir = str(self.out_dir / LOGS_DIR)
            if isinstance(cb, PrinterCallback | ProgressCallback):
                # Both print every log dict on stdout, where `apt train` prints its JSON manifest; the epoch
                # lines go to the logger instead, and the bar (stderr) is kept without the dicts.
                trainer.remove_callback(cb)
        if self.request.options.get("progress", True):
            trainer.add_callback(_quiet_progress())
        self.is_main = trainer.is_world_process_zero()
        if ds:
            # DeepSpeed cannot broadcast the 0-dim tau parameters as is; the DeepSpeed backend's fix applies.
            from apt_model.backends.deepspeed_worker import _patch_zero_dim_broadcast

            _patch_zero_dim_broadcast()
        self.dbc = DBCDAC(cfg.dbc_dac, seed=cfg.seed) if cfg.dbc_dac.enabled and not ds else None
        self.reporter = _Reporter(self)
        trainer.add_callback(self.reporter)
        if self.resume_state is not None:
            self.reporter.restore(self.resume_state)
        env = _wandb_env(self.s, self.out_dir) if self.s.wandb else {}
        with _patched_env(env), _deterministic(cfg.deterministic, prep.device):
            if self.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            self.reporter.start()
            try:
                trainer.train(
                    resume_from_checkpoint=str(self.s.resume_from_checkpoint)
                    if self.s.resume_from_checkpoint
                    else None
                )
            except BaseException as exc:
                self.reporter.fail(exc)
                raise
        return self._finish()

    # -- end of the run ---------------------------------------------------------------------------------------
    def _finish(self) -> TrainResult:
        from apt_model.checkpoint import FINAL_CHECKPOINT, FINAL_EXPORT, save_checkpoint
        from apt_model.hf import save_hf
        from apt_model.io import atomic_write_json, sha256_file
        from apt_model.training.loop import RESULT_FILE, checkpoint_state

        out, trainer, rep = self.out_dir, self.trainer, self.reporter
        native = trainer.model.model  # the best model when early stopping loaded it at the end
        final_ckpt, export_dir = out / FINAL_CHECKPOINT, out / FINAL_EXPORT
        rep.flush_pending()
        extra_configs = {"train_config": self.cfg.to_dict(), "data_config": self.request.data.to_dict()}
        hub: dict[str, Any] = {}
        rep.finalize(final_ckpt, export_dir)  # every rank: each returns the same manifest
        if self.is_main:
            state = checkpoint_state(
                model=native,
                model_config=self.prep.model_config,
                request=dataclasses.replace(self.request, train=self.cfg),
                tokenizer=self.prep.tokenizer,
                optimizer=None,  # the Trainer's checkpoint-N/ holds the optimizer; this file is for loading
                schedule=None,
                scaler=None,
                epoch=len(rep.report.epochs),
                global_step=trainer.state.global_step,
                history=rep.history(),
                dataset_sha256=self.prep.dataset_sha256,
                extra={"backend": NAME},
            )
            save_checkpoint(final_ckpt, state)
            save_hf(
                export_dir, native, self.prep.model_config, self.prep.tokenizer, extra_configs=extra_configs
            )
            rep.report.write(rep.path)
            rep.tracker.log_artifact(rep.path)
            rep.tracker.log_artifact(export_dir, artifact_path=FINAL_EXPORT)
            rep.tracker.end("FINISHED")
            hub = self._upload(export_dir)
        if trainer.args.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank returns a manifest that points at finished files
        sha = {}
        if final_ckpt.is_file():
            sha[FINAL_CHECKPOINT] = sha256_file(final_ckpt)
        if export_dir.is_dir():
            sha.update(
                {
                    f"{FINAL_EXPORT}/{p.name}": sha256_file(p)
                    for p in sorted(export_dir.iterdir())
                    if p.is_file()
                }
            )
        final = rep.report.final
        metrics = {
            k: float(v)
            for k, v in final.items()
            if k in ("train_loss", "val_loss", "val_token_acc", "best_val_loss", "train_seconds")
            and isinstance(v, int | float)
            and not isinstance(v, bool)
        }
        ckpts = sorted(
            (p for p in out.glob("checkpoint-*") if CHECKPOINT_DIR_RE.match(p.name) and p.is_dir()),
            key=lambda p: int(p.name.split("-")[1]),
        )
        result = TrainResult(
            backend=NAME,
            out_dir=str(out),
            final_model=str(final_ckpt),
            export_dir=str(export_dir),
            report=str(rep.path),
            last_checkpoint=str(ckpts[-1]) if ckpts else str(final_ckpt),
            epochs_completed=len(rep.report.epochs),
            global_step=int(trainer.state.global_step),
            metrics=metrics,
            sha256=sha,
            mlflow_run_id=rep.tracker.run_id,
            extra={
                "device": str(trainer.args.device),
                "precision": self.prep.precision,
                "world_size": trainer.args.world_size,
                "deepspeed": str(self.s.deepspeed) if self.s.deepspeed else None,
                "early_stopped": len(rep.report.epochs) < self.cfg.epochs,
                "best_model_checkpoint": trainer.state.best_model_checkpoint,
                "logs_dir": str(out / LOGS_DIR),
                "dataset_sha256": self.prep.dataset_sha256,
                "tracking_uri": rep.tracker.uri,
                "tracking_error": rep.tracker.error,
                **hub,
            },
        )
        if self.is_main:
            atomic_write_json(out / RESULT_FILE, result.to_dict())
        return result

    def _upload(self, export_dir: Path) -> dict[str, Any]:
        token = os.environ.get(HUB_TOKEN_ENV)
        if not token:
            if self.s.hub_repo_id:
                log.info("--hub-repo-id given but %s is not set: no Hub upload", HUB_TOKEN_ENV)
            return {}
        repo_id = self.s.hub_repo_id or f"apt-{self.out_dir.name}"
        try:
            url = upload_to_hub(export_dir, repo_id, token, private=self.s.hub_private)
        except RuntimeError as exc:
            log.warning(
                "Hub upload to %s failed (%s); the model is saved locally in %s", repo_id, exc, export_dir
            )
            return {"hub_repo_id": repo_id, "hub_error": str(exc)}
        log.info("uploaded %s to the Hugging Face Hub: %s", export_dir, url)
        return {"hub_repo_id": repo_id, "hub_url": url}


def _wandb_env(s: HFSettings, out_dir: Path) -> dict[str, str]:
    env = {"WANDB_PROJECT": s.wandb_project, "WANDB_DIR": str(out_dir)}
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        env["WANDB_MODE"] = "offline"  # no key: log locally (wandb sync later) instead of prompting
    return env


@contextlib.contextmanager
def _patched_env(values: dict[str, str]) -> Any:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------- Trainer


def _make_trainer_class() -> type:
    """The Trainer subclass (built lazily so that importing this module does not import transformers)."""
    import torch
    from transformers import Trainer

    from apt_model.training.batching import Batch, Batcher
    from apt_model.training.loop import compute_loss, evaluate
    from apt_model.training.schedule import WarmRestartSchedule, build_optimizer

    class LogitsView(torch.nn.Module):
        """``model(src, tgt_in) -> logits`` over the (possibly wrapped) HF model, as ``seq2seq_loss`` calls it."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=src, decoder_input_ids=tgt_in).logits

    class EpochBatchSampler:
        """The ``Batcher``'s batches of the current epoch (``set_epoch``), this rank's share when distributed."""

        def __init__(self, batcher: Batcher, rank: int, world: int) -> None:
            self.batcher, self.rank, self.world, self.epoch = batcher, rank, world, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def _usable(self) -> int:
            n = len(self.batcher)
            return n - n % self.world  # equal counts per rank, or the ranks' step counts would diverge

        def __len__(self) -> int:
            return self._usable() // self.world

        def __iter__(self) -> Any:
            batches = self.batcher.epoch_indices(self.epoch)[: self._usable()]
            return iter(batches[self.rank :: self.world])

    class StepSchedule:
        """``WarmRestartSchedule`` behind the LR-scheduler interface the Trainer steps after each update."""

        def __init__(self, schedule: WarmRestartSchedule) -> None:
            self.schedule = schedule
            self.step_count = 0
            schedule.set_step(0)

        def step(self) -> None:
            self.step_count += 1
            self.schedule.set_step(self.step_count)

        def get_last_lr(self) -> list[float]:
            return [float(g["lr"]) for g in self.schedule.optimizer.param_groups]

        def state_dict(self) -> dict[str, Any]:
            return {"step_count": self.step_count, **self.schedule.state_dict()}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.schedule.load_state_dict(state)
            self.step_count = int(state["step_count"])
            self.schedule.set_step(self.step_count)

    class AptTrainer(Trainer):
        loss_is_scaled_for_ga = (
            True  # compute_loss weights each micro-batch by its share of the window's tokens
        )

        def __init__(self, *args: Any, apt_run: _Run, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.apt_run = apt_run
            prep, cfg = apt_run.prep, apt_run.cfg
            common = dict(
                pad_id=prep.model_config.pad_id,
                bos_id=prep.tokenizer.bos_id,
                eos_id=prep.tokenizer.eos_id,
                max_src_len=apt_run.request.data.max_src_len,
                max_tgt_len=apt_run.request.data.max_tgt_len,
                pad_mode=prep.pad_mode,
            )
            self.apt_batcher = Batcher(prep.train_examples, cfg.batch_size, seed=cfg.seed, **common)
            self.apt_eval_batches = Batcher(
                prep.val_examples, cfg.batch_size, seed=cfg.seed, **common
            ).eval_batches()
            world = self.args.world_size
            if len(self.apt_batcher) < world:
                raise ConfigError(
                    f"{len(self.apt_batcher)} training batch(es) cannot feed {world} processes; "
                    "lower batch_size or use fewer processes"
                )
            self.apt_sampler = EpochBatchSampler(self.apt_batcher, self.args.process_index, world)
            self.steps_per_epoch = -(-len(self.apt_sampler) // cfg.grad_accum)
            self.window_loss = torch.zeros((), dtype=torch.float32)
            self.window_tokens = 0
            self.apt_optimizer: torch.optim.Optimizer | None = None

        # -- data ----------------------------------------------------------------------------------------------
        def _collate(self, rows: list[int]) -> dict[str, Any]:
            b: Batch = self.apt_batcher.collate_indices(rows)
            return {
                "input_ids": b.src,
                "decoder_input_ids": b.tgt_in,
                "labels": b.tgt_out,
                "n_tokens": b.n_tokens,
            }

        def get_train_dataloader(self) -> Any:
            loader = torch.utils.data.DataLoader(
                # Indices, not examples: each batch is cut from the batcher's padded table (collate_indices).
                range(len(self.apt_batcher.examples)),
                batch_sampler=self.apt_sampler,
                collate_fn=self._collate,
                num_workers=0,
            )
            loader.set_epoch = self.apt_sampler.set_epoch  # type: ignore[attr-defined]
            return loader

        def get_batch_samples(
            self, epoch_iterator: Any, num_batches: int, device: Any
        ) -> tuple[list[Any], int]:
            samples = []
            for _ in range(num_batches):
                try:
                    samples.append(next(epoch_iterator))
                except StopIteration:
                    break
            return samples, sum(int(s["n_tokens"]) for s in samples)

        # -- objective -------------------------------------------------------------------------------------------
        def compute_loss(
            self,
            model: torch.nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            batch = Batch(
                inputs["input_ids"], inputs["decoder_input_ids"], inputs["labels"], int(inputs["n_tokens"])
            )
            out = compute_loss(
                LogitsView(model),
                batch,
                pad_id=self.apt_run.prep.model_config.pad_id,
                label_smoothing=self.apt_run.cfg.label_smoothing,
            )
            window = int(num_items_in_batch) if num_items_in_batch else batch.n_tokens
            weight = batch.n_tokens / max(window, 1)
            if model.training:
                detached = out.loss.detach().float() * weight
                self.window_loss = self.window_loss.to(detached.device) + detached
                self.window_tokens = window
            loss = out.loss * weight
            return (loss, out) if return_outputs else loss

        def create_optimizer(self, model: Any = None) -> Any:
            if self.optimizer is None:
                self.apt_optimizer = build_optimizer(
                    self.model, self.apt_run.cfg, fused=self.apt_run.prep.device.type == "cuda"
                )
                self.optimizer = self.apt_optimizer
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                opt = self.apt_optimizer or self.create_optimizer()
                self.lr_scheduler = StepSchedule(
                    WarmRestartSchedule(opt, self.apt_run.cfg, self.steps_per_epoch)
                )
            return self.lr_scheduler

        # -- evaluation ------------------------------------------------------------------------------------------
        def evaluate(
            self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
        ) -> dict[str, float]:
            run = self.apt_run
            val = evaluate(
                LogitsView(self.model),
                self.apt_eval_batches,
                pad_id=run.prep.model_config.pad_id,
                device=self.args.device,
                precision=run.prep.precision,
            )
            metrics = {
                f"{metric_key_prefix}_loss": float(val["val_loss"])
                if val["val_loss"] is not None
                else float("nan"),
                f"{metric_key_prefix}_token_acc": float(val["val_token_acc"] or 0.0),
            }
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

        # -- checkpoints -----------------------------------------------------------------------------------------
        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            super()._save_checkpoint(model, trial)
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            if self.is_world_process_zero() and folder.is_dir():
                self.apt_run.reporter.checkpoint_saved(folder)

    return AptTrainer


_TRAINER_CLASS: type | None = None


def _AptTrainer(**kwargs: Any) -> Any:
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        _TRAINER_CLASS = _make_trainer_class()
    return _TRAINER_CLASS(**kwargs)


# ------------------------------------------------------------------------------------------------- callbacks


def _quiet_progress() -> Any:
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            return None

    return QuietProgress()


def _make_reporter_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class _Reporter:
    """Per-step DBC-DAC/clipping/NaN policy and the experiment report, as a ``TrainerCallback``.

    Built as a plain class whose instances are accepted by the Trainer's callback handler (it calls the ``on_*``
    methods by name; those not defined here come from ``TrainerCallback`` via ``__getattr__``).
    """

    def __init__(self, run: _Run) -> None:
        from apt_model.training.report import REPORT_FILE, ExperimentReport
        from apt_model.training.tracking import Tracker, resolve_tracking_uri

        self.run = run
        self.trainer = run.trainer
        self.cfg = run.cfg
        self._base = _make_reporter_base()()
        self.path = run.out_dir / REPORT_FILE
        prep = run.prep
        schedule = self._describe_schedule()
        self.report = ExperimentReport.for_run(
            NAME,
            prep,
            run.request,
            self.cfg,
            schedule=schedule,
            runtime={
                "device": str(self.trainer.args.device),
                "precision": prep.precision,
                "compiled": False,
                "pad_mode": prep.pad_mode,
                "steps_per_epoch": self.trainer.steps_per_epoch,
                "n_parameters": sum(p.numel() for p in self.trainer.model.parameters()),
                "world_size": self.trainer.args.world_size,
                "deepspeed": str(run.s.deepspeed) if run.s.deepspeed else None,
                "worked_steps": prep.steps.describe() if prep.steps is not None else None,
                "resumed_from": [],
            },
        )
        uri = resolve_tracking_uri(run.request.tracking_uri, run.out_dir) if run.is_main else None
        self.tracker = Tracker(uri, run.request.experiment, run_name=run.out_dir.name)
        self.train_seconds = 0.0
        self.last_lr = float(self.cfg.lr)
        self._resume_run_id: str | None = None
        self._reset_epoch()
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self.pending: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return getattr(self._base, name)
        raise AttributeError(name)

    def _describe_schedule(self) -> dict[str, Any]:
        from apt_model.training.schedule import SCHEDULE_KIND, STEPPING, restart_epochs

        c = self.cfg
        return {
            "kind": SCHEDULE_KIND,
            "base_lr": c.lr,
            "min_lr": c.min_lr,
            "t0": c.t0,
            "t_mult": c.t_mult,
            "warmup_steps": c.warmup_steps,
            "stepping": STEPPING,
            "steps_per_epoch": self.trainer.steps_per_epoch,
            "restart_epochs": restart_epochs(c.t0, c.t_mult, c.epochs),
        }

    def _reset_epoch(self) -> None:
        self.loss_sum = 0.0
        self.tokens = 0
        self.grad_norms: list[float] = []
        self.skipped = 0
        self.t0 = time.perf_counter()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def restore(self, state: dict[str, Any]) -> None:
        history = state.get("history") or {}
        self.report.restore_history(history)
        self.train_seconds = float(history.get("train_seconds", 0.0))
        self.report.runtime["resumed_from"].append(
            {"path": str(self.run.s.resume_from_checkpoint), "epoch": len(self.report.epochs)}
        )
        if self.run.dbc is not None and state.get("dbc_dac"):
            self.run.dbc.load_state_dict(_dbc_from_json(state["dbc_dac"]))
        self._resume_run_id = (state.get("tracking") or {}).get("run_id") or None

    def start(self) -> None:
        from apt_model.training.tracking import flatten_params

        if not self.run.is_main:
            return
        self.report.write(self.path)
        params = {
            **flatten_params("model", self.run.prep.model_config.to_dict()),
            **flatten_params("train", self.cfg.to_dict()),
            **flatten_params("data", self.run.request.data.to_dict()),
        }
        tags = {
            "backend": NAME,
            "dataset_sha256": self.run.prep.dataset_sha256,
            "out_dir": str(self.run.out_dir),
        }
        self.tracker.start(params, tags, resume_run_id=self._resume_run_id)

    def history(self) -> dict[str, Any]:
        h = self.report.history()
        h["train_seconds"] = self.train_seconds
        return h

    # -- the optimizer step ----------------------------------------------------------------------------------
    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._reset_epoch()
        if self.cfg.dropout_epochs:
            from apt_model.model.dropout import set_dropout_on

            # state.epoch counts the epochs done (fractional after a mid-epoch resume): its floor is this one's index.
            set_dropout_on(self.trainer.model, self.cfg.dropout_on(int(state.epoch or 0)))
        steps = self.run.prep.steps
        if steps is not None:
            # Before the epoch's first batch is collated: the sampler hands out row indices, and the collator cuts
            # each batch from the batcher's table when the Trainer asks for it.
            steps.apply(self.trainer.apt_batcher, int(state.epoch or 0))
        return control

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        import torch

        trainer = self.trainer
        step = int(state.global_step)  # updates done so far; this one is step + 1
        loss = float(trainer.window_loss.item())
        n_window = int(trainer.window_tokens)
        trainer.window_loss = torch.zeros((), dtype=torch.float32, device=trainer.window_loss.device)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        if trainer.lr_scheduler is not None:
            self.last_lr = trainer.lr_scheduler.get_last_lr()[0]  # the rate this update uses
        if not math.isfinite(loss):
            self._nan(loss, None, params, step)
            return control
        if self.run.s.deepspeed is None:
            trainer.accelerator.unscale_gradients()  # fp16: DBC-DAC and clipping see true gradients
            if self.run.dbc is not None:
                self.run.dbc.step(params, step + 1)
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm).item())
            if not math.isfinite(norm) and args.fp16 is False:
                self._nan(loss, norm, params, step)
                return control
            if math.isfinite(norm):
                self.grad_norms.append(norm)
        self.step_loss = loss
        self.loss_sum += loss * max(n_window, 1)
        self.tokens += max(n_window, 1)
        if (step + 1) % self.cfg.log_every == 0:
            self.report.batch_losses.append([step + 1, loss])
        return control

    def _nan(self, loss: float, grad_norm: float | None, params: list[Any], step: int) -> None:
        from apt_model.training.loop import TrainingDivergedError
        from apt_model.training.report import json_float

        epoch = int(self.trainer.state.epoch or 0) + 1
        action = self.cfg.nan_policy
        self.report.nan_events.append(
            {
                "epoch": epoch,
                "global_step": step + 1,
                "loss": json_float(loss),
                "grad_norm": json_float(grad_norm),
                "action": action,
            }
        )
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if action == "stop":
            raise TrainingDivergedError(
                f"non-finite {what} at optimizer step {step + 1} (epoch {epoch}); "
                "lower the learning rate, use fp32/bf16, or set nan_policy=skip"
            )
        # AdamW skips parameters without a gradient: the update (and its weight decay) is dropped, the step counts.
        for p in params:
            p.grad = None
        self.skipped += 1
        log.warning("non-finite %s at step %d: update skipped", what, step + 1)

    # -- epochs, evaluation, checkpoints ---------------------------------------------------------------------
    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        epoch = round(float(state.epoch or 0))
        last = epoch >= self.cfg.epochs
        if args.eval_strategy != "no":
            control.should_evaluate = epoch % self.cfg.eval_every == 0 or last
        if self.run.s.save_steps is None:
            # Epoch checkpoints every save_interval epochs — every evaluation when the best must be kept.
            due = (
                control.should_evaluate if self.run.s.early_stopping else epoch % self.cfg.save_interval == 0
            )
            control.should_save = bool(due)
        seconds = time.perf_counter() - self.t0
        self.train_seconds += seconds
        row = {
            "epoch": epoch,
            "train_loss": self.loss_sum / self.tokens if self.tokens else None,
            "val_loss": None,
            "val_token_acc": None,
            "lr": float(self.last_lr),
            "grad_norm": sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else None,
            "tokens_per_s": self.tokens / seconds if seconds > 0 else 0.0,
            "epoch_seconds": seconds,
            "global_step": int(state.global_step),
            "skipped_steps": self.skipped,
        }
        if self.last_eval is not None and self.last_eval[0] == state.global_step:
            self._fill_val(row, self.last_eval[1])
            self._commit(row)
        elif control.should_evaluate:
            self.pending = row  # the Trainer evaluates right after this callback
        else:
            self._commit(row)
        return control

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float], **kwargs: Any
    ) -> Any:
        self.last_eval = (int(state.global_step), dict(metrics))
        if self.pending is not None:
            row, self.pending = self.pending, None
            self._fill_val(row, metrics)
            self._commit(row)
        return control

    @staticmethod
    def _fill_val(row: dict[str, Any], metrics: dict[str, float]) -> None:
        loss = metrics.get("eval_loss")
        row["val_loss"] = float(loss) if loss is not None and math.isfinite(loss) else None
        row["val_token_acc"] = metrics.get("eval_token_acc") if row["val_loss"] is not None else None

    def flush_pending(self) -> None:
        if self.pending is not None:
            row, self.pending = self.pending, None
            self._commit(row)

    def _commit(self, row: dict[str, Any]) -> None:
        from apt_model.training.loop import emit_epoch
        from apt_model.training.report import json_float

        self.report.add_epoch({**row, "train_loss": json_float(row["train_loss"])})
        if not self.run.is_main:
            return
        self.report.write(self.path)
        emit_epoch(row, epochs=self.cfg.epochs, tracker=self.tracker, on_epoch=self.run.request.on_epoch)

    def checkpoint_saved(self, folder: Path) -> None:
        from apt_model.io import atomic_write_json, sha256_file

        weights = folder / "model.safetensors"
        self.report.checkpoints.append(
            {
                "epoch": len(self.report.epochs),
                "global_step": int(self.trainer.state.global_step),
                "path": str(folder),
                "sha256": sha256_file(weights) if weights.is_file() else "",
            }
        )
        state = {
            "backend": NAME,
            "dataset_sha256": self.run.prep.dataset_sha256,
            "history": self.history(),
            "dbc_dac": _dbc_to_json(self.run.dbc.state_dict()) if self.run.dbc is not None else None,
            "tracking": {"uri": self.tracker.uri or "", "run_id": self.tracker.run_id or ""},
        }
        atomic_write_json(folder / APT_STATE, state)
        self.report.write(self.path)

    def finalize(self, final_ckpt: Path, export_dir: Path) -> None:
        self.report.finish(
            epochs_completed=len(self.report.epochs),
            global_step=int(self.trainer.state.global_step),
            dbc_dac=self.run.dbc.summary() if self.run.dbc is not None else None,
            train_seconds=self.train_seconds,
            final_model=str(final_ckpt),
            export_dir=str(export_dir),
        )

    def fail(self, exc: BaseException) -> None:
        if not self.run.is_main:
            return
        self.report.status = "failed"
        msg = f"{exc.__class__.__name__}: {exc}".splitlines()[0][:500]
        self.report.final = {"error": msg, "global_step": int(self.trainer.state.global_step)}
        with contextlib.suppress(Exception):
            self.report.write(self.path)
        self.tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")


def _dbc_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """DBC-DAC generator states (uint8 tensors) as lists, so apt_state.json stays JSON."""
    return {
        **state,
        "generator_states": {k: v.tolist() for k, v in state.get("generator_states", {}).items()},
    }


def _dbc_from_json(state: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {
        **state,
        "generator_states": {
            k: torch.tensor(v, dtype=torch.uint8) for k, v in (state.get("generator_states") or {}).items()
        },
    }
