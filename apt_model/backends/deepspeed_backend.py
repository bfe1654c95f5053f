"""The DeepSpeed backend: data-parallel training over several GPUs (or CPU processes) with ZeRO 1/2/3.

``train`` validates everything, writes ``deepspeed_config.json`` and ``request.json`` into the save dir and starts
``apt_model.backends.deepspeed_worker`` on every rank as a **subprocess in its own process group** — through
``torchrun --nproc_per_node N`` on one host, or DeepSpeed's own launcher (``deepspeed --hostfile H --num_gpus N``)
when ``--hostfile`` (or ``launcher="deepspeed"``) is given. Rank 0's output is streamed line by line to the
``apt_model.backends.deepspeed`` logger; a ``KeyboardInterrupt``, SIGTERM, :meth:`DeepSpeedBackend.cancel` or the
``timeout`` option kills the whole process group (SIGTERM, then SIGKILL after a grace period); the workers also
exit by themselves when the launching process disappears. Nothing here imports DeepSpeed: only the worker does.

Flags (``apt train --backend deepspeed``) → ``TrainRequest.options``:

* ``--num-gpus N`` (``num_gpus``): processes per host; default all CUDA devices, 1 on CPU. More than exist
  (``torch.cuda.device_count()`` with CUDA, ``os.cpu_count()`` on CPU) is an error (without ``--hostfile``).
* ``--zero-stage 1|2|3`` (``zero_stage``, default 2); ``--cpu-offload``: optimizer state to pinned CPU memory at
  stage ≥ 2, parameters too at stage 3 (at stage 1 it is an error).
* ``--fp16`` (dynamic loss scaling: ``loss_scale 0``, window 1000) / ``--bf16``; neither → ``TrainConfig.precision``
  (auto = bf16 on CUDA that supports it, else fp16; fp32 on CPU).
* ``--train-batch-size B`` (global): the micro batch per rank is ``B / (world size × gradient accumulation)``
  and must be a whole number; without it ``B = batch_size × gradient_accumulation × world size``.
  ``--gradient-accumulation`` is the common ``apt train`` flag (``TrainConfig.grad_accum``).
* ``--deepspeed-config FILE``: a DeepSpeed JSON config used instead of the generated one (its batch, precision
  and ZeRO settings win; missing batch keys and ``gradient_clipping`` are filled from the run's config; an
  ``optimizer`` or ``scheduler`` section is refused: the backend passes AdamW and the warm-restart schedule).
* ``--load-checkpoint DIR`` (or ``TrainRequest.resume`` naming a checkpoint directory): resume exactly.
* ``--compile on`` (ZeRO 1-2): the model's forward and backward through ``torch.compile`` on one fixed padded
  shape, validation eager; ``auto`` (the default) stays eager under DeepSpeed until this path is measured on GPUs.
* ``--bind-cores``: each rank pinned to its own contiguous share of the host's physical cores (with their
  hyperthreads), so ranks neither migrate nor share cores; rank 0's CPUs are recorded in the report's runtime.
* ``--hostfile FILE`` (several hosts; DeepSpeed launcher, needs pdsh and a shared filesystem), ``--master-port``,
  ``timeout`` (seconds), ``overwrite`` and ``launcher`` (``torchrun`` | ``deepspeed``) options; ``progress`` is
  accepted for parity with the Playground and has no effect (workers print one line per epoch).

Outputs in the save dir: ``deepspeed_config.json``, ``request.json``, ``checkpoint_epoch_{N}/`` (DeepSpeed's model
and ZeRO optimizer shards written by **all** ranks, plus ``tokenizer_state.json``, ``apt_state.pt`` — epoch, step,
schedule, DBC-DAC and history — and ``rng_rank{R}.pt``), ``latest``, ``zero_to_fp32.py``,
``experiment_report.json``, ``final_model/`` (consolidated fp32 export: config.json + model.safetensors +
tokenizer.json, loadable by ``load_model`` / ``apt verify``) and ``train_result.json``. The semantics of a step
(objective, token-weighted accumulation, schedule, clipping, DBC-DAC) are those of ``apt_model.training.loop``;
see ``deepspeed_worker`` for how they map onto the DeepSpeed engine and how data is sharded.

Trust: DeepSpeed loads its checkpoint files with full unpickling. Before resuming, every ``.pt`` file of the
checkpoint directory is first opened with ``torch.load(weights_only=True)`` (plus an allow-list of the few
DeepSpeed classes its checkpoints hold); a file holding anything else is refused (``CheckpointError``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apt_model.backends import TrainRequest, TrainResult
from apt_model.errors import AptError, CheckpointError, ConfigError, DataError
from apt_model.io import file_lock

log = logging.getLogger("apt_model.backends.deepspeed")

OPTION_KEYS = (
    "num_gpus",
    "zero_stage",
    "cpu_offload",
    "fp16",
    "bf16",
    "train_batch_size",
    "deepspeed_config",
    "load_checkpoint",
    "hostfile",
    "master_port",
    "timeout",
    "overwrite",
    "launcher",
    "progress",
    "bind_cores",
)
LAUNCHERS = ("torchrun", "deepspeed")
ZERO_STAGES = (1, 2, 3)
DS_CONFIG_FILE = "deepspeed_config.json"
REQUEST_FILE = "request.json"
ERROR_FILE = ".deepspeed_error.json"
TOKENIZER_STATE = "tokenizer_state.json"
APT_STATE = "apt_state.pt"
RNG_STATE = "rng_rank{rank}.pt"
CHECKPOINT_DIR = "checkpoint_epoch_{epoch}"
EPOCH_LINE = "@@apt-epoch "  # worker → launcher: one JSON epoch row per line (for TrainRequest.on_epoch)
PARENT_PID_ENV = "APT_DS_PARENT_PID"
KILL_GRACE_S = 10.0
# The AptError subclasses a worker failure is re-raised as in the launching process.
ERROR_TYPES: dict[str, type[AptError]] = {"ConfigError": ConfigError, "DataError": DataError}
ERROR_TYPES["CheckpointError"] = CheckpointError


class TrainingCancelled(RuntimeError):
    """The run was cancelled (``DeepSpeedBackend.cancel``) or ran past its ``timeout``; the workers were killed."""


@dataclass
class DSPlan:
    """The resolved distributed settings of a run (everything validated, nothing written)."""

    world_size: int
    nproc_per_node: int
    n_nodes: int
    zero_stage: int
    offload: bool
    precision: str  # fp32 | bf16 | fp16
    micro_batch: int
    grad_accum: int
    train_batch_size: int
    config: dict[str, Any]  # the DeepSpeed config to write
    launcher: str
    cuda: bool
    compiled: bool = False  # the model's forward/backward through torch.compile (fixed padded shapes)
    resume_dir: Path | None = None
    resume_epoch: int = 0
    hostfile: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ validation


def _int_option(opts: dict[str, Any], key: str, *, minimum: int = 1) -> int | None:
    value = opts.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"deepspeed backend: option {key} must be an integer >= {minimum} (got {value!r})")
    return value


def parse_hostfile(path: Path) -> dict[str, int]:
    """``host slots=N`` lines (DeepSpeed's format; ``#`` comments) → {host: slots}."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read hostfile ({exc.__class__.__name__})") from None
    hosts: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if len(parts) != 2 or len(slots) != 1 or not slots[0][6:].isdigit() or int(slots[0][6:]) < 1:
            raise ConfigError(f"{path}:{lineno}: expected 'HOST slots=N' (got {raw.strip()!r})")
        if parts[0] in hosts:
            raise ConfigError(f"{path}:{lineno}: host {parts[0]!r} listed twice")
        hosts[parts[0]] = int(slots[0][6:])
    if not hosts:
        raise ConfigError(f"{path}: hostfile lists no hosts")
    return hosts


def _devices_available() -> tuple[bool, int, str]:
    import torch

    if torch.cuda.is_available():
        return True, torch.cuda.device_count(), "CUDA device(s)"
    return False, os.cpu_count() or 1, "CPU core(s) (no CUDA)"


def _resolve_precision(opts: dict[str, Any], train_precision: str, cuda: bool) -> str:
    if opts.get("fp16") and opts.get("bf16"):
        raise ConfigError("deepspeed backend: --fp16 and --bf16 exclude each other")
    if opts.get("fp16"):
        precision = "fp16"
    elif opts.get("bf16"):
        precision = "bf16"
    elif train_precision == "auto":
        if not cuda:
            return "fp32"
        import torch

        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        precision = train_precision
    if precision == "fp16" and not cuda:
        raise ConfigError("deepspeed backend: fp16 needs CUDA devices (use bf16 or fp32 on CPU)")
    return precision


def _load_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} must be a JSON object")
    return data


