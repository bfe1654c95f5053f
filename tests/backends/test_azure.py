"""The azure backend, offline: job YAML, code snapshot, environment pins, the job's entry point run locally, and
submit/attach/follow/cancel/fetch against a stand-in MLClient."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("azure.ai.ml")

from azure.ai.ml import load_job
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError, ServiceRequestError

from apt_model.backends import Backend, TrainRequest, get_backend
from apt_model.backends import azure as az
from apt_model.checkpoint import load_model
from apt_model.config import DataConfig, TrainConfig, model_preset
from apt_model.errors import ConfigError

SECRETS = {
    "AZURE_CLIENT_SECRET": "s3cr3t-client-VALUE-9f8e7d",
    "AZURE_CLIENT_ID": "0c1d2e3f-cafe-4bad-beef-client000001",
    "AZURE_TENANT_ID": "7a6b5c4d-dead-4bad-beef-tenant000001",
    "AZURE_PASSWORD": "p4ssw0rd-VALUE-123",
}
WORKSPACE = {"subscription_id": "sub-0001", "resource_group": "rg-apt", "workspace_name": "ws-apt"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in (az.ENV_SUBSCRIPTION, az.ENV_RESOURCE_GROUP, az.ENV_WORKSPACE, "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'local-mlflow.db'}")


def _dataset(path: Path) -> Path:
    data = {
        "arithmetic": [{"input": f"{a} + {b} = ?", "output": str(a + b)} for a in range(8) for b in range(6)],
        "zodiac": [
            {"input": f"{z}后面是什么生肖？", "output": n}
            for z, n in zip("鼠牛虎兔", "牛虎兔龙", strict=True)
        ],
    }
    path.write_text(
        json.dumps({"metadata": {"name": "t"}, "data": data}, ensure_ascii=False), encoding="utf-8"
    )
    return path


def _request(tmp: Path, out: str = "run", **options: Any) -> TrainRequest:
    dataset = tmp / "d.json"
    if not dataset.exists():
        _dataset(dataset)
    return TrainRequest(
        model=model_preset("tiny"),
        train=TrainConfig(epochs=1, batch_size=8, grad_accum=1, lr=3e-3, save_interval=1, log_every=1),
        data=DataConfig(max_src_len=16, max_tgt_len=8),
        dataset=dataset,
        out_dir=tmp / out,
        options=dict(options),
    )


def _dry_run(tmp: Path, **options: Any) -> tuple[Any, Path]:
    request = _request(tmp, **{"dry_run": True, "job_out": str(tmp / "job"), **options})
    backend = az.AzureBackend()
    backend.validate(request)
    result = backend.train(request)
    return result, Path(result.extra["job_yaml"])


# ----------------------------------------------------------------------------------------------- flags/options


def test_protocol_flags_and_aliases() -> None:
    backend = get_backend("azure")
    assert isinstance(backend, Backend) and backend.name == "azure" and backend.extra == "azure"
    parser = argparse.ArgumentParser()
    backend.add_arguments(parser)
    args = parser.parse_args(
        [
            "--azure-subscription-id",
            "S",
            "--azure-resource-group",
            "G",
            "--azure-workspace-name",
            "W",
            "--compute-name",
            "c1",
            "--vm-size",
            "Standard_NC24",
            "--sweep",
            "--max-nodes",
            "6",
            "--idle-seconds",
            "60",
            "--experiment-name",
            "e",
            "--dry-run",
            "--job-out",
            "J",
            "--sweep-trials",
            "8",
            "--sweep-concurrency",
            "2",
        ]
    )
    opts = backend.options_from_args(args)
    assert opts == {
        "subscription_id": "S",
        "resource_group": "G",
        "workspace_name": "W",
        "compute_name": "c1",
        "vm_size": "Standard_NC24",
        "sweep": True,
        "max_nodes": 6,
        "idle_seconds": 60,
        "experiment_name": "e",
        "dry_run": True,
        "job_out": "J",
        "max_total_trials": 8,
        "max_concurrent_trials": 2,
    }
    same = parser.parse_args(["--subscription-id", "S", "--resource-group", "G", "--workspace-name", "W"])
    assert backend.options_from_args(same) == {
        "subscription_id": "S",
        "resource_group": "G",
        "workspace_name": "W",
    }
    assert backend.options_from_args(parser.parse_args([])) == {}
    defaults = az.AzureOptions.from_options({})
    assert (defaults.compute_name, defaults.vm_size) == ("gpu-cluster", "Standard_NC6s_v3")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"turbo": 1}, "unknown option"),
        ({"max_nodes": "4"}, "options.max_nodes"),
        ({"sweep": "yes"}, "options.sweep"),
        ({"instance_count": 5, "max_nodes": 4}, "max_nodes=4"),
        ({"early_termination": "asha"}, "early_termination"),
        ({"compute_name": "gpu cluster!"}, "compute_name"),
        ({"max_concurrent_trials": 30}, "max_concurrent_trials"),
    ],
)
def test_bad_options_are_one_line_config_errors(tmp_path: Path, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        az.AzureBackend().validate(_request(tmp_path, dry_run=True, **options))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_sweep_needs_heads_that_divide_every_d_model(tmp_path: Path) -> None:
    request = _request(tmp_path, dry_run=True, sweep=True)
    request.model = model_preset("tiny", d_model=36, n_heads=12)
    with pytest.raises(ConfigError, match="n_heads=12"):
        az.AzureBackend().validate(request)
    resumed = _request(tmp_path, dry_run=True, sweep=True)
    resumed.resume = tmp_path / "d.json"
    with pytest.raises(ConfigError, match="cannot --resume"):
        az.AzureBackend().validate(resumed)


# --------------------------------------------------------------------------------------- dry run, YAML, snapshot


def test_dry_run_command_job_yaml_loads(tmp_path: Path) -> None:
    result, job_file = _dry_run(tmp_path)
    assert result.extra["dry_run"] and job_file.name == "command_job.yaml"
    job = load_job(job_file)
    assert type(job).__name__ in ("Command", "CommandJob")
    assert job.name == result.extra["job_name"] and job.name.startswith("apt-command-")
    assert job.compute.endswith("gpu-cluster") and job.experiment_name == "apt"
    assert Path(job.inputs["data"].path) == (tmp_path / "d.json").resolve()
    assert job.inputs["data"].type == "uri_file"
    assert job.outputs["model"].type == "uri_folder"
    argv = shlex.split(job.command)
    assert argv[:4] == ["python", "-m", "apt_model", "train"]
    assert argv[argv.index("--backend") + 1] == "playground"
    assert argv[argv.index("--dataset") + 1] == "${{inputs.data}}"
    assert argv[argv.index("--save-dir") + 1] == "${{outputs.model}}"
    assert job.distribution is None
    env = job.environment
    assert env.image == az.DEFAULT_IMAGE
    # The compute definition loads too.
    from azure.ai.ml import load_compute

    compute = load_compute(job_file.parent / "compute.yaml")
    assert (compute.size, compute.min_instances, compute.max_instances) == ("Standard_NC6s_v3", 0, 4)
    assert compute.idle_time_before_scale_down == 900
    # The same request plans the same job name (idempotent submission relies on it); another config does not.
    again, _ = _dry_run(tmp_path)
    assert again.extra["job_name"] == result.extra["job_name"]
    other = _request(tmp_path, dry_run=True, job_out=str(tmp_path / "job2"))
    other.train = other.train.replace(seed=7)
    assert az.AzureBackend().train(other).extra["job_name"] != result.extra["job_name"]


def test_dry_run_sweep_job_yaml_has_the_guides_space(tmp_path: Path) -> None:
    result, job_file = _dry_run(tmp_path, sweep=True, early_termination="bandit", max_total_trials=12)
    job = load_job(job_file)
    assert type(job).__name__ == "SweepJob" and job.name.startswith("apt-sweep-")
    space = job.search_space
    assert list(space["batch_size"].values) == [8, 16, 32]
    assert list(space["d_model"].values) == [128, 256, 512]
    assert list(space["n_layers"].values) == [4, 6, 8]
    assert (space["lr"].min_value, space["lr"].max_value) == (1e-5, 1e-3)
    assert (space["weight_decay"].min_value, space["weight_decay"].max_value) == (0.001, 0.1)
    assert getattr(job.sampling_algorithm, "type", job.sampling_algorithm) == "random"
    assert (job.objective.primary_metric, job.objective.goal) == ("val_loss", "minimize")
    from apt_model.training.tracking import METRIC_KEYS

    assert job.objective.primary_metric in METRIC_KEYS
    assert (job.limits.max_total_trials, job.limits.max_concurrent_trials) == (12, 4)
    assert job.limits.timeout == 6 * 3600
    assert job.early_termination.type == "bandit"
    # Each sampled value reaches `apt train` as its own flag, and every combination makes a valid model.
    argv = shlex.split(job.trial.command)
    for key, flag in az.SWEEP_FLAGS.items():
        assert argv[argv.index(flag) + 1] == f"${{{{search_space.{key}}}}}"
    from apt_model.cli import build_parser
    from apt_model.cli.train import build_request

    code = Path(result.extra["code_dir"])
    cwd = os.getcwd()
    os.chdir(code)
    try:
        for d_model in (128, 256, 512):
            sample = {"batch_size": 32, "d_model": d_model, "n_layers": 8, "lr": 5e-4, "weight_decay": 0.05}
            line = job.trial.command.replace("${{inputs.data}}", str(tmp_path / "d.json"))
            line = line.replace("${{outputs.model}}", str(tmp_path / "trial"))
            for key, value in sample.items():
                line = line.replace(f"${{{{search_space.{key}}}}}", str(value))
            args = build_parser().parse_args(shlex.split(line)[3:])
            request, _ = build_request(args)
            assert request.model.d_model == d_model and request.model.n_heads == 4
            assert request.model.n_encoder_layers == request.model.n_decoder_layers == 8
            assert (request.train.batch_size, request.train.lr, request.train.weight_decay) == (
                32,
                5e-4,
                0.05,
            )
            # Everything the sweep does not vary comes from the request.
            assert request.model.d_ff == 64 and request.data.max_src_len == 16 and request.train.epochs == 1
    finally:
        os.chdir(cwd)


def test_distributed_job_runs_deepspeed_through_pytorch_distribution(tmp_path: Path) -> None:
    _, job_file = _dry_run(tmp_path, instance_count=2, gpus_per_node=4)
    job = load_job(job_file)
    assert job.distribution.type == "pytorch" and job.distribution.process_count_per_instance == 4
    assert job.resources.instance_count == 2
    argv = shlex.split(job.command)
    assert argv[argv.index("--backend") + 1] == "deepspeed"
    pins = job.environment.conda_file["dependencies"][-1]["pip"]
    assert any(p.startswith("deepspeed==") for p in pins)


def test_code_snapshot_holds_the_package_and_nothing_else(tmp_path: Path) -> None:
    result, _ = _dry_run(tmp_path)
    code = Path(result.extra["code_dir"])
    files = {p.relative_to(code).as_posix() for p in code.rglob("*") if p.is_file()}
    root = az.repo_root()
    package = {
        p.relative_to(root).as_posix()
        for p in (root / "apt_model").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert package <= files  # the whole package, apt_model/data (code, not data) included
    assert "apt_model/data/__init__.py" in files and "apt_model/__main__.py" in files
    assert {"pyproject.toml", "constraints.txt", az.JOB_CONFIG_FILE} <= files
    assert all(
        f.startswith("apt_model/") or f in ("pyproject.toml", "constraints.txt", az.JOB_CONFIG_FILE)
        for f in files
    )
    assert not [f for f in files if "__pycache__" in f or f.endswith((".pyc", ".pt", ".db"))]
    config = json.loads((code / az.JOB_CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["model"]["d_model"] == 32 and config["train"]["epochs"] == 1

    # A checkout full of caches, data, runs and environments: only the package files come through.
    fake = tmp_path / "checkout"
    for rel in (
        "pyproject.toml",
        "constraints.txt",
        "apt_model/__init__.py",
        "apt_model/data/hardcore.py",
        "apt_model/__pycache__/x.cpython-311.pyc",
        "apt_model/model/y.pyc",
        "apt_model/runs/r1/final_model.pt",
        "apt_model/stray.safetensors",
        "apt_model/.hidden",
        "data/HLBD.json",
        "checkpoints/ck.pt",
        "runs/a/report.json",
        "mlruns/0/meta.yaml",
        ".git/HEAD",
        ".venv/bin/python",
        "mlflow.db",
    ):
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text("x", encoding="utf-8")
    got = [rel for rel, _ in az.snapshot_files(fake)]
    assert got == ["apt_model/__init__.py", "apt_model/data/hardcore.py", "constraints.txt", "pyproject.toml"]


def test_environment_pins_match_the_lock_file() -> None:
    from packaging.requirements import Requirement

    root = az.repo_root()
    pins = az.read_constraints(root / "constraints.txt")
    spec = az.conda_spec(root, distributed=False)
    assert spec["dependencies"][0] == "python=3.11"
    pip = spec["dependencies"][-1]["pip"]
    order = [line.partition("==")[0] for line in pip]
    assert order == sorted(order) and len(order) == len(set(order))
    for line in pip:
        name, _, version = line.partition("==")
        assert pins[name] == version, line
    names = {line.partition("==")[0] for line in pip}
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for dep in project["dependencies"]:
        assert az._normalize(Requirement(dep).name) in names, dep
    assert "azureml-mlflow" in names and "deepspeed" not in names
    assert "azure-ai-ml" not in names  # the job needs the MLflow plugin, not the submission SDK
    assert "mlflow" in names and "torch" in names


def test_unpinned_dependency_is_a_config_error(tmp_path: Path) -> None:
    root = az.repo_root()
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname="x"\nrequires-python=">=3.11"\ndependencies=["torch==2.13.0", "left-pad>=1"]\n',
        encoding="utf-8",
    )
    shutil.copyfile(root / "constraints.txt", tmp_path / "constraints.txt")
    with pytest.raises(ConfigError, match="no pin for left-pad"):
        az.conda_spec(tmp_path, distributed=False)


# ------------------------------------------------------------------------------ the job's entry point, locally


def _start_job_command(
    command: str, code: Path, dataset: Path, out: Path, mlflow_db: Path
) -> subprocess.Popen[str]:
    line = command.replace("${{inputs.data}}", str(dataset)).replace("${{outputs.model}}", str(out))
    assert "${{" not in line
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("AZURE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{mlflow_db}"  # Azure sets its own workspace URI here
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    # cwd is the code snapshot, as on the Azure node: `python -m apt_model` runs the snapshot's package.
    return subprocess.Popen(
        shlex.split(line), cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module", autouse=True)
def _remote_job(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Start the dry-run command job's command line exactly as Azure would run it, on CPU, in the background
    (it takes a while to import torch and MLflow; the offline tests run meanwhile)."""
    tmp = tmp_path_factory.mktemp("azure-remote")
    result = az.AzureBackend().train(_request(tmp, dry_run=True, job_out=str(tmp / "job")))
    job = load_job(result.extra["job_yaml"])
    out = tmp / "outputs" / "model"
    out.mkdir(parents=True)  # Azure mounts the output folder before the command starts
    db = tmp / "azure-mlflow.db"
    proc = _start_job_command(job.command, Path(result.extra["code_dir"]), tmp / "d.json", out, db)
    yield {"proc": proc, "out": out, "db": db, "tmp": tmp}
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def remote_output(_remote_job: dict[str, Any]) -> dict[str, Any]:
    """The 'remote' model output: what the job's command wrote into its declared output folder."""
    proc: subprocess.Popen[str] = _remote_job["proc"]
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return _remote_job


