"""The training semantics every backend shares: objective, schedule, accumulation, clipping, DBC-DAC,
evaluation, NaN policy, checkpoints, report and tracking. The Playground backend *is* this loop; the DeepSpeed
and Hugging Face backends reuse its pieces (``prepare``, ``compute_loss``, ``evaluate``, ``build_optimizer`` /
``WarmRestartSchedule``, ``ExperimentReport``, ``checkpoint_state``) so that their runs are comparable.

One optimizer step:
  1. the micro-batches of an accumulation window (``grad_accum`` batches; the epoch's last, shorter window is
     stepped too) are run under autocast; each micro-batch's mean CE is scaled by ``n_tokens / window_tokens``,
     so the accumulated gradient is that of the token-weighted mean over the whole window;
  2. the learning rate is set from the global step (cosine warm restarts stepped **per optimizer step** with a
     fractional epoch, plus optional linear warmup — see ``schedule.py``);
  3. a non-finite window loss (or, without a loss scaler, a non-finite gradient norm) triggers ``nan_policy``:
     ``"stop"`` writes the report (status ``failed``, the event recorded) and raises ``TrainingDivergedError``
     naming the step; ``"skip"`` drops the update (the step still counts, so the schedule stays aligned) and
     counts it in the report. A step's outcome is read once the next step is launched: under the whole-step CUDA
     graphs the bad update is withheld on the device, and the policy reacts one step later;
  4. fp16 gradients are unscaled; DBC-DAC runs once on the accumulated gradient (``DBCDAC.step`` decides on its
     cadence); the global gradient norm is clipped to ``clip_grad_norm`` (1.0); AdamW steps.

Precision: ``auto`` is bf16 autocast on CUDA devices that support it, fp16 autocast + ``GradScaler`` on other CUDA
devices, fp32 on CPU; ``bf16`` on CPU uses CPU autocast; ``fp16`` needs CUDA. ``compile``: ``auto`` compiles the
model with ``torch.compile(dynamic=False)`` on CUDA only and then pads every batch to one fixed shape
``(max_src_len, max_tgt_len)`` so the graph is reused; ``on`` compiles on any device; ``off`` never.

Determinism and resume: python ``random``, numpy and torch are seeded from ``TrainConfig.seed`` before the model is
built; batch order is a pure function of ``(seed, epoch)``; checkpoints (written at epoch ends) carry the model,
optimizer, scheduler, scaler and RNG states, so a run resumed from epoch ``k`` produces the same per-step losses as
an uninterrupted one (bit-for-bit on CPU with ``deterministic``). When resuming, the model config comes from the
checkpoint: a request whose model config differs is refused (``CheckpointError``), as is a different dataset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apt_model.backends import TrainRequest, TrainResult
from apt_model.checkpoint import (
    FINAL_CHECKPOINT,
    FINAL_EXPORT,
    checkpoint_model_config,
    export_pretrained,
    load_checkpoint,
    save_checkpoint,
)
from apt_model.config import ModelConfig
from apt_model.errors import AptError, CheckpointError, ConfigError, DataError
from apt_model.io import atomic_write_json, remove_stale_temps, sha256_file
from apt_model.model.dropout import enable_dropout_schedule, set_dropout_on
from apt_model.training import prewarm
from apt_model.training.batching import PAD_MODES, Batch, Batcher, build_tokenizer, encode_pairs
from apt_model.training.curriculum import StepsCurriculum
from apt_model.training.fastpath import PendingStep, TrainStep, compile_seconds
from apt_model.training.report import REPORT_FILE, ExperimentReport, json_float
from apt_model.training.schedule import WarmRestartSchedule, build_optimizer
from apt_model.training.tracking import METRIC_KEYS, Tracker, flatten_params, resolve_tracking_uri

log = logging.getLogger("apt_model.training")

RESULT_FILE = "train_result.json"
CHECKPOINT_PATTERN = "checkpoint_epoch_{epoch}.pt"
# Files a run writes atomically into its save dir (the CLI adds train_result.json after the run).
RUN_OUTPUTS = (REPORT_FILE, "checkpoint_epoch_*.pt", FINAL_CHECKPOINT, FINAL_EXPORT, RESULT_FILE)


class TrainingDivergedError(AptError):
    """The loss (or gradient) became NaN/Inf and ``nan_policy`` is ``"stop"``."""


# --------------------------------------------------------------------------------------------------- preparation


# Launches of a run's first epoch whose durations the report keeps (compile, the graphs' warm-up and capture).
FIRST_LAUNCHES_TIMED = 8


@dataclass
class Prepared:
    """Everything validated and loaded before any file is written."""

    dataset: Any  # HLBDDataset
    dataset_sha256: str
    tokenizer: Any  # AptTokenizer
    model_config: ModelConfig  # the effective config (vocab_size = the tokenizer's)
    train_examples: list[Any]
    val_examples: list[Any]
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    compiled: bool
    pad_mode: str
    cuda_graphs: str  # step | loss | off (what the compiled step replays from CUDA graphs)
    transform_kernel: str  # what runs the autopoietic transform: triton | torch
    resume_state: dict[str, Any] | None = None
    start_epoch: int = 0
    steps: StepsCurriculum | None = None  # the worked-steps curriculum, when TrainConfig asks for it
    seconds: float = 0.0  # what prepare() took (reading, tokenizing and encoding the data)


def resolve_transform_kernel(option: str, device: torch.device) -> str:
    """Select the autopoietic transform's implementation for this process; returns ``triton`` or ``torch``."""
    from apt_model.model.fused_transform import set_transform_kernel, triton_available

    fused_possible = device.type == "cuda" and triton_available()
    if option == "triton" and not fused_possible:
        raise ConfigError(
            f"TrainConfig.transform_kernel='triton' needs a CUDA device and Triton (device {device}); "
            "use auto or torch"
        )
    set_transform_kernel(option)
    return "triton" if option != "torch" and fused_possible else "torch"