def _precision_section(precision: str) -> dict[str, Any]:
    if precision == "fp16":
        # Dynamic loss scaling as in the guide: loss_scale 0 = dynamic, raised after 1000 overflow-free steps.
        return {
            "fp16": {
                "enabled": True,
                "loss_scale": 0,
                "loss_scale_window": 1000,
                "initial_scale_power": 16,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        }
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    return {}


def build_ds_config(
    *,
    zero_stage: int,
    offload: bool,
    precision: str,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    clip_grad_norm: float,
) -> dict[str, Any]:
    """The generated ``deepspeed_config.json``."""
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": clip_grad_norm,
        "zero_optimization": zero,
        # The backend passes torch's AdamW (identical maths to the Playground); with offload DeepSpeed would
        # otherwise insist on its compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        **_precision_section(precision),
    }
    return config


def _plan_from_file(
    path: Path, request: TrainRequest, world: int, cuda: bool
) -> tuple[dict[str, Any], int, bool, str, int, int]:
    config = _load_json_object(path, "DeepSpeed config")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(
                f"{path}: '{section}' section is not supported (the backend passes AdamW and its warm-restart "
                "schedule; set lr/weight decay through the training config)"
            )
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ConfigError(f"{path}: zero_optimization.stage must be 1, 2 or 3 (got {stage!r})")
    offload = any(
        isinstance(zero.get(k), dict) and zero[k].get("device", "none") != "none"
        for k in ("offload_optimizer", "offload_param")
    )
    fp16 = bool((config.get("fp16") or {}).get("enabled"))
    bf16 = bool((config.get("bf16") or config.get("bfloat16") or {}).get("enabled"))
    if fp16 and bf16:
        raise ConfigError(f"{path}: fp16 and bf16 are both enabled")
    precision = "fp16" if fp16 else ("bf16" if bf16 else "fp32")
    if precision == "fp16" and not cuda:
        raise ConfigError(f"{path}: fp16 needs CUDA devices (use bf16 or fp32 on CPU)")
    accum = config.get("gradient_accumulation_steps", request.train.grad_accum)
    micro = config.get("train_micro_batch_size_per_gpu")
    total = config.get("train_batch_size")
    for key, value in (("gradient_accumulation_steps", accum), ("train_micro_batch_size_per_gpu", micro)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{path}: {key} must be a positive integer (got {value!r})")
    if micro is None:
        if total is None:
            micro = request.train.batch_size
        elif not isinstance(total, int) or total % (world * accum):
            raise ConfigError(
                f"{path}: train_batch_size {total!r} is not divisible by GPUs × gradient accumulation "
                f"({world} × {accum})"
            )
        else:
            micro = total // (world * accum)
    if total is not None and total != micro * accum * world:
        raise ConfigError(
            f"{path}: train_batch_size {total} != micro batch {micro} × gradient accumulation {accum} × "
            f"world size {world}"
        )
    config = {
        **config,
        "train_batch_size": micro * accum * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
    }
    config.setdefault("gradient_clipping", request.train.clip_grad_norm)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("zero_allow_untested_optimizer", True)
    return config, stage, offload, precision, micro, accum


def _bool_option(opts: dict[str, Any], key: str) -> bool:
    value = opts.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"deepspeed backend: option {key} must be true or false (got {value!r})")
    return value