@pytest.mark.slow
def test_job_entry_point_trains_and_writes_where_the_job_declares(remote_output: dict[str, Any]) -> None:
    out: Path = remote_output["out"]
    for name in ("final_model.pt", "final_model", "experiment_report.json", "train_result.json"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "train_result.json").read_text(encoding="utf-8"))
    assert manifest["epochs_completed"] == 1 and manifest["out_dir"] == str(out)
    assert load_model(out / "final_model").config.d_model == 32
    with sqlite3.connect(remote_output["db"]) as con:
        runs = con.execute(
            "SELECT r.run_uuid FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
            "WHERE e.name = 'apt' AND r.status = 'FINISHED'"
        ).fetchall()
        assert [r[0] for r in runs] == [manifest["mlflow_run_id"]]
        keys = {k for (k,) in con.execute("SELECT key FROM metrics WHERE run_uuid = ?", (runs[0][0],))}
    assert az.PRIMARY_METRIC in keys


# ------------------------------------------------------------------------------------- the stand-in MLClient


class FakeJob:
    def __init__(self, name: str, status: str, properties: dict[str, str] | None = None) -> None:
        self.name = name
        self.status = status
        self.studio_url = f"https://ml.azure.com/runs/{name}?wsid=/subscriptions/sub-0001/workspaces/ws-apt"
        self.properties = properties or {}