def resolve_cuda_graphs(option: str, device: torch.device, compiled: bool, precision: str) -> str:
    """What the step replays from CUDA graphs: ``step``, ``loss`` or ``off`` (see ``training/fastpath.py``)."""
    graphable = compiled and device.type == "cuda"
    if option in ("step", "loss") and not graphable:
        raise ConfigError(
            f"TrainConfig.cuda_graphs={option!r} needs the compiled step on a CUDA device (device {device}, "
            f"compile {'on' if compiled else 'off'}); use auto or off"
        )
    if option == "step" and precision == "fp16":
        raise ConfigError(
            "TrainConfig.cuda_graphs='step' cannot run fp16's loss scaler inside the graphs; use bf16, fp32 or "
            "cuda_graphs=loss"
        )
    if option == "auto":
        return ("loss" if precision == "fp16" else "step") if graphable else "off"
    return option


def resolve_device(option: str | None) -> torch.device:
    name = (option or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {option!r} requested but CUDA is not available")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {option!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device must be auto, cpu or cuda[:N] (got {option!r})")


def resolve_precision(requested: str, device: torch.device) -> str:
    if device.type == "cuda":
        if requested == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                "TrainConfig.precision: bf16 is not supported on this CUDA device; use fp16 or auto"
            )
        return requested
    if requested == "fp16":
        raise ConfigError("TrainConfig.precision: fp16 needs a CUDA device (use auto, fp32 or bf16 on CPU)")
    return "fp32" if requested == "auto" else requested


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _run_exists(out_dir: Path) -> list[str]:
    if not out_dir.is_dir():
        return []
    found = [p.name for p in (out_dir / REPORT_FILE, out_dir / FINAL_CHECKPOINT) if p.exists()]
    found += sorted(p.name for p in out_dir.glob("checkpoint_epoch_*.pt"))
    return found


def verify_recorded_sha256(checkpoint: Path) -> None:
    """Refuse a checkpoint whose content differs from the sha256 its run recorded when writing it.

    torch does not checksum tensor data, so a flipped bit would otherwise load silently. The record is the
    ``checkpoints`` list of the ``experiment_report.json`` beside it; a checkpoint without a record (copied
    elsewhere, or from another tool) is not refused.
    """
    report_path = checkpoint.parent / REPORT_FILE
    if not checkpoint.is_file() or not report_path.is_file():
        return
    try:
        entries = json.loads(report_path.read_text(encoding="utf-8")).get("checkpoints") or []
    except (OSError, ValueError, AttributeError):
        return  # an unreadable report is diagnose's business; the checkpoint's own checks still run
    recorded = [
        e.get("sha256")
        for e in entries
        if isinstance(e, dict) and e.get("sha256") and Path(str(e.get("path", ""))).name == checkpoint.name
    ]
    if recorded and sha256_file(checkpoint) != recorded[-1]:
        raise CheckpointError(
            f"{checkpoint}: content does not match the sha256 recorded in {report_path.name} "
            f"({recorded[-1][:12]}…); the file is corrupted — resume from an earlier checkpoint"
        )