def resolve_plan(request: TrainRequest) -> DSPlan:
    """Validate the DeepSpeed options of ``request``; raises ``ConfigError`` (one line). Writes nothing."""
    opts = request.options
    unknown = sorted(set(opts) - set(OPTION_KEYS))
    if unknown:
        raise ConfigError(f"deepspeed backend: unknown option(s) {', '.join(unknown)}")
    for key in ("cpu_offload", "fp16", "bf16", "overwrite", "progress", "bind_cores"):
        _bool_option(opts, key)
    launcher = opts.get("launcher") or ("deepspeed" if opts.get("hostfile") else "torchrun")
    if launcher not in LAUNCHERS:
        raise ConfigError(
            f"deepspeed backend: launcher must be one of {', '.join(LAUNCHERS)} (got {launcher!r})"
        )
    cuda, available, unit = _devices_available()
    num_gpus = _int_option(opts, "num_gpus")
    hostfile = Path(opts["hostfile"]) if opts.get("hostfile") else None
    if hostfile is not None:
        if launcher != "deepspeed":
            raise ConfigError("deepspeed backend: --hostfile needs the deepspeed launcher")
        hosts = parse_hostfile(hostfile)
        per_node = [min(slots, num_gpus) if num_gpus else slots for slots in hosts.values()]
        world, n_nodes, nproc = sum(per_node), len(hosts), max(per_node)
    else:
        nproc = num_gpus if num_gpus is not None else (available if cuda else 1)
        if nproc > available:
            raise ConfigError(
                f"deepspeed backend: --num-gpus {nproc} but this machine has {available} {unit}"
            )
        world, n_nodes = nproc, 1
    _int_option(opts, "master_port")
    timeout = opts.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        raise ConfigError(
            f"deepspeed backend: option timeout must be a positive number of seconds (got {timeout!r})"
        )

    offload = bool(opts.get("cpu_offload", False))
    if opts.get("deepspeed_config"):
        for flag in ("zero_stage", "train_batch_size", "fp16", "bf16", "cpu_offload"):
            if opts.get(flag):
                raise ConfigError(
                    f"deepspeed backend: --{flag.replace('_', '-')} conflicts with --deepspeed-config "
                    "(set it in the config file)"
                )
        config, stage, offload, precision, micro, accum = _plan_from_file(
            Path(opts["deepspeed_config"]), request, world, cuda
        )
    else:
        stage = opts.get("zero_stage", 2)
        if stage not in ZERO_STAGES or isinstance(stage, bool):
            raise ConfigError(f"deepspeed backend: --zero-stage must be 1, 2 or 3 (got {stage!r})")
        precision = _resolve_precision(opts, request.train.precision, cuda)
        accum = request.train.grad_accum
        total = _int_option(opts, "train_batch_size")
        if total is None:
            micro = request.train.batch_size
        elif total % (world * accum):
            raise ConfigError(
                f"deepspeed backend: --train-batch-size {total} is not divisible by GPUs × gradient "
                f"accumulation ({world} × {accum} = {world * accum})"
            )
        else:
            micro = total // (world * accum)
        config = build_ds_config(
            zero_stage=stage,
            offload=offload,
            precision=precision,
            micro_batch=micro,
            grad_accum=accum,
            world_size=world,
            clip_grad_norm=request.train.clip_grad_norm,
        )
    if offload and stage < 2:
        raise ConfigError(
            f"deepspeed backend: CPU offload needs ZeRO stage 2 or 3 (got stage {stage}); "
            "offload moves the optimizer state (stage >= 2) and the parameters (stage 3)"
        )
    compile_opt = request.train.compile
    if compile_opt == "on" and stage == 3:
        raise ConfigError(
            "deepspeed backend: --compile on needs ZeRO stage 1 or 2 (ZeRO-3 gathers each parameter in module "
            "hooks that torch.compile does not trace); use --compile auto or off"
        )
    # Opt-in for now: ``auto`` stays eager under DeepSpeed until the compiled path has been measured on GPUs (it
    # is tested on CPU ranks). Why it exists: the eager step is host-bound (thousands of small kernel launches),
    # which is also what desynchronises the ranks at each collective (BENCHMARKS.md, DeepSpeed profile).
    compiled = compile_opt == "on"
    return DSPlan(
        world_size=world,
        nproc_per_node=nproc,
        n_nodes=n_nodes,
        zero_stage=stage,
        offload=offload,
        precision=precision,
        micro_batch=micro,
        grad_accum=accum,
        train_batch_size=micro * accum * world,
        config=config,
        launcher=launcher,
        cuda=cuda,
        compiled=compiled,
        hostfile=hostfile,
    )


