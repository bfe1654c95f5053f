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

    def task_runs(self, run_id: str) -> list[dict[str, Any]]:
        body = {"flow_runs": {"id": {"any_": [run_id]}}}
        return self.http.post("/task_runs/filter", json=body).json()

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