class _Poller:
    def __init__(self, log: list[tuple[str, Any]], what: str) -> None:
        self.log, self.what = log, what

    def result(self, timeout: float | None = None) -> None:
        self.log.append(("poller.result", self.what))


class FakeAzure:
    """Workspace state shared by every client made from it: jobs, scripted statuses, compute, recorded calls."""

    def __init__(self, remote: Path | None) -> None:
        self.remote = remote
        self.calls: list[tuple[str, Any]] = []
        self.jobs: dict[str, FakeJob] = {}
        self.scripts: dict[str, list[Any]] = {}  # name -> statuses / exceptions to play on get()
        self.next_script: list[Any] = ["Running", "Completed"]
        self.submitted: list[Any] = []
        self.computes: dict[str, Any] = {}
        self.sweep_best: str | None = None
        self.clients = 0

    def client(self, credential: Any, sub: str, rg: str, ws: str) -> Any:
        self.clients += 1
        self.calls.append(("client", (sub, rg, ws)))
        return _Client(self)


class _Jobs:
    def __init__(self, az_: FakeAzure) -> None:
        self.az = az_

    def get(self, name: str) -> FakeJob:
        self.az.calls.append(("jobs.get", name))
        if name not in self.az.jobs:
            raise ResourceNotFoundError(f"job {name} not found")
        script = self.az.scripts.get(name, [])
        if script:
            step = script.pop(0)
            if isinstance(step, BaseException):
                raise step
            self.az.jobs[name].status = step
        return self.az.jobs[name]

    def create_or_update(self, job: Any) -> FakeJob:
        self.az.calls.append(("jobs.create_or_update", job.name))
        self.az.submitted.append(job)
        props = {"best_child_run_id": self.az.sweep_best} if self.az.sweep_best else {}
        self.az.jobs[job.name] = FakeJob(job.name, "Starting", props)
        self.az.scripts[job.name] = list(self.az.next_script)
        return self.az.jobs[job.name]

    def begin_cancel(self, name: str) -> _Poller:
        self.az.calls.append(("jobs.begin_cancel", name))
        self.az.jobs[name].status = "Canceled"
        return _Poller(self.az.calls, name)

    def download(self, name: str, *, output_name: str, download_path: str) -> None:
        self.az.calls.append(("jobs.download", (name, output_name)))
        assert self.az.remote is not None
        shutil.copytree(self.az.remote, Path(download_path) / "named-outputs" / output_name)

    def stream(self, name: str) -> None:  # pragma: no cover - the backend polls
        raise AssertionError("not used")


