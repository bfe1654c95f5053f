"""Per-rank entry point of the DeepSpeed backend: ``python -m apt_model.backends.deepspeed_worker --request FILE``.

Started on every rank by ``torchrun`` / the ``deepspeed`` launcher (see ``deepspeed_backend``). On CUDA it uses NCCL
and ``cuda:LOCAL_RANK``; on CPU (``DS_ACCELERATOR=cpu``) gloo. Training semantics are those of
``apt_model.training.loop`` (same ``prepare``, ``compute_loss``, ``evaluate``, AdamW from ``build_optimizer``,
``WarmRestartSchedule``, ``ExperimentReport``, MLflow ``Tracker`` on rank 0), mapped onto the DeepSpeed engine:

* **Data sharding.** Every rank builds the same seeded batch plan (``Batcher.epoch_indices(epoch, group=W)``: a pure
  function of ``(seed, epoch, W)``, reshuffled every epoch) with the per-rank micro batch. With length buckets the W
  batches of one micro-step come from neighbouring lengths, so no rank waits at the step's reduction for another
  rank's longer batch. (Eager steps measured on H200s are bound by host work, not by length, so this showed no
  measurable gain there. For a step whose cost follows the padded shape, a count over the large data's batches at
  micro batch 256 puts 4 ranks at 51–65% of ideal with randomly mixed lengths and at 81–89% grouped.)
  The epoch's batches are cut into global windows of ``world_size × gradient_accumulation`` consecutive batches —
  one optimizer step each — and rank ``r`` takes batches ``r, r + W, r + 2W, …`` of a window: each rank reads
  (collates) only its own shard, and the union over ranks is exactly the epoch. At world size 1 the windows are the
  Playground's.
* **Accumulation.** Each micro-batch's mean CE is weighted by its share of the *global* window's target tokens (all
  ranks know every batch's token count from the plan), times ``W`` because DeepSpeed averages gradients over ranks;
  ``engine.backward(..., scale_wrt_gas=False)``. The accumulated gradient is therefore that of the token-weighted
  mean over the whole global window, short last windows included, as in the Playground. The accumulation boundary
  is set explicitly (``engine.set_gradient_accumulation_boundary``) so a short last window still steps; every rank
  runs the same number of micro-steps per window (ZeRO communicates on them), a rank without a batch left in the
  last window runs one row with weight 0.
* **Step.** The logged step loss is the all-reduced window loss. The learning rate comes from
  ``WarmRestartSchedule.set_step(global_step)`` on the client AdamW's param groups (the same dicts DeepSpeed's ZeRO
  optimizer steps). Clipping at ``clip_grad_norm`` is DeepSpeed's ``gradient_clipping``; the reported grad norm is
  the engine's pre-clipping global norm. Precision is DeepSpeed's: fp16/bf16 parameters with fp32 master weights
  (not autocast as in the Playground), fp16 with dynamic loss scaling (overflowing steps skipped by DeepSpeed).
* **DBC-DAC** is applied to the same gradient as in the Playground at every ZeRO stage: on the steps its cadence
  selects, after the boundary backward (gradients reduced) and before ``engine.step()`` (clipping + AdamW), the full
  fp32 gradient of every parameter is assembled with ``deepspeed.utils.safe_get_full_grad`` (an all-reduce of the
  partitions), unscaled by the fp16 loss scale, stabilised by ``DBCDAC.step`` (same seeded generator on every rank,
  so every rank computes the same result) and written back to each rank's partition with ``safe_set_full_grad``.
  Cost on those steps: one all-reduce of all gradients and a full-gradient buffer per rank. Under fp16, a step whose
  gradients overflowed is left to DeepSpeed's overflow skip and DBC-DAC does not run on it (the Playground counts
  such a step as applied). Checked against the Playground with DBC-DAC on every step (per-step losses equal to
  ~5e-7) at world size 1: ZeRO-1 in the tests, ZeRO-3 by a manual run; ZeRO-2 uses the same DeepSpeed calls.
* **NaN policy.** A non-finite window loss with ``nan_policy="stop"`` fails the run on every rank (report status
  ``failed``). With ``"skip"`` the update is left to DeepSpeed's own overflow / invalid-norm check; if DeepSpeed
  applied the step anyway (``engine.was_step_applied()``) the run stops rather than pretend it skipped.
* **Checkpoints** ``checkpoint_epoch_{N}/`` at ``save_interval`` epochs and at the last epoch: written by all ranks
  through ``engine.save_checkpoint`` into a temporary directory that is renamed into place (``io.atomic_dir``) once
  every rank has written, plus ``tokenizer_state.json``, ``apt_state.pt`` (epoch, step, schedule, DBC-DAC state,
  history, configs; tensors and primitives only) and each rank's ``rng_rank{R}.pt``. Resuming restores all of it, so
  the per-step losses after a resume equal an uninterrupted run's.
* **Export**: rank 0 consolidates the last checkpoint to fp32 with
  ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` and writes ``final_model/`` through
  ``checkpoint.export_pretrained``.
* **Evaluation** runs the whole validation set on every rank (ZeRO-3 forwards are collective), rank 0 reports.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from apt_model.backends import TrainRequest, TrainResult
from apt_model.backends.deepspeed_backend import (
    APT_STATE,
    CHECKPOINT_DIR,
    EPOCH_LINE,
    ERROR_FILE,
    PARENT_PID_ENV,
    RNG_STATE,
    TOKENIZER_STATE,
    load_apt_state,
    worker_request,
)
from apt_model.errors import AptError, CheckpointError, ConfigError

log = logging.getLogger("apt_model.backends.deepspeed_worker")

# Diagnostics for the scaling benchmark: with this set to a folder, every rank profiles ten optimizer steps of the
# second epoch (torch.profiler, CPU + GPU) and writes its tables and its per-step wall times there. The first
# four steps are left out where the epoch is long enough (allocator and NCCL warm-up); short epochs start at once.
PROFILE_DIR_ENV = "APT_DS_PROFILE_DIR"
PROFILED_STEPS = 10
# Ranks that reach a collective at different times wait for each other (tens of ms per step in NCCL at 2 GPUs,
# BENCHMARKS.md). Python's collector is one source of such jitter: it pauses each rank at its own moments. So
# automatic collection is off while training; all ranks collect the young generations at the same optimizer steps
# and everything at the end of each epoch.
GC_EVERY_STEPS = 50


def _setup_logging(rank: int) -> None:
    # torch.distributed's deprecation notices for calls DeepSpeed makes, once per call site and rank: noise.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    root = logging.getLogger("apt_model")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _watch_parent() -> None:
    """Exit when the launching process is gone (a SIGKILL there cannot reach our process group)."""
    pid = int(os.environ.get(PARENT_PID_ENV, "0") or 0)
    if pid <= 0:
        return

    def _loop() -> None:
        while True:
            time.sleep(2.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(143)
            except PermissionError:
                pass

    threading.Thread(target=_loop, name="parent-watchdog", daemon=True).start()


def _write_error(out_dir: Path, exc: BaseException, rank: int) -> None:
    """The first failing rank's error, for the launcher to re-raise as the same ``AptError`` type."""
    path = out_dir / ERROR_FILE
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    payload = json.dumps({"type": exc.__class__.__name__, "message": message, "rank": rank})
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(payload)


