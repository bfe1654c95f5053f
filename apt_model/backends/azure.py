"""The Azure ML backend: train in an Azure ML workspace, follow the job, fetch the model into the local layout.

What one ``train`` does (see docs/AZURE.md for the walk-through):

1. Validate everything locally (options, configs, dataset, checkpoint, workspace coordinates) — ``prepare`` of the
   shared loop loads the dataset and tokenizer exactly as the remote run will.
2. Credentials: ``azure.identity.DefaultAzureCredential`` (az login, environment service principal, managed
   identity…), created lazily and asked for one token *before* anything is built or uploaded, so a missing login is
   one ``ConfigError``. Nothing secret goes into parameters, the job, logs or the result.
3. The job runs the project's own entry point, ``python -m apt_model train``, from a code snapshot that holds only
   the ``apt_model`` package, ``pyproject.toml``, ``constraints.txt`` and a generated ``apt_job_config.json``
   (the request's model/train/data configs). The dataset is a ``uri_file`` input, the save dir is the ``model``
   ``uri_folder`` output, the environment is a conda spec generated from ``pyproject.toml`` pinned by
   ``constraints.txt`` on a CUDA base image. One GPU → ``--backend playground``; several GPUs or nodes →
   ``--backend deepspeed`` launched by ``PyTorchDistribution`` (one process per GPU, ``instance_count`` nodes).
   Azure sets ``MLFLOW_TRACKING_URI`` in the job; the ``Tracker`` reads it, so metrics land in the workspace.
4. ``--sweep`` wraps the command in a sweep job over the guide's space (batch {8,16,32}, d_model {128,256,512},
   layers {4,6,8} for encoder and decoder, lr U(1e-5, 1e-3), weight decay U(0.001, 0.1)), random sampling, primary
   metric ``val_loss`` minimized, limits and optional early termination.
5. Submission is idempotent: the job name is a hash of (configs, dataset sha256, code snapshot hash, job shape).
   A retried task finds the job with ``jobs.get`` and re-attaches instead of submitting twice; a job that already
   failed or was cancelled gets a new attempt (``<name>-2``, …). The name is recorded in ``<out_dir>/azure_job.json``.
6. Follow: poll the status (transient network / 5xx / 429 errors are retried with exponential backoff). A local
   cancel (``KeyboardInterrupt``, task cancellation) cancels the Azure job.
7. Fetch: download the ``model`` output (for a sweep, the best trial's) and install it as the local run layout
   (``final_model.pt``, ``final_model/``, ``experiment_report.json``, checkpoints), checking every file against the
   remote run's sha256 manifest, so ``apt verify`` and the rest of the pipeline continue locally. The result's
   ``extra`` carries the job name and its Studio URL.

``--dry-run`` needs no credentials: it writes the code snapshot, the job YAML (command or sweep), the compute YAML
and the conda spec into ``--job-out`` (default ``<save-dir>/azure_job``); the YAML loads with
``azure.ai.ml.load_job`` and can be submitted with ``az ml job create -f``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from apt_model.backends import TrainRequest, TrainResult
from apt_model.errors import AptError, CheckpointError, ConfigError
from apt_model.io import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    dumps_json,
    sha256_bytes,
    sha256_file,
)
from apt_model.training.tracking import DISABLED_URIS

log = logging.getLogger("apt_model.backends.azure")

T = TypeVar("T")

DEFAULT_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04"
JOB_STATE_FILE = "azure_job.json"
JOB_CONFIG_FILE = "apt_job_config.json"
REMOTE_RESULT_FILE = "remote_train_result.json"
MODEL_OUTPUT = "model"
PRIMARY_METRIC = "val_loss"  # tracking.METRIC_KEYS: logged once per evaluated epoch
ENV_SUBSCRIPTION = "AZURE_SUBSCRIPTION_ID"
ENV_RESOURCE_GROUP = "AZURE_RESOURCE_GROUP"
ENV_WORKSPACE = "AZUREML_WORKSPACE_NAME"
ARM_SCOPE = "https://management.azure.com/.default"
MAX_ATTEMPTS = 10

# The guide's sweep space. Each key is an input of the command and a flag of `apt train`.
SWEEP_CHOICES: dict[str, tuple[int, ...]] = {
    "batch_size": (8, 16, 32),
    "d_model": (128, 256, 512),
    "n_layers": (4, 6, 8),
}
SWEEP_UNIFORM: dict[str, tuple[float, float]] = {"lr": (1e-5, 1e-3), "weight_decay": (0.001, 0.1)}
SWEEP_FLAGS = {
    "batch_size": "--batch-size",
    "d_model": "--d-model",
    "n_layers": "--n-layers",
    "lr": "--lr",
    "weight_decay": "--weight-decay",
}

# Azure ML job states (azure.ai.ml.operations._run_history_constants.JobStatus).
COMPLETED = "Completed"
RETRYABLE_END = ("Failed", "Canceled", "NotResponding", "Paused")
TERMINAL = (COMPLETED, *RETRYABLE_END)

# Only the package and two top-level files are copied, so top-level data/, runs/, .venv, .git never enter; inside
# the package, caches and run products (if someone saved one there) are skipped. (apt_model/data is code.)
SNAPSHOT_SKIP_DIRS = frozenset(
    {
        "__pycache__",
        ".git",
        ".venv",
        "venv",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".ipynb_checkpoints",
        "checkpoints",
        "runs",
        "mlruns",
        "mlartifacts",
        "wandb",
    }
)
SNAPSHOT_SKIP_SUFFIXES = (".pyc", ".pyo", ".pt", ".pth", ".safetensors", ".db", ".ckpt", ".tmp")
SNAPSHOT_TOP_FILES = ("pyproject.toml", "constraints.txt")
# Packages of the optional extras that the remote run needs: the MLflow plugin for Azure's azureml:// tracking URI,
# and DeepSpeed when the job is distributed.
JOB_EXTRA_PACKAGES = {"azure": ("azureml-mlflow",)}

_EXPERIMENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")
_NAME_RE = re.compile(r"[-_.]+")


class AzureJobError(AptError):
    """The Azure ML job ended in a state other than Completed (running the same request again makes a new attempt)."""


# ------------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class AzureOptions:
    """``TrainRequest.options`` of the azure backend, with the guide's defaults."""

    subscription_id: str | None = None
    resource_group: str | None = None
    workspace_name: str | None = None
    compute_name: str = "gpu-cluster"
    vm_size: str = "Standard_NC6s_v3"
    max_nodes: int = 4
    idle_seconds: int = 900
    experiment_name: str | None = None  # default: TrainRequest.experiment
    instance_count: int = 1
    gpus_per_node: int = 1
    image: str = DEFAULT_IMAGE
    sweep: bool = False
    max_total_trials: int = 20
    max_concurrent_trials: int = 4
    sweep_timeout: int = 6 * 3600
    early_termination: str = "none"  # none | bandit | median
    dry_run: bool = False
    job_out: str | None = None  # default: <out_dir>/azure_job
    poll_seconds: float = 30.0
    retries: int = 6

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> AzureOptions:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"azure backend: unknown option(s) {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for key, value in options.items():
            kind = str(known[key].type)
            if value is None and "None" in kind:
                values[key] = None
            elif kind.startswith("bool"):
                if not isinstance(value, bool):
                    raise ConfigError(f"options.{key}: expected true/false (got {value!r})")
                values[key] = value
            elif kind.startswith("int"):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"options.{key}: expected an integer (got {value!r})")
                values[key] = value
            elif kind.startswith("float"):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"options.{key}: expected a number (got {value!r})")
                values[key] = float(value)
            else:
                if isinstance(value, os.PathLike):
                    value = os.fspath(value)
                if not isinstance(value, str) or not value.strip():
                    raise ConfigError(f"options.{key}: expected a non-empty string (got {value!r})")
                values[key] = value.strip()
        opts = cls(**values)
        opts._check()
        return opts

    def _check(self) -> None:
        def need(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"options.{key}: {message} (got {getattr(self, key)!r})")

        need(self.max_nodes >= 1, "max_nodes", "must be at least 1")
        need(self.idle_seconds >= 0, "idle_seconds", "must be >= 0")
        need(self.instance_count >= 1, "instance_count", "must be at least 1")
        need(
            self.instance_count <= self.max_nodes,
            "instance_count",
            f"exceeds the cluster's max_nodes={self.max_nodes}",
        )
        need(self.gpus_per_node >= 1, "gpus_per_node", "must be at least 1")
        need(self.max_total_trials >= 1, "max_total_trials", "must be at least 1")
        need(
            1 <= self.max_concurrent_trials <= self.max_total_trials,
            "max_concurrent_trials",
            "must be between 1 and max_total_trials",
        )
        need(self.sweep_timeout >= 60, "sweep_timeout", "must be at least 60 seconds")
        need(
            self.early_termination in ("none", "bandit", "median"),
            "early_termination",
            "must be none|bandit|median",
        )
        need(self.poll_seconds >= 0, "poll_seconds", "must be >= 0")
        need(self.retries >= 0, "retries", "must be >= 0")
        need(
            bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{1,31}", self.compute_name)),
            "compute_name",
            "must be 2-32 letters, digits or dashes, starting with a letter",
        )
        if self.experiment_name is not None:
            need(
                bool(_EXPERIMENT_RE.match(self.experiment_name)),
                "experiment_name",
                "must be letters, digits, '_', '-' or '.'",
            )

    @property
    def distributed(self) -> bool:
        return self.instance_count * self.gpus_per_node > 1

    def workspace(self) -> tuple[str, str, str]:
        """(subscription, resource group, workspace) from the options or the environment; one error naming what's missing."""
        values = (
            ("--subscription-id", ENV_SUBSCRIPTION, self.subscription_id or os.environ.get(ENV_SUBSCRIPTION)),
            (
                "--resource-group",
                ENV_RESOURCE_GROUP,
                self.resource_group or os.environ.get(ENV_RESOURCE_GROUP),
            ),
            ("--workspace-name", ENV_WORKSPACE, self.workspace_name or os.environ.get(ENV_WORKSPACE)),
        )
        missing = [f"{flag} (or {env})" for flag, env, value in values if not (value and value.strip())]
        if missing:
            raise ConfigError(f"azure backend: the Azure ML workspace is not set: give {', '.join(missing)}")
        return tuple(v.strip() for _, _, v in values)  # type: ignore[return-value,union-attr]