class _Compute:
    def __init__(self, az_: FakeAzure) -> None:
        self.az = az_

    def get(self, name: str) -> Any:
        self.az.calls.append(("compute.get", name))
        if name not in self.az.computes:
            raise ResourceNotFoundError(f"compute {name} not found")
        return self.az.computes[name]

    def begin_create_or_update(self, compute: Any) -> _Poller:
        self.az.calls.append(("compute.begin_create_or_update", compute.name))
        self.az.computes[compute.name] = compute
        return _Poller(self.az.calls, compute.name)


class _Client:
    def __init__(self, az_: FakeAzure) -> None:
        self.jobs = _Jobs(az_)
        self.compute = _Compute(az_)


class FakeCredential:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.scopes: list[str] = []

    def get_token(self, *scopes: str) -> Any:
        self.scopes.extend(scopes)
        if self.fail:
            from azure.identity import CredentialUnavailableError

            raise CredentialUnavailableError("DefaultAzureCredential failed to retrieve a token")
        return ("token", 0)


def _backend(
    fake: FakeAzure, sleeps: list[float] | None = None, credential: FakeCredential | None = None
) -> Any:
    cred = credential or FakeCredential()
    return az.AzureBackend(
        credential_factory=lambda: cred,
        client_factory=fake.client,
        sleep=(sleeps.append if sleeps is not None else (lambda s: None)),
    )