def prepare(request: TrainRequest) -> Prepared:
    """Validate the request and load data/tokenizer/checkpoint. Raises ``AptError`` (one line); writes nothing."""
    from apt_model.data import load_dataset

    started = time.perf_counter()
    opts = request.options
    out_dir = Path(request.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: save dir exists and is not a directory")
    dataset_path = Path(request.dataset)
    if not dataset_path.is_file():
        raise DataError(f"{dataset_path}: dataset file not found")
    for name in ("max_src_len", "max_tgt_len"):
        value = getattr(request.data, name)
        if value > request.model.max_len:
            raise ConfigError(
                f"DataConfig.{name}={value} exceeds ModelConfig.max_len={request.model.max_len} "
                "(raise the model's max_len or shorten the data)"
            )
    device = resolve_device(opts.get("device"))
    precision = resolve_precision(request.train.precision, device)
    compile_opt = request.train.compile
    compiled = compile_opt == "on" or (compile_opt == "auto" and device.type == "cuda")
    pad_mode = opts.get("pad") or ("fixed" if compiled else "bucket")
    if pad_mode not in PAD_MODES:
        raise ConfigError(f"option pad must be one of {', '.join(PAD_MODES)} (got {pad_mode!r})")
    transform_kernel = resolve_transform_kernel(request.train.transform_kernel, device)
    cuda_graphs = resolve_cuda_graphs(request.train.cuda_graphs, device, compiled, precision)

    resume_state = None
    start_epoch = 0
    if request.resume is not None:
        verify_recorded_sha256(Path(request.resume))
        resume_state = load_checkpoint(request.resume)
        for key in ("optimizer_state", "scheduler_state", "epoch", "global_step", "rng"):
            if key not in resume_state:
                raise CheckpointError(
                    f"{request.resume}: holds no training state ({key} missing); cannot resume"
                )
        start_epoch = int(resume_state["epoch"])
        if request.train.epochs < start_epoch:
            raise ConfigError(
                f"TrainConfig.epochs={request.train.epochs} is below the checkpoint's epoch {start_epoch} "
                f"({request.resume})"
            )
    elif not opts.get("overwrite", False):
        existing = _run_exists(out_dir)
        if existing:
            raise ConfigError(
                f"{out_dir}: save dir already holds a run ({', '.join(existing[:3])}); "
                "resume it, pick another dir, or pass overwrite"
            )

    dataset = load_dataset(dataset_path)
    if not dataset.train:
        raise DataError(f"{dataset_path}: dataset has no training pairs")
    dataset_sha = dataset.sha256 or sha256_file(dataset_path)

    if resume_state is not None:
        ckpt_config = checkpoint_model_config(resume_state, request.resume)
        requested = request.model.replace(vocab_size=ckpt_config.vocab_size)
        diff = _config_diff(requested.to_dict(), ckpt_config.to_dict())
        if diff:
            raise CheckpointError(
                f"{request.resume}: checkpoint model config differs from the requested one ({'; '.join(diff[:4])}); "
                "when resuming, the model config comes from the checkpoint"
            )
        if resume_state.get("dataset_sha256") and resume_state["dataset_sha256"] != dataset_sha:
            raise CheckpointError(
                f"{request.resume}: checkpoint was trained on dataset sha256 {resume_state['dataset_sha256'][:12]}…, "
                f"but {dataset_path} has {dataset_sha[:12]}…"
            )
        from apt_model.checkpoint import _tokenizer_from_json

        tokenizer = _tokenizer_from_json(resume_state["tokenizer_json"], request.resume)
        if tokenizer.vocab_size != ckpt_config.vocab_size:
            raise CheckpointError(
                f"{request.resume}: tokenizer has {tokenizer.vocab_size} tokens but model_config.vocab_size is "
                f"{ckpt_config.vocab_size}"
            )
        model_config = ckpt_config
    else:
        tokenizer = build_tokenizer(dataset.pairs)
        try:
            model_config = request.model.replace(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
        except ConfigError as exc:
            raise ConfigError(f"model config does not fit the tokenizer: {exc}") from None

    repeat = request.data.repeat_counts()
    unknown = sorted(set(repeat) - set(dataset.modules))
    if unknown:
        raise ConfigError(
            f"DataConfig.repeat: {dataset_path} has no module {', '.join(map(repr, unknown))} "
            f"(its modules: {', '.join(dataset.modules)})"
        )
    train_pairs = [p for p in dataset.train for _ in range(repeat.get(p.module, 1))]
    enc = dict(max_src_len=request.data.max_src_len, max_tgt_len=request.data.max_tgt_len)
    train_examples = encode_pairs(train_pairs, tokenizer, **enc)
    steps = None
    if request.train.worked_steps:
        steps = StepsCurriculum(
            request.train.worked_steps_epochs,
            request.train.worked_steps_ramp,
            train_pairs,
            train_examples,
            tokenizer,
            max_tgt_len=request.data.max_tgt_len,
        )
    return Prepared(
        dataset=dataset,
        dataset_sha256=dataset_sha,
        tokenizer=tokenizer,
        model_config=model_config,
        train_examples=train_examples,
        val_examples=encode_pairs(dataset.val, tokenizer, **enc),
        device=device,
        precision=precision,
        compiled=compiled,
        pad_mode=pad_mode,
        cuda_graphs=cuda_graphs,
        transform_kernel=transform_kernel,
        resume_state=resume_state,
        start_epoch=start_epoch,
        steps=steps,
        seconds=time.perf_counter() - started,
    )


# ----------------------------------------------------------------------------------------- shared step pieces


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """RNG states as tensors/lists/primitives (loadable with ``weights_only=True``)."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            str(name),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def compute_loss(model: torch.nn.Module, batch: Batch, *, pad_id: int, label_smoothing: float = 0.0) -> Any:
    """The objective (``seq2seq_loss``); one indirection so every backend — and tests — share it."""
    from apt_model.model import seq2seq_loss

    return seq2seq_loss(
        model, batch.src, batch.tgt_in, batch.tgt_out, pad_id=pad_id, label_smoothing=label_smoothing
    )


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: list[Batch],
    *,
    pad_id: int,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float | None]:
    """Teacher-forced validation: token-weighted mean CE and token accuracy over non-pad targets."""
    if not batches:
        return {"val_loss": None, "val_token_acc": None}
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    try:
        for batch in batches:
            b = batch.to(device, non_blocking=True)
            with autocast_context(device, precision):
                out = compute_loss(model, b, pad_id=pad_id)
            loss_sum += out.loss.double() * out.n_tokens
            tokens += out.n_tokens
            correct += out.n_correct
    finally:
        model.train(was_training)
    n = max(int(tokens.item()), 1)
    return {"val_loss": float(loss_sum.item()) / n, "val_token_acc": int(correct.item()) / n}


def checkpoint_state(
    *,
    model: torch.nn.Module,
    model_config: ModelConfig,
    request: TrainRequest,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    schedule: WarmRestartSchedule | None,
    scaler: Any,
    epoch: int,
    global_step: int,
    history: dict[str, Any],
    dataset_sha256: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    state: dict[str, Any] = {
        "model_config": model_config.to_dict(),
        "train_config": request.train.to_dict(),
        "data_config": request.data.to_dict(),
        "tokenizer_json": tokenizer.to_json(),
        "model_state": getattr(model, "_orig_mod", model).state_dict(),
        "optimizer_state": optimizer.state_dict() if optimizer is not None else {},
        "scheduler_state": schedule.state_dict() if schedule is not None else {},
        "scaler_state": scaler.state_dict() if scaler is not None else {},
        "epoch": int(epoch),
        "global_step": int(global_step),
        "rng": capture_rng(),
        "history": history,
        "dataset_sha256": dataset_sha256,
    }
    state.update(extra or {})
    return state


class Progress:
    """A one-line progress bar on a TTY stderr; otherwise nothing per step (epoch lines go to the log)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0

    def step(self, epoch: int, epochs: int, i: int, n: int, loss: float, lr: float) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.2 and i < n):
            return
        self._last = now
        width = 24
        filled = int(width * i / max(n, 1))
        sys.stderr.write(
            f"\repoch {epoch}/{epochs} [{'#' * filled}{'.' * (width - filled)}] {i}/{n} loss {loss:.4f} lr {lr:.2e}"
        )
        sys.stderr.flush()

    def end_epoch(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels on CUDA. CPU kernels already are (for a fixed thread count), and switching the
    global flag imports torch's compiler stack (seconds), so CPU runs leave it alone."""
    if not enabled or device.type != "cuda":
        yield
        return
    # cuBLAS needs this for deterministic GEMMs; effective when set before its first use in the process.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench


# ------------------------------------------------------------------------------------------------- the loop


@dataclass
class _Launched:
    """A step launched by the epoch loop and not yet accounted for."""

    pending: PendingStep
    step: int  # 1-based optimizer step
    index: int  # window index within the epoch
    n_tokens: int
    lr: float


@dataclass
class _EpochStats:
    loss_sum: float = 0.0
    tokens: int = 0
    grad_norms: list[float] = field(default_factory=list)
    skipped: int = 0


def run_training(
    request: TrainRequest, *, backend: str = "playground", prepared: Prepared | None = None
) -> TrainResult:
    """Train per ``request`` and return the manifest. Validation errors are raised before anything is written."""
    prep = prepared if prepared is not None else prepare(request)
    with _deterministic(request.train.deterministic, prep.device):
        return _Trainer(request, prep, backend).fit()


class _Trainer:
    def __init__(self, request: TrainRequest, prep: Prepared, backend: str) -> None:
        self.request = request
        self.prep = prep
        self.backend = backend
        self.cfg = request.train
        self.out_dir = Path(request.out_dir)
        self.device = prep.device
        self.tok = prep.tokenizer
        self.pad_id = prep.model_config.pad_id

    # -- setup -------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        from apt_model.model import DBCDAC, APTModel

        cfg, prep = self.cfg, self.prep
        seed_everything(cfg.seed)
        self.model = APTModel(prep.model_config).to(self.device)
        self.model.train()
        if cfg.dropout_epochs:
            enable_dropout_schedule(self.model)  # before TrainStep compiles it
        common = dict(
            pad_id=self.pad_id,
            bos_id=self.tok.bos_id,
            eos_id=self.tok.eos_id,
            max_src_len=self.request.data.max_src_len,
            max_tgt_len=self.request.data.max_tgt_len,
            pad_mode=prep.pad_mode,
        )
        self.train_batcher = Batcher(prep.train_examples, cfg.batch_size, seed=cfg.seed, **common)
        self.eval_batches = Batcher(prep.val_examples, cfg.batch_size, seed=cfg.seed, **common).eval_batches()
        self.steps_per_epoch = -(-len(self.train_batcher) // cfg.grad_accum)
        self.optimizer = build_optimizer(self.model, cfg, fused=self.device.type == "cuda")
        self.schedule = WarmRestartSchedule(self.optimizer, cfg, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=prep.precision == "fp16")
        self.dbc = DBCDAC(cfg.dbc_dac, seed=cfg.seed) if cfg.dbc_dac.enabled else None
        self.stepper = TrainStep(
            self.model,
            cfg,
            optimizer=self.optimizer,
            device=self.device,
            precision=prep.precision,
            pad_id=self.pad_id,
            compiled=prep.compiled,
            cuda_graphs=prep.cuda_graphs != "off",
            step_graph=prep.cuda_graphs == "step",
            scaler=self.scaler,
            dbc=self.dbc,
        )
        self.global_step = 0
        self.epoch = prep.start_epoch
        self.train_seconds = 0.0
        # The fused transform's Triton kernels compile in a child while the first step compiles (training/prewarm.py).
        self.prewarm = (
            prewarm.start(
                prep.model_config,
                device=self.device,
                precision=prep.precision,
                src_len=self.request.data.max_src_len,
                tgt_len=self.request.data.max_tgt_len,
            )
            if prep.pad_mode == "fixed" and prewarm.wanted(self.device, prep.compiled, prep.transform_kernel)
            else None
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        self.report_path = self.out_dir / REPORT_FILE
        self.report = ExperimentReport.for_run(
            self.backend,
            prep,
            self.request,
            cfg,
            schedule=self.schedule.describe(cfg.epochs),
            runtime={
                "device": str(self.device),
                "precision": prep.precision,
                "compiled": prep.compiled,
                "cuda_graphs": prep.cuda_graphs,
                "transform_kernel": prep.transform_kernel,
                "pad_mode": prep.pad_mode,
                "steps_per_epoch": self.steps_per_epoch,
                "n_parameters": sum(p.numel() for p in self.params),
                "worked_steps": prep.steps.describe() if prep.steps is not None else None,
            },
        )
        resume_run_id = None
        if prep.resume_state is not None:
            self._restore(prep.resume_state)
            resume_run_id = (prep.resume_state.get("tracking") or {}).get("run_id")
        uri = resolve_tracking_uri(self.request.tracking_uri, self.out_dir)
        self.tracker = Tracker(uri, self.request.experiment, run_name=self.out_dir.name)
        self._resume_run_id = resume_run_id

    def _restore(self, state: dict[str, Any]) -> None:
        path = self.request.resume
        try:
            self.model.load_state_dict(state["model_state"], strict=True)
            self.optimizer.load_state_dict(state["optimizer_state"])
            self.schedule.load_state_dict(state["scheduler_state"])
            if state.get("scaler_state") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler_state"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise CheckpointError(f"{path}: cannot restore training state ({first[:200]})") from None
        if self.dbc is not None and state.get("dbc_dac_state"):
            self.dbc.load_state_dict(state["dbc_dac_state"])
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.report.restore_history(state.get("history") or {})
        self.report.runtime["resumed_from"].append({"path": str(path), "epoch": self.epoch})
        if not any(c.get("epoch") == self.epoch for c in self.report.checkpoints) and path is not None:
            self.report.checkpoints.append(
                {
                    "epoch": self.epoch,
                    "global_step": self.global_step,
                    "path": str(path),
                    "sha256": sha256_file(path),
                }
            )
        self.train_seconds = float((state.get("history") or {}).get("train_seconds", 0.0))
        restore_rng(state["rng"])

    # -- pieces ------------------------------------------------------------------------------------------------
    def _history(self) -> dict[str, Any]:
        h = self.report.history()
        h["train_seconds"] = self.train_seconds
        return h

    def _state(self) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "backend": self.backend,
            "tracking": {"uri": self.tracker.uri or "", "run_id": self.tracker.run_id or ""},
        }
        if self.dbc is not None:
            extra["dbc_dac_state"] = self.dbc.state_dict()
        return checkpoint_state(
            model=self.model,
            model_config=self.prep.model_config,
            request=self.request,
            tokenizer=self.tok,
            optimizer=self.optimizer,
            schedule=self.schedule,
            scaler=self.scaler,
            epoch=self.epoch,
            global_step=self.global_step,
            history=self._history(),
            dataset_sha256=self.prep.dataset_sha256,
            extra=extra,
        )

    def _nan_event(self, loss: float, grad_norm: float | None, step: int) -> None:
        action = self.cfg.nan_policy
        self.report.nan_events.append(
            {
                "epoch": self.epoch + 1,
                "global_step": step,
                "loss": json_float(loss),
                "grad_norm": json_float(grad_norm),
                "action": action,
            }
        )
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if action == "stop":
            msg = (
                f"non-finite {what} at optimizer step {step} (epoch {self.epoch + 1}); "
                "lower the learning rate, use fp32/bf16, or set nan_policy=skip"
            )
            self.report.status = "failed"
            self.report.final = {"error": msg, "global_step": step, "epoch": self.epoch + 1}
            self.report.write(self.report_path)
            self.tracker.end("FAILED")
            raise TrainingDivergedError(msg)
        log.warning("non-finite %s at step %d: update skipped", what, step)

    def _settle(self, launched: _Launched, stats: _EpochStats, progress: Progress, n_windows: int) -> None:
        """Account for one launched step: NaN policy, epoch statistics, logged losses, progress."""
        out = launched.pending.result()
        loss: float | None = None
        if not out.applied:
            self._nan_event(out.loss, out.grad_norm if math.isfinite(out.loss) else None, launched.step)
            stats.skipped += 1
        else:
            loss = out.loss
            if math.isfinite(out.grad_norm):
                stats.grad_norms.append(out.grad_norm)
            stats.loss_sum += out.loss * launched.n_tokens
            stats.tokens += launched.n_tokens
            if launched.step % self.cfg.log_every == 0:
                self.report.batch_losses.append([launched.step, loss])
        progress.step(
            self.epoch + 1,
            self.cfg.epochs,
            launched.index + 1,
            n_windows,
            loss if loss is not None else float("nan"),
            launched.lr,
        )

    def _train_epoch(self, progress: Progress) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.prep.steps is not None:
            self.prep.steps.apply(self.train_batcher, self.epoch)
        batches = self.train_batcher.epoch(self.epoch)
        windows = [batches[i : i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]
        if cfg.dropout_epochs:
            set_dropout_on(self.model, cfg.dropout_on(self.epoch))
        stats = _EpochStats()
        # Each step's outcome is read after the next step is launched (TrainStep.launch): with the whole-step graphs
        # the GPU then never idles through this loop's bookkeeping; other steps come back already resolved.
        in_flight: _Launched | None = None
        # A cold compiled run's first epoch is mostly its first steps (compilation, warm-up, capture): the report
        # keeps how long each of the run's first launches took to return, beside torch.compile's own phases.
        first_launches = self.report.runtime.setdefault("first_launch_seconds", [])
        mark = t0
        for i, window in enumerate(windows):
            self.schedule.set_step(self.global_step)
            self.global_step += 1
            launched = _Launched(
                self.stepper.launch(window, self.global_step),
                step=self.global_step,
                index=i,
                n_tokens=sum(b.n_tokens for b in window),
                lr=self.schedule.lr,
            )
            if len(first_launches) < FIRST_LAUNCHES_TIMED and self.epoch == self.prep.start_epoch:
                now = time.perf_counter()
                first_launches.append(round(now - mark, 3))
                mark = now
            if in_flight is not None:
                self._settle(in_flight, stats, progress, len(windows))
            in_flight = launched
        if in_flight is not None:
            self._settle(in_flight, stats, progress, len(windows))
        progress.end_epoch()
        self.epoch += 1
        evaluate_now = self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs
        val = (
            evaluate(
                self.model,
                self.eval_batches,
                pad_id=self.pad_id,
                device=self.device,
                precision=self.prep.precision,
            )
            if evaluate_now
            else {"val_loss": None, "val_token_acc": None}
        )
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds
        return {
            "epoch": self.epoch,
            "train_loss": stats.loss_sum / stats.tokens if stats.tokens else None,
            "val_loss": val["val_loss"],
            "val_token_acc": val["val_token_acc"],
            "lr": self.schedule.lr,
            "grad_norm": sum(stats.grad_norms) / len(stats.grad_norms) if stats.grad_norms else None,
            "tokens_per_s": stats.tokens / seconds if seconds > 0 else 0.0,
            "epoch_seconds": seconds,
            "global_step": self.global_step,
            "skipped_steps": stats.skipped,
        }

    def _save_epoch_checkpoint(self) -> None:
        path = self.out_dir / CHECKPOINT_PATTERN.format(epoch=self.epoch)
        save_checkpoint(path, self._state())
        self.report.checkpoints.append(
            {
                "epoch": self.epoch,
                "global_step": self.global_step,
                "path": str(path),
                "sha256": sha256_file(path),
            }
        )

    def _emit(self, row: dict[str, Any]) -> None:
        emit_epoch(row, epochs=self.cfg.epochs, tracker=self.tracker, on_epoch=self.request.on_epoch)

    # -- the run -----------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        started = time.perf_counter()
        self._setup()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # A run killed mid-write (SIGKILL, power loss) leaves its atomic writes' temporaries; this run rewrites
        # those same files, so their debris goes now (this process is their one writer).
        for stale in remove_stale_temps(self.out_dir, RUN_OUTPUTS):
            log.info("removed %s, left by an interrupted write", stale.name)
        self.report.write(self.report_path)
        params = {
            **flatten_params("model", self.prep.model_config.to_dict()),
            **flatten_params("train", self.cfg.to_dict()),
            **flatten_params("data", self.request.data.to_dict()),
        }
        tags = {
            "backend": self.backend,
            "dataset_sha256": self.prep.dataset_sha256,
            "out_dir": str(self.out_dir),
        }
        self.tracker.start(params, tags, resume_run_id=self._resume_run_id)
        progress = Progress(bool(self.request.options.get("progress", True)))
        # Where a run's wall time goes besides its epochs (BENCHMARKS.md's timed quality runs read these).
        self.report.runtime["phase_seconds"] = {
            "prepare": round(self.prep.seconds, 3),
            "setup": round(time.perf_counter() - started, 3),
        }
        try:
            while self.epoch < self.cfg.epochs:
                row = self._train_epoch(progress)
                self._reap_prewarm()
                self.report.add_epoch({**row, "train_loss": json_float(row["train_loss"])})
                if self.epoch % self.cfg.save_interval == 0:
                    self._save_epoch_checkpoint()
                self.report.write(self.report_path)
                self._emit(row)
            return self._finish()
        except TrainingDivergedError:
            self._stop_prewarm()
            raise
        except BaseException as exc:
            self._stop_prewarm()
            self.report.status = "failed"
            self.report.final = {"error": f"{exc.__class__.__name__}: {exc}".splitlines()[0][:500]}
            with contextlib.suppress(Exception):
                self.report.write(self.report_path)
            self.tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise

    def _reap_prewarm(self) -> None:
        if self.prewarm is not None:
            self.report.runtime["kernel_prewarm"] = self.prewarm.reap()
            self.prewarm = None

    def _stop_prewarm(self) -> None:
        if self.prewarm is not None:
            self.prewarm.kill()
            self.prewarm = None

    def _finish(self) -> TrainResult:
        self._reap_prewarm()
        started = time.perf_counter()
        out = self.out_dir
        final_ckpt = out / FINAL_CHECKPOINT
        export_dir = out / FINAL_EXPORT
        self.report.finish(
            epochs_completed=self.epoch,
            global_step=self.global_step,
            dbc_dac=self.dbc.summary() if self.dbc is not None else None,
            train_seconds=self.train_seconds,
            final_model=str(final_ckpt),
            export_dir=str(export_dir),
        )
        save_checkpoint(final_ckpt, self._state())
        export_pretrained(
            export_dir,
            self.model,
            self.prep.model_config,
            self.tok,
            extra_configs={"train_config": self.cfg.to_dict(), "data_config": self.request.data.to_dict()},
        )
        self.report.runtime.setdefault("phase_seconds", {})["finish"] = round(
            time.perf_counter() - started, 3
        )
        if self.prep.compiled:
            self.report.runtime["compile_seconds"] = compile_seconds()
        self.report.write(self.report_path)
        self.tracker.log_artifact(self.report_path)
        self.tracker.log_artifact(export_dir, artifact_path=FINAL_EXPORT)
        self.tracker.end("FINISHED")
        sha = {
            FINAL_CHECKPOINT: sha256_file(final_ckpt),
            **{
                f"{FINAL_EXPORT}/{p.name}": sha256_file(p)
                for p in sorted(export_dir.iterdir())
                if p.is_file()
            },
        }
        metrics = {
            k: float(v)
            for k, v in self.report.final.items()
            if k in ("train_loss", "val_loss", "val_token_acc", "best_val_loss", "train_seconds")
            and isinstance(v, int | float)
        }
        checkpoints = [c["path"] for c in self.report.checkpoints]
        result = TrainResult(
            backend=self.backend,
            out_dir=str(out),
            final_model=str(final_ckpt),
            export_dir=str(export_dir),
            report=str(self.report_path),
            last_checkpoint=checkpoints[-1] if checkpoints else str(final_ckpt),
            epochs_completed=self.epoch,
            global_step=self.global_step,
            metrics=metrics,
            sha256=sha,
            mlflow_run_id=self.tracker.run_id,
            extra={
                "device": str(self.device),
                "precision": self.prep.precision,
                "compiled": self.prep.compiled,
                "dataset_sha256": self.prep.dataset_sha256,
                "skipped_steps": self.report.final["skipped_steps"],
                "tracking_uri": self.tracker.uri,
                "tracking_error": self.tracker.error,
            },
        )
        atomic_write_json(out / RESULT_FILE, result.to_dict())
        return result


def emit_epoch(
    row: dict[str, Any], *, epochs: int, tracker: Tracker, on_epoch: Callable[[dict[str, Any]], None] | None
) -> None:
    """What every backend does with a finished epoch's row: one log line, MLflow metrics, the progress callback."""
    log.info(
        "epoch %d/%d  train_loss %s  val_loss %s  val_acc %s  lr %.3g  %.1fs",
        row["epoch"],
        epochs,
        _fmt(row["train_loss"]),
        _fmt(row["val_loss"]),
        _fmt(row["val_token_acc"]),
        row["lr"],
        row["epoch_seconds"],
    )
    tracker.log_metrics({k: row[k] for k in METRIC_KEYS}, step=row["epoch"])
    if on_epoch is not None:
        try:
            on_epoch(dict(row))
        except Exception:  # a progress consumer must not kill training
            log.warning("on_epoch callback failed", exc_info=True)


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)