def _dir_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    from apt_model.io import sha256_file

    for p in sorted(directory.rglob("*")):
        if p.is_file():
            digest.update(f"{p.relative_to(directory)}\0{sha256_file(p)}\n".encode())
    return digest.hexdigest()


def physical_cores(cpus: list[int], topology: Path = Path("/sys/devices/system/cpu")) -> list[list[int]]:
    """``cpus`` grouped by physical core (hyperthread siblings together), ordered by (socket, core); one group per
    CPU where the topology cannot be read."""
    keys: dict[int, tuple[int, int]] = {}
    for cpu in cpus:
        try:
            base = topology / f"cpu{cpu}" / "topology"
            keys[cpu] = (
                int((base / "physical_package_id").read_text()),
                int((base / "core_id").read_text()),
            )
        except (OSError, ValueError):
            return [[c] for c in sorted(cpus)]
    groups: dict[tuple[int, int], list[int]] = {}
    for cpu in sorted(cpus):
        groups.setdefault(keys[cpu], []).append(cpu)
    return [groups[k] for k in sorted(groups)]


def rank_cpus(cores: list[list[int]], local_rank: int, local_world: int) -> list[int]:
    """This rank's share of ``cores``: a contiguous slice of the physical cores (so neighbouring ranks, which
    usually drive GPUs of one socket, stay on one socket), with their hyperthreads; ranks never share a core while
    there are at least as many cores as ranks."""
    if local_world <= len(cores):
        start = local_rank * len(cores) // local_world
        stop = (local_rank + 1) * len(cores) // local_world
        return [cpu for core in cores[start:stop] for cpu in core]
    return cores[local_rank % len(cores)]