def resume_dir(request: TrainRequest) -> Path | None:
    """The DeepSpeed checkpoint directory to resume from (``load_checkpoint`` option or a directory ``resume``)."""
    if request.options.get("load_checkpoint"):
        if request.resume is not None:
            raise ConfigError("deepspeed backend: give --load-checkpoint or --resume, not both")
        return Path(request.options["load_checkpoint"])
    if request.resume is not None:
        if not Path(request.resume).is_dir():
            raise CheckpointError(
                f"{request.resume}: the deepspeed backend resumes from a checkpoint_epoch_N/ directory "
                "(--load-checkpoint DIR), not a file"
            )
        return Path(request.resume)
    return None


def worker_request(
    request: TrainRequest, micro_batch: int, grad_accum: int, device: str, *, compiled: bool = False
) -> TrainRequest:
    """The request that ``training.loop.prepare`` validates/loads for one rank: no file resume (DeepSpeed
    checkpoints are directories, checked by ``check_resume``), the effective batch shape and precision; a compiled
    model gets one fixed padded shape (no recompilation per length)."""
    from dataclasses import replace

    train = request.train.replace(
        batch_size=micro_batch,
        grad_accum=grad_accum,
        compile="off",
        precision="fp32",  # DeepSpeed owns precision (its fp16/bf16 sections); prepare() must not autocast
    )
    options = {
        "device": device,
        "pad": "fixed" if compiled else "bucket",
        "overwrite": True,
        "progress": False,
    }
    return replace(request, train=train, resume=None, options=options, on_epoch=None)