# --------------------------------------------------------------------------------------- snapshot + environment


def repo_root() -> Path:
    """The folder holding the ``apt_model`` package, ``pyproject.toml`` and ``constraints.txt``."""
    import apt_model

    return Path(apt_model.__file__).resolve().parent.parent


def snapshot_files(root: Path) -> list[tuple[str, Path]]:
    """(path inside the snapshot, source) for every file the job needs, sorted; nothing else."""
    missing = [name for name in (*SNAPSHOT_TOP_FILES, "apt_model/__init__.py") if not (root / name).is_file()]
    if missing:
        raise ConfigError(
            f"azure backend: cannot build the code snapshot: {', '.join(missing)} not found under {root} "
            "(run from a source checkout of the project)"
        )
    out = [(name, root / name) for name in SNAPSHOT_TOP_FILES]
    package = root / "apt_model"
    for dirpath, dirnames, filenames in os.walk(package):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in SNAPSHOT_SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info")
        )
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(SNAPSHOT_SKIP_SUFFIXES):
                continue
            src = Path(dirpath) / name
            out.append((src.relative_to(root).as_posix(), src))
    return sorted(out)


def code_hash(files: list[tuple[str, Path]], generated: dict[str, bytes]) -> str:
    """Content hash of the snapshot (paths + bytes), independent of where or when it is built."""
    entries = [(rel, sha256_file(src)) for rel, src in files]
    entries += [(rel, sha256_bytes(data)) for rel, data in generated.items()]
    return sha256_bytes(dumps_json(sorted(entries)).encode("utf-8"))