def _live(tmp: Path, out: str = "run", **options: Any) -> TrainRequest:
    return _request(tmp, out, **{**WORKSPACE, "poll_seconds": 5.0, **options})


def _count(fake: FakeAzure, call: str) -> int:
    return sum(1 for c in fake.calls if c[0] == call)


def test_submit_follow_fetch_completed(tmp_path: Path, remote_output: dict[str, Any]) -> None:
    fake = FakeAzure(remote_output["out"])
    fake.next_script = ["Queued", "Running", "Running", "Completed"]
    sleeps: list[float] = []
    backend = _backend(fake, sleeps)
    request = _live(tmp_path)
    backend.validate(request)
    result = backend.train(request)

    assert _count(fake, "jobs.create_or_update") == 1
    assert _count(fake, "compute.begin_create_or_update") == 1
    compute = fake.computes["gpu-cluster"]
    assert (compute.size, compute.min_instances, compute.max_instances) == ("Standard_NC6s_v3", 0, 4)
    job = fake.submitted[0]
    assert type(job).__name__ == "CommandJob" and job.name.startswith("apt-command-")
    assert sleeps == [5.0, 5.0, 5.0]  # polled until Completed
    assert ("jobs.download", (job.name, "model")) in fake.calls

    out = tmp_path / "run"
    assert result.backend == "azure" and result.final_model == str(out / "final_model.pt")
    assert result.extra["studio_url"].startswith("https://ml.azure.com/runs/" + job.name)
    assert result.extra["azure_job"] == job.name and result.epochs_completed == 1
    loaded = load_model(result.final_model)
    assert loaded.config.d_model == 32 and load_model(out).config.d_model == 32
    report = json.loads((out / "experiment_report.json").read_text(encoding="utf-8"))
    assert report["backend"] == "azure" and report["runtime"]["azure"]["job"] == job.name
    assert str(remote_output["out"]) not in json.dumps(report)  # remote paths rewritten to local ones
    assert report["final"]["final_model"] == str(out / "final_model.pt")
    state = json.loads((out / az.JOB_STATE_FILE).read_text(encoding="utf-8"))
    assert state["name"] == job.name and state["status"] == "fetched"
    assert not list(out.glob(".azure_download*"))
    assert json.loads((out / "train_result.json").read_text(encoding="utf-8"))["backend"] == "azure"

    # Running the finished request again submits nothing and downloads nothing.
    calls = len(fake.calls)
    again = _backend(fake).train(request)
    assert again.final_model == result.final_model
    assert not [c for c in fake.calls[calls:] if c[0] in ("jobs.create_or_update", "jobs.download")]

    # A different request into the same folder is refused before anything happens.
    changed = _live(tmp_path)
    changed.train = changed.train.replace(seed=11)
    with pytest.raises(ConfigError, match="already holds a run"):
        _backend(fake).validate(changed)