# DeepSpeed checkpoint files hold these classes besides tensors and primitives.
def _ds_safe_globals() -> list[Any]:
    import argparse as _argparse
    import collections

    found: list[Any] = [collections.OrderedDict, _argparse.Namespace, set]
    for module, names in (
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
        ("deepspeed.checkpoint.constants", ()),
    ):
        with contextlib.suppress(ImportError):
            mod = __import__(module, fromlist=list(names) or ["__name__"])
            found.extend(getattr(mod, n) for n in names if hasattr(mod, n))
    return found


def check_checkpoint_files(directory: Path) -> None:
    """Open every ``.pt`` file of a DeepSpeed checkpoint with the safe loader (``weights_only=True`` plus
    DeepSpeed's own classes) so that DeepSpeed's unpickling loader only ever sees plain data."""
    import torch

    files = sorted(directory.glob("*.pt"))
    if not files:
        raise CheckpointError(f"{directory}: no DeepSpeed checkpoint files (*.pt) in the directory")
    with torch.serialization.safe_globals(_ds_safe_globals()):
        for path in files:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
                raise CheckpointError(
                    f"{path}: refused by the safe loader, not resuming from it ({first[:200]})"
                ) from None


def load_apt_state(directory: Path) -> dict[str, Any]:
    import torch

    path = directory / APT_STATE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not an APT DeepSpeed checkpoint ({APT_STATE} missing)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"{path}: cannot load ({first[:200]})") from None
    for key in ("epoch", "global_step", "model_config", "world_size", "dataset_sha256"):
        if key not in state:
            raise CheckpointError(f"{path}: holds no {key}; cannot resume")
    return state


def check_resume(directory: Path, request: TrainRequest, plan: DSPlan, prep: Any) -> dict[str, Any]:
    """Everything about a resume that can be checked before launching; returns the checkpoint's APT state."""
    from apt_model.config import ModelConfig

    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    state = load_apt_state(directory)
    ckpt_config = ModelConfig.from_dict(state["model_config"])
    if ckpt_config != prep.model_config:
        diff = [
            f"{k}: {v!r} vs checkpoint {ckpt_config.to_dict()[k]!r}"
            for k, v in prep.model_config.to_dict().items()
            if v != ckpt_config.to_dict()[k]
        ]
        raise CheckpointError(
            f"{directory}: requested model config differs from the checkpoint's ({'; '.join(diff[:3])}); "
            "pass the same preset/model flags as the run that wrote it"
        )
    if state["dataset_sha256"] != prep.dataset_sha256:
        raise CheckpointError(
            f"{directory}: checkpoint was trained on dataset sha256 {state['dataset_sha256'][:12]}…, "
            f"but {request.dataset} has {prep.dataset_sha256[:12]}…"
        )
    tok_path = directory / TOKENIZER_STATE
    if not tok_path.is_file() or tok_path.read_text(encoding="utf-8") != prep.tokenizer.to_json():
        raise CheckpointError(f"{tok_path}: missing or not the tokenizer of {request.dataset}")
    if int(state["world_size"]) != plan.world_size:
        raise CheckpointError(
            f"{directory}: written by {state['world_size']} ranks but this run has {plan.world_size}; "
            "resume with the same number of GPUs"
        )
    if int(state.get("zero_stage", plan.zero_stage)) != plan.zero_stage:
        raise CheckpointError(
            f"{directory}: written at ZeRO stage {state.get('zero_stage')} but this run uses stage {plan.zero_stage}"
        )
    if request.train.epochs < int(state["epoch"]):
        raise ConfigError(
            f"TrainConfig.epochs={request.train.epochs} is below the checkpoint's epoch {state['epoch']} ({directory})"
        )
    check_checkpoint_files(directory)
    return state


