"""Row "planted secrets never leak": cloud/Hub/W&B credentials in the environment appear in no output, log,
report, artifact or MLflow record.

A real tiny ``apt train`` (MLflow tracking into a SQLite store, artifacts on disk), then ``apt verify`` and
``apt diagnose`` (which prints environment information), all in one child process whose environment holds
recognisable fake secrets. Then every byte the child printed and every file under the work folder (run folder,
``mlflow.db`` and its journal, ``mlartifacts/``, reports) is searched for the secret values.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.helpers import REPO, TRAIN_FLAGS, child_env, count

SECRETS = {
    "AZURE_CLIENT_SECRET": "azcs-7Qf3K9pZ-planted-secret",
    "HF_HUB_TOKEN": "hf_plantedHubToken9X2vB7",
    "HF_TOKEN": "hf_plantedToken4M8nQ1",
    "WANDB_API_KEY": "wandb-planted-5c1e9a77d0b4",
    "AZURE_STORAGE_CONNECTION_STRING": "AccountKey=plantedStorageKey3Zq==",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-planted-pw-81",
}

DRIVER = """
import json, sys
from apt_model.cli import main
for argv in json.loads(sys.argv[1]):
    print("### apt " + argv[0], flush=True)
    print("### apt " + argv[0], file=sys.stderr, flush=True)
    rc = main(argv)
    print(f"### rc {rc}", flush=True)
"""


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_planted_secrets_never_leak(tmp_path: Path, rel_dataset: Path) -> None:
    work = tmp_path / "work"
    run = work / "run"
    db = work / "mlflow.db"
    commands = [
        [*TRAIN_FLAGS, "--dataset", str(rel_dataset), "--save-dir", str(run), "--epochs", "2",
         "--save-interval", "1", "--tracking-uri", f"sqlite:///{db}"],
        ["verify", "--model", str(run), "--dataset", str(rel_dataset), "--out", str(work / "verify")],
        ["diagnose", "--run", str(run)],
        ["diagnose", "--run", str(run), "--json", "--out", str(work / "diagnosis.json")],
    ]  # fmt: skip
    env = child_env(tmp_path, **SECRETS)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(commands)],
        env=env,
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=400,
    )
    count("faults:planted-secrets", len(SECRETS))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    rcs = [line for line in proc.stdout.splitlines() if line.startswith("### rc ")]
    assert rcs[0] == "### rc 0" and rcs[1] == "### rc 0" and len(rcs) == 4, out[-4000:]
    assert "env.python" in out or "python" in out.lower()  # diagnose did print its environment section

    # The run really was tracked: params and metrics are in the store we are about to scan.
    with sqlite3.connect(db) as con:
        n_params = con.execute("select count(*) from params").fetchone()[0]
        n_metrics = con.execute("select count(*) from metrics").fetchone()[0]
    assert n_params > 10 and n_metrics > 0
    files = _files(work)
    assert any(p.name == "experiment_report.json" and "mlartifacts" in p.parts for p in files), files

    leaks = []
    for name, value in SECRETS.items():
        if value in out:
            leaks.append(f"{name} in the command output")
        for path in files:
            if value.encode() in path.read_bytes():
                leaks.append(f"{name} in {path.relative_to(work)}")
    assert not leaks, leaks
    assert len(files) >= 10  # the scan covered a real run (checkpoints, export, reports, mlflow store)