def build_snapshot(dest: Path, files: list[tuple[str, Path]], generated: dict[str, bytes]) -> None:
    """Copy the snapshot into the empty folder ``dest``."""
    for rel, src in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    for rel, data in generated.items():
        (dest / rel).write_bytes(data)


def _normalize(name: str) -> str:
    return _NAME_RE.sub("-", name).lower()


def read_constraints(path: Path) -> dict[str, str]:
    """``constraints.txt`` as {normalized name: version}."""
    pins: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ConfigError(f"{path}:{lineno}: expected 'name==version' (got {raw.strip()!r})")
        pins[_normalize(name.strip())] = version.strip()
    return pins


def _requirement_closure(direct: Iterable[str]) -> set[str]:
    """Normalized names of ``direct`` and, through the installed metadata, everything they require."""
    from packaging.requirements import InvalidRequirement, Requirement

    seen: set[str] = set()
    queue = [_normalize(Requirement(r).name) for r in direct]
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: its own pin still comes from constraints.txt
        for spec in requires:
            try:
                req = Requirement(spec)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                queue.append(_normalize(req.name))
    return seen


def job_requirements(root: Path, *, distributed: bool) -> tuple[list[str], str]:
    """(pinned pip requirements, python version) for the job's environment, from pyproject + constraints.txt.

    The direct requirements are the core dependencies, the Azure MLflow plugin and, for distributed jobs, the
    ``deepspeed`` extra; their dependency closure (read from the installed metadata) is pinned too, so the remote
    environment resolves to the lock file rather than to whatever is newest.
    """
    from packaging.requirements import Requirement

    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project.get("optional-dependencies", {})
    direct = list(project.get("dependencies", []))
    for extra, names in JOB_EXTRA_PACKAGES.items():
        direct += [r for r in extras.get(extra, []) if _normalize(Requirement(r).name) in names]
    if distributed:
        direct += list(extras.get("deepspeed", []))
    pins = read_constraints(root / "constraints.txt")
    unpinned = sorted({_normalize(Requirement(r).name) for r in direct} - set(pins))
    if unpinned:
        raise ConfigError(
            f"{root / 'constraints.txt'}: no pin for {', '.join(unpinned)} (regenerate the lock file)"
        )
    closure = _requirement_closure(direct)
    reqs = [f"{name}=={pins[name]}" for name in sorted(closure) if name in pins]
    match = re.search(r">=\s*(\d+\.\d+)", project.get("requires-python", ""))
    return reqs, match.group(1) if match else "3.11"


def conda_spec(root: Path, *, distributed: bool) -> dict[str, Any]:
    reqs, python = job_requirements(root, distributed=distributed)
    return {
        "name": "apt-pipeline",
        "channels": ["conda-forge"],
        "dependencies": [f"python={python}", "pip", {"pip": reqs}],
    }


# ------------------------------------------------------------------------------------------------- job planning


@dataclass
class JobPlan:
    """Everything the job is made of, computed locally and without Azure."""

    kind: str  # command | sweep
    name: str  # deterministic base name (attempt 1)
    request_hash: str
    command: str
    config_bytes: bytes
    files: list[tuple[str, Path]]
    code_hash: str
    dataset: Path
    resume: Path | None
    experiment: str
    defaults: dict[str, Any] = field(default_factory=dict)  # sweep inputs' values outside a sweep

    @property
    def generated(self) -> dict[str, bytes]:
        return {JOB_CONFIG_FILE: self.config_bytes}

    def attempt_name(self, attempt: int) -> str:
        return self.name if attempt <= 1 else f"{self.name}-{attempt}"


def job_config(request: TrainRequest) -> dict[str, Any]:
    """The ``--config`` file of the remote ``apt train``: the request's configs (vocabulary comes from the data)."""
    model = request.model.to_dict()
    model.pop("vocab_size", None)
    model.pop("pad_id", None)
    return {"model": model, "train": request.train.to_dict(), "data": request.data.to_dict()}