def existing_run(out_dir: Path) -> list[str]:
    from apt_model.checkpoint import FINAL_EXPORT
    from apt_model.training.report import REPORT_FILE

    if not out_dir.is_dir():
        return []
    found = [p.name for p in (out_dir / REPORT_FILE, out_dir / FINAL_EXPORT) if p.exists()]
    return found + sorted(p.name for p in out_dir.glob("checkpoint_epoch_*") if p.is_dir())


# -------------------------------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(plan: DSPlan, request_path: Path, master_port: int) -> list[str]:
    worker = ["apt_model.backends.deepspeed_worker", "--request", str(request_path)]
    if plan.launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(master_port)]
        if plan.hostfile is not None:
            cmd += ["--hostfile", str(plan.hostfile)]
            if plan.nproc_per_node:
                cmd += ["--num_gpus", str(plan.nproc_per_node)]
        else:
            cmd += ["--num_gpus", str(plan.nproc_per_node)]
        return [*cmd, "--module", *worker]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(plan.nproc_per_node),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(master_port),
        "-m",
        *worker,
    ]


SHM_COMM_EXTENSION = "deepspeed_shm_comm"


def _extension_build_dir(name: str, env: dict[str, str]) -> Path:
    """Where torch builds (and locks) extension ``name`` for a process started with ``env``."""
    from torch.utils import cpp_extension

    root = env.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / name
    return Path(cpp_extension._get_build_directory(name, verbose=False))


def prebuild_cpu_comm(env: dict[str, str], timeout_s: float = 900) -> None:
    """Build DeepSpeed's CPU communication extension in one process before the ranks start.

    On its first use each rank JIT-compiles ``deepspeed_shm_comm`` into ``TORCH_EXTENSIONS_DIR`` under a file lock;
    with several ranks starting together one can hold the lock while blocked in process-group set-up that waits
    for the other, which waits for the lock — a deadlock seen on a fresh extensions folder. Once built, this only
    loads the cached library.

    torch's lock is a plain file that only its holder removes. A build killed by our timeout would leave it behind
    and every later build or load would wait for ever (seen when two test workers shared a fresh folder), so
    prebuilds are serialised by :func:`apt_model.io.file_lock`, and a lock file that appeared during a build we killed is removed.
    """
    code = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)"
    build_dir = _extension_build_dir(SHM_COMM_EXTENSION, env)
    torch_lock = build_dir / "lock"
    with file_lock(build_dir.parent / f".{SHM_COMM_EXTENSION}.apt.lock"):
        lock_was_there = torch_lock.exists()
        try:
            done = subprocess.run(
                [sys.executable, "-c", code],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            # subprocess.run has killed the builder; the lock it held would block every later build.
            if not lock_was_there:
                torch_lock.unlink(missing_ok=True)
            raise TrainingCancelled(
                f"timeout: building DeepSpeed's CPU communication extension took over {timeout_s:.0f} s"
            ) from None
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"cannot build DeepSpeed's CPU communication extension: {last[0]}")


def launch_env(plan: DSPlan) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env[PARENT_PID_ENV] = str(os.getpid())
    env["PYTHONUNBUFFERED"] = "1"
    if not plan.cuda:
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def kill_group(proc: subprocess.Popen[str], grace: float = KILL_GRACE_S) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL it if it has not exited within ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class _Terminated(BaseException):
    """SIGTERM reached the launching process while the workers ran."""