def test_retried_submit_reattaches_instead_of_submitting_twice(
    tmp_path: Path, remote_output: dict[str, Any]
) -> None:
    fake = FakeAzure(remote_output["out"])
    fake.next_script = ["Running", RuntimeError("worker lost")]  # the first follow crashes (not transient)
    request = _live(tmp_path)
    with pytest.raises(RuntimeError, match="worker lost"):
        _backend(fake).train(request)
    name = fake.submitted[0].name
    assert json.loads((tmp_path / "run" / az.JOB_STATE_FILE).read_text(encoding="utf-8"))["name"] == name

    # The retry (a new process: new backend, new client) re-attaches to the running job.
    fake.scripts[name] = ["Running", "Completed"]
    result = _backend(fake).train(request)
    assert _count(fake, "jobs.create_or_update") == 1 and fake.clients == 2
    assert result.extra["azure_job"] == name

    # Crash between create_or_update and writing azure_job.json: the deterministic name still finds the job.
    other = _live(tmp_path, "run2")
    fake.scripts[name] = ["Completed"]
    _backend(fake).train(other)
    assert _count(fake, "jobs.create_or_update") == 1


def test_failed_job_raises_and_a_rerun_makes_a_new_attempt(
    tmp_path: Path, remote_output: dict[str, Any]
) -> None:
    fake = FakeAzure(remote_output["out"])
    fake.next_script = ["Running", "Failed"]
    request = _live(tmp_path)
    with pytest.raises(az.AzureJobError, match="ended Failed") as info:
        _backend(fake).train(request)
    name = fake.submitted[0].name
    assert "ml.azure.com" in str(info.value) and "\n" not in str(info.value)
    assert _count(fake, "jobs.download") == 0
    assert (
        json.loads((tmp_path / "run" / az.JOB_STATE_FILE).read_text(encoding="utf-8"))["status"] == "Failed"
    )

    fake.next_script = ["Running", "Completed"]
    result = _backend(fake).train(request)
    assert [j.name for j in fake.submitted] == [name, f"{name}-2"]
    assert result.extra["azure_job"] == f"{name}-2"


