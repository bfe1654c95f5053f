"""A real Prefect server + process workers on 127.0.0.1 for the end-to-end tests (session-scoped, tmp home)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# Recognisable fake credentials in the environment of the server and the workers (so of every flow run and
# training process). tests/pipeline/test_pipeline_secrets.py checks that none of them reaches Prefect (parameters,
# states, logs, artifacts, events) or a file under the stack's folders. Each value holds its own 20 random hex
# digits, so a hit names the secret that leaked. Constants: pytest loads this file as module ``conftest`` and a test
# importing ``tests.pipeline.conftest`` gets a second copy, which must hold the same values.
PLANTED_SECRETS = {
    "AZURE_CLIENT_SECRET": "azcs~Pl4nted.ab0896e4418f04a91fb7.Q9",
    "HF_TOKEN": "hf_PlantedTok36359bb224626b0db791",
    "HF_HUB_TOKEN": "hf_PlantedHubdf915602b32d05fdeb36",
    "WANDB_API_KEY": "wandbplanted00b38a48215f86bb589e",
    "AZURE_STORAGE_CONNECTION_STRING": (
        "DefaultEndpointsProtocol=https;AccountName=aptplanted;"
        "AccountKey=Pl4nted+Key/c1ad64299703dc723840==;EndpointSuffix=core.windows.net"
    ),
    "MLFLOW_TRACKING_PASSWORD": "mlflow-planted-pw-d0a326f743857b2550c6",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveStack:
    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.port = port
        self.api = f"http://127.0.0.1:{port}/api"
        self.output_root = home / "runs"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MPLCONFIGDIR": str(home / "mpl"),
            "PYTHONPATH": str(REPO),
            # Workers poll every 10 s by default: each of the ~10 runs here would wait ~5 s for pick-up.
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            # The stack's zombie-run automation (deployments/work_pools.yaml: 90 s) sooner, for the crash test;
            # still twice the 30 s heartbeat, so a busy CI host is not mistaken for a dead one.
            "APT_ZOMBIE_AFTER_S": "60",
            **PLANTED_SECRETS,
        }
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.http = httpx.Client(base_url=self.api, timeout=30)

    def stack_cmd(self, action: str, *extra: str) -> subprocess.CompletedProcess[str]:
        argv = [
            sys.executable,
            "-m",
            "deployments.local_stack",
            action,
            "--home",
            str(self.home),
            "--port",
            str(self.port),
        ]
        return subprocess.run(
            [*argv, *extra], cwd=REPO, env=self.env, text=True, capture_output=True, timeout=300
        )

    def run_deployment(self, name: str, **params: Any) -> str:
        argv = [sys.executable, "-m", "prefect", "deployment", "run", name]
        for k, v in params.items():
            argv += ["--param", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        out = subprocess.run(argv, cwd=REPO, env=self.env, text=True, capture_output=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        m = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout)
        assert m, out.stdout
        return m.group(1)

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.http.get(f"/flow_runs/{run_id}").json()

    def wait(self, run_id: str, timeout_s: float = 900) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fr = self.flow_run(run_id)
            if fr["state"] and fr["state"]["type"] in TERMINAL:
                return fr
            time.sleep(1.0)
        raise AssertionError(f"flow run {run_id} did not finish in {timeout_s} s")

    def task_runs(
        self, run_id: str, *, attempt: int | None = None, settle_s: float = 30
    ) -> list[dict[str, Any]]:
        """The flow run's task runs (of one ``attempt`` of it, if given), once each has a final state (or after
        ``settle_s``, as they are then).

        Prefect 3 records task-run states from events, which the server persists on its own schedule: right after
        the flow run is Completed, its last task run can still read Running for a moment.
        """
        body = {"flow_runs": {"id": {"any_": [run_id]}}}
        deadline = time.monotonic() + settle_s
        while True:
            runs = self.http.post("/task_runs/filter", json=body).json()
            if attempt is not None:
                runs = [tr for tr in runs if tr["flow_run_run_count"] == attempt]
            settled = all(tr["state"] and tr["state"]["type"] in TERMINAL for tr in runs)
            if settled or time.monotonic() > deadline:
                return runs
            time.sleep(0.5)

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        body = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
        return self.http.post("/artifacts/filter", json=body).json()

    def result_summary(self, run_id: str) -> dict[str, Any]:
        runs = sorted((self.output_root / "pipeline").glob(f"*-{self.flow_run(run_id)['name']}"))
        assert runs, f"no run folder for {run_id}"
        return json.loads((runs[-1] / "summary.json").read_text())


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("apt_stack")
    stack = LiveStack(home, _free_port())
    up = stack.stack_cmd(
        "up", "--output-root", str(stack.output_root), "--workers", "apt-local-gpu,apt-multi-gpu"
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export PREFECT_API_URL={stack.api}" in up.stdout
        yield stack
    finally:
        down = stack.stack_cmd("down")
        print(down.stdout, down.stderr)
        stack.http.close()