class DeepSpeedBackend:
    name = "deepspeed"
    summary = "several GPUs (or CPU processes): ZeRO 1/2/3, CPU offload, fp16/bf16, sharded data"
    extra: str | None = "deepspeed"

    def __init__(self) -> None:
        self._prepared: tuple[str, DSPlan, Any] | None = None
        self._cancel = threading.Event()

    # -- flags -------------------------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--num-gpus", type=int, default=None, help="deepspeed: processes (GPUs) per host")
        parser.add_argument(
            "--zero-stage", type=int, default=None, help="deepspeed: ZeRO stage 1, 2 (default) or 3"
        )
        parser.add_argument(
            "--cpu-offload",
            action="store_true",
            help="deepspeed: optimizer state to CPU (stage >= 2), parameters too at stage 3",
        )
        parser.add_argument("--fp16", action="store_true", help="fp16 mixed precision (dynamic loss scaling)")
        parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
        parser.add_argument(
            "--train-batch-size",
            type=int,
            default=None,
            help="deepspeed: global batch = micro batch × gradient accumulation × GPUs",
        )
        parser.add_argument(
            "--deepspeed-config", type=Path, default=None, help="deepspeed: a DeepSpeed JSON config"
        )
        parser.add_argument(
            "--load-checkpoint",
            type=Path,
            default=None,
            help="deepspeed: checkpoint_epoch_N/ directory to resume",
        )
        parser.add_argument(
            "--hostfile",
            type=Path,
            default=None,
            help="deepspeed: hosts file (several hosts; DeepSpeed launcher)",
        )
        parser.add_argument(
            "--master-port", type=int, default=None, help="deepspeed: rendezvous port (default free)"
        )
        parser.add_argument(
            "--bind-cores",
            action="store_true",
            help="deepspeed: pin each rank to its own share of the host's CPU cores",
        )

    def options_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        for key in ("num_gpus", "zero_stage", "train_batch_size", "master_port"):
            if getattr(args, key, None) is not None:
                opts[key] = getattr(args, key)
        for key in ("cpu_offload", "fp16", "bf16", "bind_cores"):
            if getattr(args, key, False):
                opts[key] = True
        for key in ("deepspeed_config", "load_checkpoint", "hostfile"):
            if getattr(args, key, None) is not None:
                opts[key] = str(getattr(args, key))
        if getattr(args, "overwrite", False):
            opts["overwrite"] = True
        return opts

    # -- validation --------------------------------------------------------------------------------------------
    @staticmethod
    def _key(request: TrainRequest) -> str:
        return json.dumps(request.to_dict(), sort_keys=True, default=str)

    def validate(self, request: TrainRequest) -> None:
        from apt_model.training.loop import prepare

        if request.train.cuda_graphs != "auto":
            raise ConfigError(
                "deepspeed backend: --cuda-graphs is the playground backend's (DeepSpeed's engine runs the step); "
                "leave it at auto"
            )
        plan = resolve_plan(request)
        directory = resume_dir(request)
        out_dir = Path(request.out_dir)
        if directory is None and not request.options.get("overwrite"):
            existing = existing_run(out_dir)
            if existing:
                raise ConfigError(
                    f"{out_dir}: save dir already holds a run ({', '.join(existing[:3])}); "
                    "resume it with --load-checkpoint, pick another dir, or pass overwrite"
                )
        prep = prepare(
            worker_request(request, plan.micro_batch, plan.grad_accum, "cpu", compiled=plan.compiled)
        )
        if directory is not None:
            state = check_resume(directory, request, plan, prep)
            plan.resume_dir = directory
            plan.resume_epoch = int(state["epoch"])
        n_batches = -(-len(prep.train_examples) // plan.micro_batch)
        if n_batches < plan.world_size:
            raise DataError(
                f"{request.dataset}: {len(prep.train_examples)} training pairs make {n_batches} micro batch(es) "
                f"of {plan.micro_batch}, fewer than the {plan.world_size} ranks"
            )
        self._prepared = (self._key(request), plan, prep)

    # -- running -----------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop a running ``train`` from another thread: the workers' process group is killed."""
        self._cancel.set()

    def train(self, request: TrainRequest) -> TrainResult:
        from apt_model.io import atomic_write_json

        if self._prepared is None or self._prepared[0] != self._key(request):
            self.validate(request)
        assert self._prepared is not None
        _, plan, _prep = self._prepared
        self._prepared = None
        self._cancel.clear()
        out_dir = Path(request.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (out_dir / ERROR_FILE).unlink()
        config_path = out_dir / DS_CONFIG_FILE
        atomic_write_json(config_path, plan.config)
        payload = request.to_dict()
        # Absolute paths: the workers may start elsewhere (another host of a hostfile, another cwd).
        payload["dataset"] = str(Path(request.dataset).resolve())
        payload["out_dir"] = str(out_dir.resolve())
        payload["options"] = {**payload["options"], "deepspeed_config": str(config_path.resolve())}
        payload["resume"] = str(plan.resume_dir.resolve()) if plan.resume_dir else None
        payload["options"].pop("load_checkpoint", None)
        payload["deepspeed"] = {
            "world_size": plan.world_size,
            "zero_stage": plan.zero_stage,
            "precision": plan.precision,
            "offload": plan.offload,
            "launcher": plan.launcher,
            "compiled": plan.compiled,
        }
        request_path = out_dir / REQUEST_FILE
        atomic_write_json(request_path, payload)
        port = int(request.options.get("master_port") or free_port())
        cmd = launch_command(plan, request_path.resolve(), port)
        log.info(
            "deepspeed: %d rank(s), ZeRO-%d%s, %s, micro batch %d × accumulation %d → global batch %d",
            plan.world_size,
            plan.zero_stage,
            " + CPU offload" if plan.offload else "",
            plan.precision,
            plan.micro_batch,
            plan.grad_accum,
            plan.train_batch_size,
        )
        env = launch_env(plan)
        if not plan.cuda and plan.world_size > 1:
            budget = request.options.get("timeout")
            started = time.monotonic()
            prebuild_cpu_comm(env, timeout_s=float(budget) if budget else 900.0)
            if budget:  # the build counts against the run's timeout
                left = max(0.001, float(budget) - (time.monotonic() - started))
                request = dataclasses.replace(request, options={**request.options, "timeout": left})
        self._run(cmd, env, request)
        from apt_model.training.loop import RESULT_FILE

        result_path = out_dir / RESULT_FILE
        data = json.loads(result_path.read_text(encoding="utf-8"))
        return TrainResult(**data)

    def _run(self, cmd: list[str], env: dict[str, str], request: TrainRequest) -> None:
        timeout = request.options.get("timeout")
        deadline = time.monotonic() + float(timeout) if timeout else None
        out_dir = Path(request.out_dir)
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=env,
            start_new_session=True,  # its own process group: killed as a whole
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def _reader() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=_reader, name="deepspeed-output", daemon=True)
        reader.start()
        previous = None
        if threading.current_thread() is threading.main_thread():

            def _on_term(signum: int, frame: Any) -> None:
                raise _Terminated()

            previous = signal.signal(signal.SIGTERM, _on_term)
        tail: list[str] = []
        try:
            while True:
                if self._cancel.is_set():
                    raise TrainingCancelled("deepspeed run cancelled; workers killed")
                if deadline is not None and time.monotonic() > deadline:
                    raise TrainingCancelled(
                        f"deepspeed run exceeded its timeout of {timeout}s; workers killed"
                    )
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    continue
                if line is None:
                    break
                self._handle_line(line.rstrip("\n"), request, tail)
            rc = proc.wait()
        except BaseException:
            kill_group(proc)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if rc != 0:
            self._raise_worker_error(out_dir, rc, tail)

    @staticmethod
    def _handle_line(line: str, request: TrainRequest, tail: list[str]) -> None:
        if line.startswith(EPOCH_LINE):
            if request.on_epoch is not None:
                try:
                    request.on_epoch(json.loads(line[len(EPOCH_LINE) :]))
                except Exception:  # a progress consumer must not kill training
                    log.warning("on_epoch callback failed", exc_info=True)
            return
        tail.append(line)
        del tail[:-40]
        log.info("%s", line)

    @staticmethod
    def _raise_worker_error(out_dir: Path, rc: int, tail: list[str]) -> None:
        err_path = out_dir / ERROR_FILE
        if err_path.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                err = json.loads(err_path.read_text(encoding="utf-8"))
                message = str(err.get("message", "")).splitlines()[0] if err.get("message") else ""
                kind = str(err.get("type", ""))
                if kind == "TrainingDivergedError":
                    from apt_model.training.loop import TrainingDivergedError

                    raise TrainingDivergedError(message)
                raise ERROR_TYPES.get(kind, RuntimeError)(message or f"deepspeed worker failed ({kind})")
        last = next((t for t in reversed(tail) if t.strip()), "")
        raise RuntimeError(f"deepspeed workers exited with status {rc}: {last[:300]}")