def sweep_heads(request: TrainRequest) -> int:
    """Heads valid for every d_model of the sweep: the model's own when it divides them all."""
    heads = request.model.n_heads
    bad = [d for d in SWEEP_CHOICES["d_model"] if d % heads]
    if bad:
        raise ConfigError(
            f"ModelConfig.n_heads={heads} does not divide the sweep's d_model choice(s) {bad}; "
            "use --n-heads 4 or 8 (or a preset with such heads) for a sweep"
        )
    return heads


def plan_job(request: TrainRequest, opts: AzureOptions, dataset_sha256: str, root: Path) -> JobPlan:
    files = snapshot_files(root)
    config_bytes = dumps_json(job_config(request)).encode("utf-8")
    chash = code_hash(files, {JOB_CONFIG_FILE: config_bytes})
    experiment = opts.experiment_name or request.experiment
    if not _EXPERIMENT_RE.match(experiment):
        raise ConfigError(f"experiment name {experiment!r}: use letters, digits, '_', '-' or '.'")
    remote_backend = "deepspeed" if opts.distributed else "playground"
    parts = [
        "python -m apt_model train",
        f"--backend {remote_backend}",
        f"--config {JOB_CONFIG_FILE}",
        "--dataset ${{inputs.data}}",
        "--save-dir ${{outputs.model}}",
        f"--experiment {shlex.quote(experiment)}",
        "--no-progress",
        # A preempted node restarts the command on the same output folder: start over rather than refuse.
        "--overwrite",
    ]
    if request.resume is not None:
        parts.append("--resume ${{inputs.resume}}")
    if request.tracking_uri is not None and request.tracking_uri.strip().lower() in DISABLED_URIS:
        parts.append("--no-tracking")
    elif request.tracking_uri:
        log.info(
            "azure: the job tracks to the workspace's MLflow (Azure sets MLFLOW_TRACKING_URI); %s is not used remotely",
            request.tracking_uri,
        )
    defaults: dict[str, Any] = {}
    if opts.sweep:
        parts.append(f"--n-heads {sweep_heads(request)}")
        defaults = {
            "batch_size": request.train.batch_size,
            "d_model": request.model.d_model,
            "n_layers": request.model.n_encoder_layers,
            "lr": request.train.lr,
            "weight_decay": request.train.weight_decay,
        }
        parts += [f"{flag} ${{{{inputs.{key}}}}}" for key, flag in SWEEP_FLAGS.items()]
    kind = "sweep" if opts.sweep else "command"
    shape = {
        k: getattr(opts, k)
        for k in (
            "compute_name",
            "instance_count",
            "gpus_per_node",
            "image",
            "sweep",
            "max_total_trials",
            "max_concurrent_trials",
            "sweep_timeout",
            "early_termination",
        )
    }
    identity = {
        "config": job_config(request),
        "dataset_sha256": dataset_sha256,
        "resume_sha256": sha256_file(request.resume) if request.resume else None,
        "code_hash": chash,
        "kind": kind,
        "shape": shape,
        "experiment": experiment,
        "command": " ".join(parts),
    }
    request_hash = sha256_bytes(dumps_json(identity).encode("utf-8"))
    return JobPlan(
        kind=kind,
        name=f"apt-{kind}-{request_hash[:20]}",
        request_hash=request_hash,
        command=" ".join(parts),
        config_bytes=config_bytes,
        files=files,
        code_hash=chash,
        dataset=Path(request.dataset).resolve(),
        resume=Path(request.resume).resolve() if request.resume else None,
        experiment=experiment,
        defaults=defaults,
    )


def build_compute(opts: AzureOptions) -> Any:
    from azure.ai.ml.entities import AmlCompute

    return AmlCompute(
        name=opts.compute_name,
        size=opts.vm_size,
        min_instances=0,
        max_instances=opts.max_nodes,
        idle_time_before_scale_down=opts.idle_seconds,
    )


def build_environment(root: Path, opts: AzureOptions) -> Any:
    from azure.ai.ml.entities import Environment

    return Environment(
        image=opts.image,
        conda_file=conda_spec(root, distributed=opts.distributed),
        description="apt-pipeline: pyproject dependencies pinned by constraints.txt",
    )