def _bind_cores() -> list[int]:
    """Pin this process (and the threads it starts later: NCCL's, the data path's) to its share of the CPUs."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1")
    mine = rank_cpus(physical_cores(sorted(os.sched_getaffinity(0))), local_rank, local_world)
    os.sched_setaffinity(0, mine)
    return mine


def import_deepspeed() -> Any:
    """``import deepspeed`` without its autotuner's import-time ``import mlflow`` (seconds per rank; only used for
    autotuning experiments, which this backend never runs). MLflow stays importable afterwards for the Tracker."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # makes `import mlflow` raise ImportError
    try:
        import deepspeed
    finally:
        if sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


def _patch_zero_dim_broadcast() -> None:
    """DeepSpeed 0.19.8 broadcasts parameters as ``p.data.view(torch.uint8)`` (``DeepSpeedEngine._broadcast_model``
    at stages 0-2, ``zero.Init._zero_init_param`` at stage 3), which fails for 0-dim parameters (the autopoietic
    ``tau`` scalars). Broadcast those through a 1-element view of the same storage; at stage 3 the parameter keeps
    its 0-dim ``ds_shape``, so gathered parameters, checkpoints and the consolidated export have the model's shapes."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    broadcast_model = DeepSpeedEngine._broadcast_model
    if getattr(broadcast_model, "_apt_patched", False):
        return
    zero_init_param = Init._zero_init_param

    def _broadcast_model(self: Any) -> None:
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)
        try:
            broadcast_model(self)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    def _zero_init(self: Any, param: Any) -> None:
        if param.dim() != 0:
            zero_init_param(self, param)
            return
        param.data = param.data.reshape(1)
        zero_init_param(self, param)
        param.ds_shape = torch.Size([])

    _broadcast_model._apt_patched = True  # type: ignore[attr-defined]
    DeepSpeedEngine._broadcast_model = _broadcast_model  # type: ignore[method-assign]
    Init._zero_init_param = _zero_init  # type: ignore[method-assign]


class Worker:
    def __init__(self, request: TrainRequest, meta: dict[str, Any]) -> None:
        self.request = request
        self.meta = meta
        self.out_dir = Path(request.out_dir).resolve()
        self.rank = int(os.environ.get("RANK", "0"))

    # -- setup -------------------------------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        if self.request.options.get("bind_cores"):
            # Before anything starts threads, so they inherit the mask. The eager and compiled steps are bound by
            # host work per step; unpinned ranks migrate between cores and share them with each other.
            self.bound_cpus = _bind_cores()
        deepspeed = import_deepspeed()
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        self.cuda = get_accelerator().device_name() == "cuda"
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo")
        self.dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.cuda:
            get_accelerator().set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")

    def _read_config(self) -> None:
        path = Path(self.request.options["deepspeed_config"])
        self.ds_config = json.loads(path.read_text(encoding="utf-8"))
        cfg = self.ds_config
        self.micro = int(cfg["train_micro_batch_size_per_gpu"])
        self.accum = int(cfg["gradient_accumulation_steps"])
        if int(cfg["train_batch_size"]) != self.micro * self.accum * self.world:
            raise ConfigError(
                f"{path}: train_batch_size {cfg['train_batch_size']} != micro batch {self.micro} × gradient "
                f"accumulation {self.accum} × world size {self.world}"
            )
        self.zero_stage = int((cfg.get("zero_optimization") or {}).get("stage", 0))
        if (cfg.get("fp16") or {}).get("enabled"):
            self.precision = "fp16"
        elif (cfg.get("bf16") or cfg.get("bfloat16") or {}).get("enabled"):
            self.precision = "bf16"
        else:
            self.precision = "fp32"

    def _setup(self) -> None:
        import deepspeed

        from apt_model.model import DBCDAC, APTModel
        from apt_model.model.dropout import enable_dropout_schedule
        from apt_model.training.batching import Batcher
        from apt_model.training.loop import prepare, seed_everything
        from apt_model.training.report import REPORT_FILE, ExperimentReport
        from apt_model.training.schedule import WarmRestartSchedule, build_optimizer
        from apt_model.training.tracking import Tracker, resolve_tracking_uri

        device_name = str(self.device) if self.cuda else "cpu"
        self.compiled = bool(self.meta.get("compiled"))
        self.prep = prepare(
            worker_request(self.request, self.micro, self.accum, device_name, compiled=self.compiled)
        )
        # The effective training config: DeepSpeed's batch shape and precision.
        self.cfg = self.request.train.replace(
            batch_size=self.micro, grad_accum=self.accum, precision=self.precision
        )
        cfg, prep = self.cfg, self.prep
        self.tok = prep.tokenizer
        self.pad_id = prep.model_config.pad_id

        seed_everything(cfg.seed)
        model = APTModel(prep.model_config)
        model.train()
        if cfg.dropout_epochs:
            enable_dropout_schedule(model)  # before the forward is compiled
        self._eager_forward = model.forward
        if self.compiled:
            # The forward (and through AOTAutograd its backward) is compiled; DeepSpeed's engine still wraps the
            # module, its ZeRO-1/2 gradient hooks fire on the parameters as before. No CUDA graphs: ZeRO reduces
            # gradients from those hooks on its own streams. Validation stays eager (one graph, not two).
            model.forward = torch.compile(model.forward, dynamic=False)  # type: ignore[method-assign]
        self.n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        common = dict(
            pad_id=self.pad_id,
            bos_id=self.tok.bos_id,
            eos_id=self.tok.eos_id,
            max_src_len=self.request.data.max_src_len,
            max_tgt_len=self.request.data.max_tgt_len,
            pad_mode=prep.pad_mode,
        )
        self.batcher = Batcher(prep.train_examples, self.micro, seed=cfg.seed, **common)
        self.eval_batches = Batcher(prep.val_examples, self.micro, seed=cfg.seed, **common).eval_batches()
        self.span = self.world * self.accum
        self.steps_per_epoch = -(-len(self.batcher) // self.span)
        optimizer = build_optimizer(model, cfg)
        # Built on the client optimizer: DeepSpeed's ZeRO optimizers step the same param-group dicts.
        self.schedule = WarmRestartSchedule(optimizer, cfg, self.steps_per_epoch)
        self.dbc = DBCDAC(cfg.dbc_dac, seed=cfg.seed) if cfg.dbc_dac.enabled else None
        _patch_zero_dim_broadcast()
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]
        self.global_step = 0
        self.epoch = 0
        self.train_seconds = 0.0

        self.report_path = self.out_dir / REPORT_FILE
        self.report = ExperimentReport.for_run(
            "deepspeed",
            prep,
            self.request,
            cfg,
            schedule=self.schedule.describe(cfg.epochs),
            runtime={
                "device": f"{self.device.type} × {self.world}",
                "precision": self.precision,
                "compiled": self.compiled,
                "transform_kernel": prep.transform_kernel,
                "pad_mode": prep.pad_mode,
                "steps_per_epoch": self.steps_per_epoch,
                "n_parameters": self.n_parameters,
                "world_size": self.world,
                "zero_stage": self.zero_stage,
                "offload": bool(self.meta.get("offload")),
                "worked_steps": prep.steps.describe() if prep.steps is not None else None,
                "train_batch_size": self.micro * self.accum * self.world,
                "micro_batch_size": self.micro,
                "rank0_cpus": getattr(self, "bound_cpus", None),  # None: not pinned (--bind-cores off)
                "resumed_from": [],
            },
        )
        self._resume_run_id = None
        if self.request.resume is not None:
            self._restore(Path(self.request.resume))
        uri = resolve_tracking_uri(self.request.tracking_uri, self.out_dir)
        self.tracker = Tracker(
            uri if self.rank == 0 else None, self.request.experiment, run_name=self.out_dir.name
        )

    def _restore(self, directory: Path) -> None:
        from apt_model.training.loop import restore_rng

        state = load_apt_state(directory)
        load_path, _ = self.engine.load_checkpoint(
            str(directory.parent),
            tag=directory.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
        if load_path is None:
            raise CheckpointError(f"{directory}: DeepSpeed found no checkpoint to load")
        try:
            self.schedule.load_state_dict(state["scheduler_state"])
            if self.dbc is not None and state.get("dbc_dac_state"):
                self.dbc.load_state_dict(state["dbc_dac_state"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{directory}: cannot restore training state ({exc})") from None
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        history = state.get("history") or {}
        self.report.restore_history(history)
        self.report.runtime["resumed_from"].append({"path": str(directory), "epoch": self.epoch})
        self.train_seconds = float(history.get("train_seconds", 0.0))
        self._resume_run_id = (state.get("tracking") or {}).get("run_id") or None
        rng_path = directory / RNG_STATE.format(rank=self.rank)
        try:
            rng = torch.load(rng_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{rng_path}: cannot load RNG state ({exc.__class__.__name__})") from None
        restore_rng(rng)

    # -- one optimizer step ------------------------------------------------------------------------------------
    def _set_lr(self) -> float:
        lr = self.schedule.set_step(self.global_step)
        for group in self.engine.optimizer.param_groups:  # no-op when DeepSpeed shares the client's dicts
            group["lr"] = lr
        return lr

    @torch.no_grad()
    def _apply_dbc_dac(self) -> None:
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        assert self.dbc is not None
        step = self.global_step + 1
        if not self.dbc.should_apply(step):
            return
        scale = 1.0
        if self.precision == "fp16":
            scale = float(getattr(self.engine.optimizer, "loss_scale", 1.0) or 1.0)
        fulls = [safe_get_full_grad(p) for p in self.params]  # collective: the same order on every rank
        pairs = [(p, g) for p, g in zip(self.params, fulls, strict=True) if g is not None]
        if self.precision == "fp16" and not all(bool(torch.isfinite(g).all()) for _, g in pairs):
            return  # overflow: DeepSpeed skips this step and lowers the loss scale
        proxies = []
        for _, g in pairs:
            # A shape-only stand-in whose .grad is the full (unscaled) gradient: DBCDAC reads p.dim()/p.numel().
            proxy = torch.empty_strided(g.shape, (0,) * g.dim(), dtype=g.dtype, device=g.device)
            proxy.grad = g.float() / scale if scale != 1.0 else g.float()
            proxies.append(proxy)
        self.dbc.step(proxies, step)
        for (p, g), proxy in zip(pairs, proxies, strict=True):
            assert proxy.grad is not None
            value = proxy.grad * scale if scale != 1.0 else proxy.grad
            safe_set_full_grad(p, self._zero3_full_value(p, value.to(g.dtype)))

    def _zero3_full_value(self, param: torch.nn.Parameter, value: torch.Tensor) -> torch.Tensor:
        """``value`` as DeepSpeed's ZeRO-3 ``set_fp32_grad_for_param`` needs it: flat, padded to world × partition.

        It slices ``[rank · part, (rank + 1) · part)`` of the flat value without padding it first, so a parameter
        smaller than the world (``tau``, a 1-element bias) fails on the last ranks with "start + length exceeds
        dimension size" (seen with CPU offload). Padding with zeros only fills the partition's padding.
        """
        if not hasattr(param, "ds_id") or param.grad is not None:
            return value
        need = param.ds_tensor.numel() * self.world
        flat = value.flatten()
        if flat.numel() < need:
            flat = torch.nn.functional.pad(flat, (0, need - flat.numel()))
        return flat

    def _nan_event(self, loss: float) -> None:
        from apt_model.training.loop import TrainingDivergedError
        from apt_model.training.report import json_float

        action = self.cfg.nan_policy
        self.report.nan_events.append(
            {
                "epoch": self.epoch + 1,
                "global_step": self.global_step + 1,
                "loss": json_float(loss),
                "grad_norm": None,
                "action": action,
            }
        )
        if action == "stop":
            msg = (
                f"non-finite loss {loss} at optimizer step {self.global_step + 1} (epoch {self.epoch + 1}); "
                "lower the learning rate, use fp32/bf16, or set nan_policy=skip"
            )
            self.report.status = "failed"
            self.report.final = {"error": msg, "global_step": self.global_step + 1, "epoch": self.epoch + 1}
            if self.rank == 0:
                self.report.write(self.report_path)
                self.tracker.end("FAILED")
            raise TrainingDivergedError(msg)
        log.warning("non-finite loss %s at step %d: update skipped", loss, self.global_step + 1)

    def _train_epoch(self) -> dict[str, Any]:
        from apt_model.model.dropout import set_dropout_on
        from apt_model.training.loop import compute_loss

        t0 = time.perf_counter()
        if self.cfg.dropout_epochs:
            set_dropout_on(self.engine.module, self.cfg.dropout_on(self.epoch))
        if self.prep.steps is not None:
            self.prep.steps.apply(self.batcher, self.epoch)  # every rank alike: a pure function of the epoch
        plan = self.batcher.epoch_indices(self.epoch, group=self.world)
        examples = self.batcher.examples
        tokens = [sum(len(examples[i].out) + 1 for i in rows) for rows in plan]
        loss_sum, token_sum, skipped, grad_norms = 0.0, 0, 0, []
        engine = self.engine
        profile_dir = os.environ.get(PROFILE_DIR_ENV) if self.epoch == 1 else None
        profiler, step_seconds = None, []
        first = 4 if self.steps_per_epoch > 4 + PROFILED_STEPS else 0
        for start in range(0, len(plan), self.span):
            window_started = time.perf_counter()
            if profile_dir and start // self.span == first:
                profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]
                    + ([torch.profiler.ProfilerActivity.CUDA] if self.cuda else [])
                )
                profiler.__enter__()
            window = list(range(start, min(start + self.span, len(plan))))
            window_tokens = max(sum(tokens[i] for i in window), 1)
            mine = window[self.rank :: self.world]
            micro_steps = -(-len(window) // self.world)
            loss_acc = torch.zeros((), dtype=torch.float32, device=self.device)
            finite = True
            for j in range(micro_steps):
                boundary = j == micro_steps - 1
                engine.set_gradient_accumulation_boundary(boundary)
                if j < len(mine):
                    rows, share = plan[mine[j]], tokens[mine[j]] / window_tokens
                else:  # keeps this rank in step with the others (ZeRO communicates per micro-step)
                    rows, share = plan[window[0]][:1], 0.0
                batch = self.batcher.collate_indices(rows).to(self.device)
                out = compute_loss(
                    engine, batch, pad_id=self.pad_id, label_smoothing=self.cfg.label_smoothing
                )
                engine.backward(out.loss * (share * self.world), scale_wrt_gas=False)
                if share:
                    loss_acc += out.loss.detach().float() * share
                if boundary:
                    self.dist.all_reduce(loss_acc)
                    loss = float(loss_acc.item())
                    finite = math.isfinite(loss)
                    if not finite:
                        self._nan_event(loss)
                    self._set_lr()
                    if self.dbc is not None and finite:
                        self._apply_dbc_dac()
                engine.step()
            if not finite:
                if engine.was_step_applied():
                    from apt_model.training.loop import TrainingDivergedError

                    raise TrainingDivergedError(
                        f"non-finite loss at optimizer step {self.global_step + 1}: DeepSpeed applied the update "
                        f"at {self.precision}, so nan_policy=skip cannot hold; use nan_policy=stop or fp16"
                    )
                skipped += 1
            else:
                norm = engine.get_global_grad_norm()
                if norm is not None and math.isfinite(float(norm)):
                    grad_norms.append(float(norm))
                loss_sum += loss * window_tokens
                token_sum += window_tokens
            self.global_step += 1
            if finite and self.global_step % self.cfg.log_every == 0:
                self.report.batch_losses.append([self.global_step, loss])
            if self.global_step % GC_EVERY_STEPS == 0:
                gc.collect(1)
            step_seconds.append(time.perf_counter() - window_started)
            if profiler is not None and start // self.span == first + PROFILED_STEPS - 1:
                self._finish_profile(Path(profile_dir), profiler, step_seconds)
                profiler = None
        if profiler is not None:  # the epoch ended inside the profiled windows
            self._finish_profile(Path(profile_dir), profiler, step_seconds)
        self.epoch += 1
        evaluate_now = self.epoch % self.cfg.eval_every == 0 or self.epoch == self.cfg.epochs
        val = self._evaluate() if evaluate_now else {"val_loss": None, "val_token_acc": None}
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds
        return {
            "epoch": self.epoch,
            "train_loss": loss_sum / token_sum if token_sum else None,
            "val_loss": val["val_loss"],
            "val_token_acc": val["val_token_acc"],
            "lr": self.schedule.lr,
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else None,
            "tokens_per_s": token_sum / seconds if seconds > 0 else 0.0,
            "epoch_seconds": seconds,
            "global_step": self.global_step,
            "skipped_steps": skipped,
        }

    def _finish_profile(self, folder: Path, profiler: Any, step_seconds: list[float]) -> None:
        """Stop ``profiler`` and write this rank's step times and operator tables into ``folder``."""
        from apt_model.io import atomic_write_text

        profiler.__exit__(None, None, None)
        folder.mkdir(parents=True, exist_ok=True)
        averages = profiler.key_averages()
        sections = [
            f"rank {self.rank} of {self.world}; wall seconds of each optimizer step so far this epoch:\n"
            + " ".join(f"{s:.4f}" for s in step_seconds),
            averages.table(sort_by="self_cpu_time_total", row_limit=45),
        ]
        if self.cuda:
            sections.append(averages.table(sort_by="self_device_time_total", row_limit=30))
        atomic_write_text(
            folder / f"profile_world{self.world}_rank{self.rank}.txt", "\n\n".join(sections) + "\n"
        )

    def _evaluate(self) -> dict[str, float | None]:
        from apt_model.training.loop import evaluate

        module = self.engine.module
        compiled_forward = module.forward
        if self.compiled:
            module.forward = self._eager_forward  # type: ignore[method-assign]
        try:
            # Parameters already have DeepSpeed's dtype: no autocast on top.
            return evaluate(
                self.engine, self.eval_batches, pad_id=self.pad_id, device=self.device, precision="fp32"
            )
        finally:
            if self.compiled:
                module.forward = compiled_forward  # type: ignore[method-assign]

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _apt_state(self) -> dict[str, Any]:
        history = self.report.history()
        history["train_seconds"] = self.train_seconds
        state: dict[str, Any] = {
            "format_version": 1,
            "backend": "deepspeed",
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model_config": self.prep.model_config.to_dict(),
            "train_config": self.cfg.to_dict(),
            "data_config": self.request.data.to_dict(),
            "dataset_sha256": self.prep.dataset_sha256,
            "world_size": self.world,
            "zero_stage": self.zero_stage,
            "precision": self.precision,
            "scheduler_state": self.schedule.state_dict(),
            "history": history,
            "tracking": {"uri": self.tracker.uri or "", "run_id": self.tracker.run_id or ""},
        }
        if self.dbc is not None:
            state["dbc_dac_state"] = self.dbc.state_dict()
        return state

    def _save_checkpoint(self) -> Path:
        from apt_model.io import atomic_dir, atomic_path, atomic_write_text
        from apt_model.training.loop import capture_rng

        tag = CHECKPOINT_DIR.format(epoch=self.epoch)
        target = self.out_dir / tag
        with contextlib.ExitStack() as stack:
            name = [None]
            if self.rank == 0:
                name[0] = stack.enter_context(atomic_dir(target)).name  # type: ignore[assignment]
            self.dist.broadcast_object_list(name, src=0)
            tmp_name = str(name[0])
            self.engine.save_checkpoint(str(self.out_dir), tag=tmp_name, save_latest=False)
            with atomic_path(self.out_dir / tmp_name / RNG_STATE.format(rank=self.rank)) as tmp:
                torch.save(capture_rng(), tmp)
            self.dist.barrier()
            if self.rank == 0:
                (self.out_dir / tmp_name / TOKENIZER_STATE).write_text(self.tok.to_json(), encoding="utf-8")
                torch.save(self._apt_state(), self.out_dir / tmp_name / APT_STATE)
        # atomic_dir has renamed the directory into place on rank 0 (on leaving the ExitStack).
        if self.rank == 0:
            atomic_write_text(self.out_dir / "latest", tag)
            self.report.checkpoints.append(
                {
                    "epoch": self.epoch,
                    "global_step": self.global_step,
                    "path": str(target),
                    "sha256": _dir_sha256(target),
                }
            )
        self.dist.barrier()
        return target

    # -- the run -----------------------------------------------------------------------------------------------
    def _emit(self, row: dict[str, Any]) -> None:
        from apt_model.training.loop import emit_epoch

        # on_epoch lives in the launching process: the row crosses back as an EPOCH_LINE on stdout.
        emit_epoch(row, epochs=self.cfg.epochs, tracker=self.tracker, on_epoch=None)
        print(EPOCH_LINE + json.dumps(row, default=str), flush=True)

    def run(self) -> TrainResult | None:
        from apt_model.training.report import json_float
        from apt_model.training.tracking import flatten_params

        self._init_distributed()
        self._read_config()
        self._setup()
        if self.rank == 0:
            from apt_model.io import remove_stale_temps
            from apt_model.training.loop import RUN_OUTPUTS

            self.out_dir.mkdir(parents=True, exist_ok=True)
            # Debris of a run killed mid-write (see the Playground loop); no rank writes into out_dir before the
            # first checkpoint, which follows collectives that rank 0 only joins after this.
            for stale in remove_stale_temps(self.out_dir, (*RUN_OUTPUTS, "checkpoint_epoch_*", "latest")):
                log.info("removed %s, left by an interrupted write", stale.name)
            self.report.write(self.report_path)
            params = {
                **flatten_params("model", self.prep.model_config.to_dict()),
                **flatten_params("train", self.cfg.to_dict()),
                **flatten_params("data", self.request.data.to_dict()),
                **flatten_params(
                    "deepspeed", {k: v for k, v in self.ds_config.items() if k != "zero_optimization"}
                ),
                **flatten_params("deepspeed.zero", self.ds_config.get("zero_optimization") or {}),
            }
            tags = {
                "backend": "deepspeed",
                "dataset_sha256": self.prep.dataset_sha256,
                "out_dir": str(self.out_dir),
            }
            self.tracker.start(params, tags, resume_run_id=self._resume_run_id)
        last_ckpt: Path | None = None
        gc.collect()
        gc.freeze()  # what set-up built lives to the end: later collections need not walk it
        gc.disable()
        try:
            while self.epoch < self.cfg.epochs:
                row = self._train_epoch()
                gc.collect()
                self.report.add_epoch({**row, "train_loss": json_float(row["train_loss"])})
                if self.epoch % self.cfg.save_interval == 0 or self.epoch == self.cfg.epochs:
                    last_ckpt = self._save_checkpoint()
                if self.rank == 0:
                    self.report.write(self.report_path)
                    self._emit(row)
            if last_ckpt is None:  # resumed at the final epoch: the given checkpoint is the last one
                last_ckpt = Path(self.request.resume) if self.request.resume else self._save_checkpoint()
            result = self._finish(last_ckpt) if self.rank == 0 else None
            self.dist.barrier()
            return result
        except BaseException as exc:
            if self.rank == 0 and self.report.status == "running":
                self.report.status = "failed"
                self.report.final = {"error": f"{exc.__class__.__name__}: {exc}".splitlines()[0][:500]}
                with contextlib.suppress(Exception):
                    self.report.write(self.report_path)
                self.tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            gc.enable()

    def _finish(self, last_ckpt: Path) -> TrainResult:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from apt_model.checkpoint import FINAL_EXPORT, export_pretrained
        from apt_model.io import atomic_write_json, sha256_file
        from apt_model.model import APTModel
        from apt_model.training.loop import RESULT_FILE

        out = self.out_dir
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(last_ckpt.parent), tag=last_ckpt.name)
        model = APTModel(self.prep.model_config)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{last_ckpt}: consolidated weights do not fit the model ({exc})") from None
        export_dir = out / FINAL_EXPORT
        export_pretrained(
            export_dir,
            model,
            self.prep.model_config,
            self.tok,
            extra_configs={
                "train_config": self.cfg.to_dict(),
                "data_config": self.request.data.to_dict(),
                "deepspeed_config": self.ds_config,
            },
        )
        self.report.finish(
            epochs_completed=self.epoch,
            global_step=self.global_step,
            dbc_dac=self.dbc.summary() if self.dbc is not None else None,
            train_seconds=self.train_seconds,
            final_model=str(export_dir),
            export_dir=str(export_dir),
        )
        self.report.write(self.report_path)
        self.tracker.log_artifact(self.report_path)
        self.tracker.log_artifact(export_dir, artifact_path=FINAL_EXPORT)
        self.tracker.end("FINISHED")
        sha = {
            f"{FINAL_EXPORT}/{p.name}": sha256_file(p) for p in sorted(export_dir.iterdir()) if p.is_file()
        }
        metrics = {
            k: float(v)
            for k, v in self.report.final.items()
            if k in ("train_loss", "val_loss", "val_token_acc", "best_val_loss", "train_seconds")
            and isinstance(v, int | float)
        }
        result = TrainResult(
            backend="deepspeed",
            out_dir=str(out),
            final_model=str(export_dir),
            export_dir=str(export_dir),
            report=str(self.report_path),
            last_checkpoint=str(last_ckpt),
            epochs_completed=self.epoch,
            global_step=self.global_step,
            metrics=metrics,
            sha256=sha,
            mlflow_run_id=self.tracker.run_id,
            extra={
                "world_size": self.world,
                "zero_stage": self.zero_stage,
                "precision": self.precision,
                "offload": bool(self.meta.get("offload")),
                "compiled": self.compiled,
                "transform_kernel": self.prep.transform_kernel,
                "train_batch_size": self.micro * self.accum * self.world,
                "device": self.device.type,
                "dataset_sha256": self.prep.dataset_sha256,
                "skipped_steps": self.report.final["skipped_steps"],
                "tracking_uri": self.tracker.uri,
                "tracking_error": self.tracker.error,
            },
        )
        atomic_write_json(out / RESULT_FILE, result.to_dict())
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepspeed_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--request", type=Path, required=True, help="request.json written by the backend")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    payload = json.loads(args.request.read_text(encoding="utf-8"))
    request = TrainRequest.from_dict(payload)
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    _watch_parent()
    worker = Worker(request, payload.get("deepspeed") or {})
    try:
        worker.run()
        return 0
    except BaseException as exc:
        _write_error(Path(request.out_dir), exc, worker.rank)
        if isinstance(exc, AptError):
            log.error("error: %s", str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
            return 2
        raise
    finally:
        with contextlib.suppress(Exception):
            import deepspeed.comm

            if deepspeed.comm.is_initialized():
                deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