def test_transient_errors_are_retried_with_backoff(tmp_path: Path, remote_output: dict[str, Any]) -> None:
    fake = FakeAzure(remote_output["out"])
    busy = HttpResponseError("service busy")
    busy.status_code = 503
    fake.next_script = [ServiceRequestError("connection reset"), busy, "Running", "Completed"]
    sleeps: list[float] = []
    result = _backend(fake, sleeps).train(_live(tmp_path))
    assert result.epochs_completed == 1
    assert sleeps == [1.0, 2.0, 5.0]  # backoff 1 s, 2 s, then the poll interval

    # A client error (4xx) is not transient: it surfaces at once.
    fake2 = FakeAzure(remote_output["out"])
    forbidden = HttpResponseError("forbidden")
    forbidden.status_code = 403
    fake2.next_script = [forbidden]
    with pytest.raises(HttpResponseError):
        _backend(fake2).train(_live(tmp_path, "run-b"))


def test_local_cancel_cancels_the_azure_job(tmp_path: Path, remote_output: dict[str, Any]) -> None:
    fake = FakeAzure(remote_output["out"])
    fake.next_script = ["Running", KeyboardInterrupt()]
    with pytest.raises(KeyboardInterrupt):
        _backend(fake).train(_live(tmp_path))
    name = fake.submitted[0].name
    assert ("jobs.begin_cancel", name) in fake.calls
    assert (
        json.loads((tmp_path / "run" / az.JOB_STATE_FILE).read_text(encoding="utf-8"))["status"] == "Canceled"
    )
    assert _count(fake, "jobs.download") == 0