def build_job(
    plan: JobPlan, opts: AzureOptions, code_dir: Path, environment: Any, *, attempt: int = 1
) -> Any:
    """The ``CommandJob`` or ``SweepJob`` (azure-ai-ml v2 entities) for ``plan``."""
    from azure.ai.ml import Input, Output, PyTorchDistribution, command

    inputs: dict[str, Any] = {"data": Input(type="uri_file", path=str(plan.dataset))}
    if plan.resume is not None:
        inputs["resume"] = Input(type="uri_file", path=str(plan.resume))
    inputs.update(plan.defaults)
    name = plan.attempt_name(attempt)
    node = command(
        name=name,
        display_name=f"apt {plan.kind} {plan.request_hash[:8]}",
        description="APT model training: python -m apt_model train (see apt_job_config.json in the code snapshot)",
        experiment_name=plan.experiment,
        tags={"apt.request_hash": plan.request_hash, "apt.code_hash": plan.code_hash, "apt.kind": plan.kind},
        code=str(code_dir),
        command=plan.command,
        inputs=inputs,
        outputs={MODEL_OUTPUT: Output(type="uri_folder", mode="rw_mount")},
        environment=environment,
        environment_variables={"PYTHONUNBUFFERED": "1"},
        compute=opts.compute_name,
        instance_count=opts.instance_count,
        distribution=(
            PyTorchDistribution(process_count_per_instance=opts.gpus_per_node) if opts.distributed else None
        ),
    )
    if plan.kind == "command":
        return node._to_job()
    from azure.ai.ml.sweep import BanditPolicy, Choice, MedianStoppingPolicy, Uniform

    space: dict[str, Any] = {k: Choice(values=list(v)) for k, v in SWEEP_CHOICES.items()}
    space.update({k: Uniform(min_value=lo, max_value=hi) for k, (lo, hi) in SWEEP_UNIFORM.items()})
    policy = None
    if opts.early_termination == "bandit":
        policy = BanditPolicy(slack_factor=0.1, evaluation_interval=1, delay_evaluation=5)
    elif opts.early_termination == "median":
        policy = MedianStoppingPolicy(evaluation_interval=1, delay_evaluation=5)
    sweep = node(**space).sweep(
        compute=opts.compute_name,
        sampling_algorithm="random",
        primary_metric=PRIMARY_METRIC,
        goal="Minimize",
        early_termination_policy=policy,
    )
    sweep.set_limits(
        max_total_trials=opts.max_total_trials,
        max_concurrent_trials=opts.max_concurrent_trials,
        timeout=opts.sweep_timeout,
    )
    sweep.name = name
    sweep.display_name = f"apt sweep {plan.request_hash[:8]}"
    sweep.experiment_name = plan.experiment
    sweep.tags = {
        "apt.request_hash": plan.request_hash,
        "apt.code_hash": plan.code_hash,
        "apt.kind": plan.kind,
    }
    return sweep._to_job()


def job_yaml(job: Any, local_paths: dict[str, str]) -> str:
    """The job as CLI v2 YAML. azure-ai-ml's dump writes local input paths as ``azureml:<path>`` (an asset
    reference); those are put back to plain local paths so that ``load_job`` / ``az ml job create`` upload them."""
    import yaml

    data = json.loads(json.dumps(job._to_dict(), default=str))
    broken = {f"azureml:{src}": dst for src, dst in local_paths.items()}

    def fix(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, str):
            return broken.get(value, local_paths.get(value, value))
        return value

    return yaml.safe_dump(fix(data), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------- Azure boundary


def _is_transient(exc: BaseException) -> bool:
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(exc, ServiceRequestError | ServiceResponseError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, HttpResponseError):
        code = getattr(exc, "status_code", None)
        return code is not None and (code >= 500 or code == 429)
    return False


def _is_not_found(exc: BaseException) -> bool:
    from azure.core.exceptions import ResourceNotFoundError

    return isinstance(exc, ResourceNotFoundError)


class AzureJobs:
    """The calls this backend makes on an ``MLClient``, each retried on transient errors with backoff."""

    def __init__(
        self, client: Any, *, retries: int, poll_seconds: float, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.client = client
        self.retries = retries
        self.poll_seconds = poll_seconds
        self.sleep = sleep

    def call(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:
                if not _is_transient(exc) or attempt == self.retries:
                    raise
                delay = min(60.0, 2.0**attempt)
                log.warning("azure: %s: transient %s; retrying in %.0fs", what, exc.__class__.__name__, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, name: str) -> Any | None:
        def _get() -> Any | None:
            try:
                return self.client.jobs.get(name)
            except Exception as exc:
                if _is_not_found(exc):
                    return None
                raise

        return self.call(f"get job {name}", _get)

    def ensure_compute(self, compute: Any, instance_count: int) -> None:
        """Get the cluster, or create it (min 0 nodes, so it costs nothing while idle)."""

        def _get() -> Any | None:
            try:
                return self.client.compute.get(compute.name)
            except Exception as exc:
                if _is_not_found(exc):
                    return None
                raise

        existing = self.call(f"get compute {compute.name}", _get)
        if existing is None:
            log.info(
                "azure: creating compute cluster %s (%s, 0..%d nodes)",
                compute.name,
                compute.size,
                compute.max_instances,
            )
            self.call(
                f"create compute {compute.name}",
                lambda: self.client.compute.begin_create_or_update(compute).result(),
            )
            return
        size = getattr(existing, "size", None)
        if size and str(size).lower() != str(compute.size).lower():
            log.warning(
                "azure: cluster %s exists with VM size %s (not %s); using it as is",
                compute.name,
                size,
                compute.size,
            )
        max_nodes = getattr(existing, "max_instances", None)
        if isinstance(max_nodes, int) and max_nodes < instance_count:
            raise ConfigError(
                f"compute cluster {compute.name} allows {max_nodes} node(s) but the job needs {instance_count}; "
                "raise its max nodes or lower --instance-count"
            )

    def submit(self, job: Any) -> Any:
        return self.call(f"submit job {job.name}", lambda: self.client.jobs.create_or_update(job))

    def follow(self, name: str) -> Any:
        """Poll until the job reaches a terminal state; return the final job object."""
        last = None
        while True:
            job = self.get(name)
            if job is None:
                raise AzureJobError(f"Azure ML job {name} disappeared while being followed")
            status = str(job.status)
            if status != last:
                log.info("azure: job %s is %s", name, status)
                last = status
            if status in TERMINAL:
                return job
            self.sleep(self.poll_seconds)

    def cancel(self, name: str) -> None:
        try:
            poller = self.call(f"cancel job {name}", lambda: self.client.jobs.begin_cancel(name))
            with contextlib.suppress(Exception):
                poller.result(timeout=120)
            log.warning("azure: cancelled job %s", name)
        except Exception as exc:  # the local interrupt must still propagate
            log.error(
                "azure: could not cancel job %s (%s); cancel it in Studio", name, exc.__class__.__name__
            )

    def download_model(self, name: str, dest: Path) -> Path:
        self.call(
            f"download {name}",
            lambda: self.client.jobs.download(name, output_name=MODEL_OUTPUT, download_path=str(dest)),
        )
        folder = dest / "named-outputs" / MODEL_OUTPUT
        if not folder.is_dir():
            raise AzureJobError(f"Azure ML job {name}: the '{MODEL_OUTPUT}' output was not downloaded")
        return folder


def _default_credential() -> Any:
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def _default_client(credential: Any, subscription_id: str, resource_group: str, workspace_name: str) -> Any:
    from azure.ai.ml import MLClient

    return MLClient(credential, subscription_id, resource_group, workspace_name)


# ---------------------------------------------------------------------------------------------------- backend


def _read_state(out_dir: Path) -> dict[str, Any]:
    path = out_dir / JOB_STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(f"{path}: unreadable job record; remove it to submit afresh") from None
    return state if isinstance(state, dict) else {}


def _replace_prefix(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: _replace_prefix(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_prefix(v, old, new) for v in value]
    if isinstance(value, str) and old and value.startswith(old):
        return new + value[len(old) :]
    return value


class AzureBackend:
    name = "azure"
    summary = "Azure ML: managed compute cluster, command and sweep jobs, MLflow tracking, follow and fetch"
    extra: str | None = "azure"

    def __init__(
        self,
        *,
        credential_factory: Callable[[], Any] | None = None,
        client_factory: Callable[[Any, str, str, str], Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        root: Path | None = None,
    ) -> None:
        self._credential_factory = credential_factory or _default_credential
        self._client_factory = client_factory or _default_client
        self._sleep = sleep
        self._root = root
        self._validated: tuple[str, JobPlan] | None = None  # (request key, its plan)

    # -- CLI ---------------------------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        a = parser.add_argument
        a(
            "--subscription-id",
            "--azure-subscription-id",
            dest="subscription_id",
            default=None,
            help=f"azure: subscription id (or {ENV_SUBSCRIPTION})",
        )
        a(
            "--resource-group",
            "--azure-resource-group",
            dest="resource_group",
            default=None,
            help=f"azure: resource group (or {ENV_RESOURCE_GROUP})",
        )
        a(
            "--workspace-name",
            "--azure-workspace-name",
            dest="workspace_name",
            default=None,
            help=f"azure: Azure ML workspace (or {ENV_WORKSPACE})",
        )
        a(
            "--compute-name",
            default=None,
            help="azure: compute cluster, created when missing (default gpu-cluster)",
        )
        a("--vm-size", default=None, help="azure: VM size of a new cluster (default Standard_NC6s_v3)")
        a("--max-nodes", type=int, default=None, help="azure: cluster's max nodes (default 4; min is 0)")
        a(
            "--idle-seconds",
            type=int,
            default=None,
            help="azure: idle time before the cluster scales down (default 900)",
        )
        a("--experiment-name", default=None, help="azure: experiment (default: --experiment)")
        a("--instance-count", type=int, default=None, help="azure: nodes per job (default 1)")
        a(
            "--gpus-per-node",
            type=int,
            default=None,
            help="azure: processes per node; >1 GPU in all runs --backend deepspeed via PyTorchDistribution",
        )
        a("--image", default=None, help=f"azure: base image (default {DEFAULT_IMAGE})")
        a(
            "--sweep",
            action="store_true",
            default=False,
            help="azure: hyper-parameter sweep over the guide's space",
        )
        a(
            "--sweep-trials",
            dest="max_total_trials",
            type=int,
            default=None,
            help="azure: sweep max trials (20)",
        )
        a(
            "--sweep-concurrency",
            dest="max_concurrent_trials",
            type=int,
            default=None,
            help="azure: sweep trials at once (4)",
        )
        a("--sweep-timeout", type=int, default=None, help="azure: sweep timeout in seconds (21600)")
        a(
            "--early-termination",
            choices=("none", "bandit", "median"),
            default=None,
            help="azure: sweep early termination policy (none)",
        )
        a(
            "--dry-run",
            action="store_true",
            default=False,
            help="azure: write the job YAML and code snapshot to --job-out; no credentials, nothing submitted",
        )
        a("--job-out", type=Path, default=None, help="azure: dry-run folder (default <save-dir>/azure_job)")
        a("--poll-seconds", type=float, default=None, help="azure: seconds between status polls (30)")

    def options_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        for f in dataclasses.fields(AzureOptions):
            value = getattr(args, f.name, None)
            if value is None or value is False:
                continue
            opts[f.name] = str(value) if isinstance(value, Path) else value
        return opts

    # -- validation ----------------------------------------------------------------------------------------------
    @staticmethod
    def _key(request: TrainRequest) -> str:
        return json.dumps(request.to_dict(), sort_keys=True, default=str)

    def _root_dir(self) -> Path:
        return self._root or repo_root()

    def validate(self, request: TrainRequest) -> None:
        opts = AzureOptions.from_options(request.options)
        if opts.sweep and request.resume is not None:
            raise ConfigError("azure backend: --sweep trains new models; it cannot --resume a checkpoint")
        if opts.sweep:
            sweep_heads(request)
        from apt_model.training.loop import _run_exists, prepare  # torch: only once the options are sound

        # The dataset, configs and checkpoint are checked exactly as the remote run will check them. The remote
        # device is a GPU, so precision is checked there (fp16 cannot be resolved on this machine's CPU).
        local = dataclasses.replace(
            request,
            train=request.train.replace(precision="auto"),
            options={"device": "cpu", "overwrite": True},
        )
        prep = prepare(local)
        plan = plan_job(request, opts, prep.dataset_sha256, self._root_dir())
        out_dir = Path(request.out_dir)
        existing = _run_exists(out_dir)
        if existing and _read_state(out_dir).get("request_hash") != plan.request_hash:
            # Only the fetched result of this very request may be there (a retry returns it); anything else is kept.
            raise ConfigError(
                f"{out_dir}: save dir already holds a run ({', '.join(existing[:3])}); pick another dir"
            )
        if not opts.dry_run:
            opts.workspace()
        self._validated = (self._key(request), plan)

    def _plan(self, request: TrainRequest) -> JobPlan:
        if self._validated is None or self._validated[0] != self._key(request):
            self.validate(request)
        assert self._validated is not None
        return self._validated[1]

    def _credential(self) -> Any:
        """A working credential, or one ConfigError. Asked for a token now so that nothing is built in vain."""
        try:
            credential = self._credential_factory()
            credential.get_token(ARM_SCOPE)
        except AptError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"azure backend: no usable Azure credentials (DefaultAzureCredential: {exc.__class__.__name__}); "
                "run `az login`, or set AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET, or use a managed identity"
            ) from None
        return credential

    # -- train -------------------------------------------------------------------------------------------------
    def train(self, request: TrainRequest) -> TrainResult:
        opts = AzureOptions.from_options(request.options)
        plan = self._plan(request)
        root = self._root_dir()
        out_dir = Path(request.out_dir)
        if opts.dry_run:
            return self._dry_run(request, opts, plan, root)

        subscription, resource_group, workspace = opts.workspace()
        credential = self._credential()
        state = _read_state(out_dir)
        if state.get("request_hash") == plan.request_hash and state.get("status") == "fetched":
            done = out_dir / "train_result.json"
            if done.is_file():
                log.info("azure: %s already fetched into %s", state.get("name"), out_dir)
                return TrainResult(**json.loads(done.read_text(encoding="utf-8")))

        client = self._client_factory(credential, subscription, resource_group, workspace)
        jobs = AzureJobs(client, retries=opts.retries, poll_seconds=opts.poll_seconds, sleep=self._sleep)
        name, submitted = self._submit_or_attach(jobs, plan, opts, root, state)
        record = {
            "name": name,
            "kind": plan.kind,
            "request_hash": plan.request_hash,
            "code_hash": plan.code_hash,
            "experiment": plan.experiment,
            "compute": opts.compute_name,
            "workspace": workspace,
            "studio_url": getattr(submitted, "studio_url", None),
            "status": str(getattr(submitted, "status", "")),
        }
        atomic_write_json(out_dir / JOB_STATE_FILE, record)
        log.info("azure: following job %s — %s", name, record["studio_url"] or "(no Studio URL)")

        try:
            final = jobs.follow(name)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # KeyboardInterrupt, task cancellation, SystemExit
                jobs.cancel(name)
                record["status"] = "Canceled"
                with contextlib.suppress(Exception):
                    atomic_write_json(out_dir / JOB_STATE_FILE, record)
            raise
        record["status"] = str(final.status)
        record["studio_url"] = getattr(final, "studio_url", None) or record["studio_url"]
        atomic_write_json(out_dir / JOB_STATE_FILE, record)
        if record["status"] != COMPLETED:
            raise AzureJobError(
                f"Azure ML job {name} ended {record['status']}; see {record['studio_url'] or 'Azure ML Studio'} "
                "(running the same request again submits a new attempt)"
            )

        fetch_from = name
        if plan.kind == "sweep":
            best = (getattr(final, "properties", None) or {}).get("best_child_run_id")
            if not best:
                raise AzureJobError(
                    f"Azure ML sweep {name} completed without a best trial (no trial logged {PRIMARY_METRIC}?)"
                )
            record["best_trial"] = best
            fetch_from = best
        result = self._fetch(jobs, fetch_from, out_dir, record)
        record["status"] = "fetched"
        atomic_write_json(out_dir / JOB_STATE_FILE, record)
        return result

    def _submit_or_attach(
        self, jobs: AzureJobs, plan: JobPlan, opts: AzureOptions, root: Path, state: dict[str, Any]
    ) -> tuple[str, Any]:
        attempt = 1
        if state.get("request_hash") == plan.request_hash and isinstance(state.get("name"), str):
            suffix = state["name"][len(plan.name) :].lstrip("-")
            attempt = int(suffix) if suffix.isdigit() else 1
        while attempt <= MAX_ATTEMPTS:
            name = plan.attempt_name(attempt)
            existing = jobs.get(name)
            if existing is None:
                break
            status = str(existing.status)
            if status not in RETRYABLE_END:
                log.info("azure: re-attaching to job %s (%s)", name, status)
                return name, existing
            log.info("azure: job %s ended %s; submitting attempt %d", name, status, attempt + 1)
            attempt += 1
        else:
            raise AzureJobError(
                f"Azure ML job {plan.name}: {MAX_ATTEMPTS} attempts failed; change the request or the code"
            )
        jobs.ensure_compute(build_compute(opts), opts.instance_count)
        environment = build_environment(root, opts)
        with tempfile.TemporaryDirectory(prefix="apt-azure-code-") as tmp:
            code_dir = Path(tmp) / "code"
            code_dir.mkdir()
            build_snapshot(code_dir, plan.files, plan.generated)
            job = build_job(plan, opts, code_dir, environment, attempt=attempt)
            submitted = jobs.submit(job)  # uploads the snapshot and the dataset before returning
        log.info("azure: submitted job %s", name)
        return name, submitted

    def _dry_run(self, request: TrainRequest, opts: AzureOptions, plan: JobPlan, root: Path) -> TrainResult:
        out_dir = Path(request.out_dir)
        job_out = Path(opts.job_out) if opts.job_out else out_dir / "azure_job"
        with atomic_dir(job_out / "code") as tmp:
            build_snapshot(tmp, plan.files, plan.generated)
        code_dir = (job_out / "code").resolve()
        job = build_job(plan, opts, code_dir, build_environment(root, opts))
        local = {str(code_dir): "code", str(plan.dataset): str(plan.dataset)}
        if plan.resume is not None:
            local[str(plan.resume)] = str(plan.resume)
        job_file = job_out / f"{plan.kind}_job.yaml"
        atomic_write_text(job_file, job_yaml(job, local))
        compute_file = job_out / "compute.yaml"
        import yaml

        compute = json.loads(json.dumps(build_compute(opts)._to_dict(), default=str))
        atomic_write_text(compute_file, yaml.safe_dump(compute, sort_keys=False))
        atomic_write_text(
            job_out / "environment.yml",
            yaml.safe_dump(conda_spec(root, distributed=opts.distributed), sort_keys=False),
        )
        log.info("azure: dry run: wrote %s (submit with `az ml job create -f %s`)", job_file, job_file)
        return TrainResult(
            backend=self.name,
            out_dir=str(out_dir),
            final_model="",
            export_dir=None,
            report="",
            last_checkpoint=None,
            epochs_completed=0,
            global_step=0,
            extra={
                "dry_run": True,
                "job_name": plan.name,
                "job_kind": plan.kind,
                "job_yaml": str(job_file),
                "compute_yaml": str(compute_file),
                "code_dir": str(code_dir),
                "code_hash": plan.code_hash,
                "request_hash": plan.request_hash,
                "command": plan.command,
            },
        )

    def _fetch(self, jobs: AzureJobs, name: str, out_dir: Path, record: dict[str, Any]) -> TrainResult:
        """Download ``name``'s model output and install it as the local run layout."""
        from apt_model.checkpoint import FINAL_CHECKPOINT, FINAL_EXPORT
        from apt_model.training.report import REPORT_FILE

        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".azure_download.", dir=out_dir))
        try:
            folder = jobs.download_model(name, staging)
            remote_file = folder / "train_result.json"
            if not remote_file.is_file():
                raise AzureJobError(
                    f"Azure ML job {name}: its output holds no train_result.json (did training finish?)"
                )
            remote = json.loads(remote_file.read_text(encoding="utf-8"))
            for rel, expected in (remote.get("sha256") or {}).items():
                path = folder / rel
                if not path.is_file() or sha256_file(path) != expected:
                    raise CheckpointError(
                        f"{name}: downloaded {rel} does not match the job's sha256 manifest"
                    )
            remote_dir = str(remote.get("out_dir") or "").rstrip("/")
            report_path = folder / REPORT_FILE
            if report_path.is_file():
                report = json.loads(report_path.read_text(encoding="utf-8"))
                report = _replace_prefix(report, remote_dir, str(out_dir))
                report["runtime"] = {
                    **(report.get("runtime") or {}),
                    "azure": {
                        "job": record["name"],
                        "trial": name,
                        "studio_url": record.get("studio_url"),
                        "remote_backend": report.get("backend"),
                    },
                }
                report["backend"] = self.name
                atomic_write_json(report_path, report)
            os.replace(remote_file, folder / REMOTE_RESULT_FILE)
            for item in sorted(folder.iterdir()):
                target = out_dir / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                os.replace(item, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

        local = _replace_prefix(remote, remote_dir, str(out_dir))
        extra = {
            "azure_job": record["name"],
            "azure_trial": name if name != record["name"] else None,
            "studio_url": record.get("studio_url"),
            "job_kind": record.get("kind"),
            "experiment": record.get("experiment"),
            "compute": record.get("compute"),
            "remote_backend": remote.get("backend"),
            "remote": {k: v for k, v in (remote.get("extra") or {}).items() if k != "tracking_uri"},
        }
        result = TrainResult(
            backend=self.name,
            out_dir=str(out_dir),
            final_model=str(out_dir / FINAL_CHECKPOINT),
            export_dir=str(out_dir / FINAL_EXPORT),
            report=str(out_dir / REPORT_FILE),
            last_checkpoint=local.get("last_checkpoint"),
            epochs_completed=int(remote.get("epochs_completed", 0)),
            global_step=int(remote.get("global_step", 0)),
            metrics={
                k: float(v) for k, v in (remote.get("metrics") or {}).items() if isinstance(v, int | float)
            },
            sha256=dict(remote.get("sha256") or {}),
            mlflow_run_id=remote.get("mlflow_run_id"),
            extra=extra,
        )
        atomic_write_json(out_dir / "train_result.json", result.to_dict())
        log.info("azure: fetched %s into %s", name, out_dir)
        return result