def test_sweep_fetches_the_best_trial(tmp_path: Path, remote_output: dict[str, Any]) -> None:
    fake = FakeAzure(remote_output["out"])
    fake.sweep_best = "apt-trial-best-07"
    result = _backend(fake).train(_live(tmp_path, sweep=True))
    sweep = fake.submitted[0]
    assert type(sweep).__name__ == "SweepJob"
    assert sweep.objective.primary_metric == "val_loss"
    assert ("jobs.download", ("apt-trial-best-07", "model")) in fake.calls
    assert result.extra["azure_trial"] == "apt-trial-best-07" and result.extra["azure_job"] == sweep.name
    assert load_model(result.final_model).config.d_model == 32


def test_corrupt_download_is_refused(tmp_path: Path, remote_output: dict[str, Any]) -> None:
    remote = tmp_path / "remote"
    shutil.copytree(remote_output["out"], remote)
    (remote / "final_model.pt").write_bytes(b"truncated")
    fake = FakeAzure(remote)
    from apt_model.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"final_model\.pt does not match"):
        _backend(fake).train(_live(tmp_path))
    assert not (tmp_path / "run" / "final_model.pt").exists()


# ----------------------------------------------------------------------------- credentials, workspace, secrets


def test_missing_workspace_fails_before_anything_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Any] = []
    monkeypatch.setattr(az, "build_snapshot", lambda *a, **k: built.append(a))
    fake = FakeAzure(None)
    backend = _backend(fake)
    request = _request(tmp_path, subscription_id="sub-1")  # no resource group, no workspace
    with pytest.raises(ConfigError, match=r"--resource-group .*--workspace-name") as info:
        backend.validate(request)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="workspace is not set"):
        backend.train(request)
    assert fake.calls == [] and built == []

    # The environment may supply them instead.
    monkeypatch.setenv(az.ENV_RESOURCE_GROUP, "rg")
    monkeypatch.setenv(az.ENV_WORKSPACE, "ws")
    assert az.AzureOptions.from_options(request.options).workspace() == ("sub-1", "rg", "ws")


def test_missing_credentials_fail_before_anything_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Any] = []
    monkeypatch.setattr(az, "build_snapshot", lambda *a, **k: built.append(a))
    fake = FakeAzure(None)
    credential = FakeCredential(fail=True)
    backend = _backend(fake, credential=credential)
    request = _live(tmp_path)
    backend.validate(request)
    with pytest.raises(ConfigError, match="no usable Azure credentials") as info:
        backend.train(request)
    assert "\n" not in str(info.value) and credential.scopes == [az.ARM_SCOPE]
    assert fake.calls == [] and fake.clients == 0 and built == []
    assert not (tmp_path / "run").exists()


def test_secrets_never_leave_the_environment(
    tmp_path: Path, remote_output: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, job_file = _dry_run(tmp_path, sweep=True)
    fake = FakeAzure(remote_output["out"])
    result = _backend(fake).train(_live(tmp_path, "live"))
    texts = [p.read_text(encoding="utf-8") for p in (tmp_path / "job").rglob("*.y*ml")]
    texts += [p.read_text(encoding="utf-8") for p in (tmp_path / "live").glob("*.json")]
    texts += [
        json.dumps(result.to_dict()),
        caplog.text,
        json.dumps(fake.submitted[0]._to_dict(), default=str),
    ]
    texts.append((tmp_path / "job" / "code" / az.JOB_CONFIG_FILE).read_text(encoding="utf-8"))
    assert job_file.exists() and len(texts) > 6
    for secret in SECRETS.values():
        assert not [t for t in texts if secret in t], secret
    assert not [r for r in caplog.records if "AZURE_CLIENT_SECRET" in r.getMessage()]
