"""One command for a local Prefect stack: server on 127.0.0.1 (SQLite), work pools, the GPU limit, deployments, worker.

    python -m deployments.local_stack up      # idempotent: starts only what is not running
    python -m deployments.local_stack status
    python -m deployments.local_stack down    # stops the worker(s) (SIGINT twice) and the server

State lives under ``--home`` (default ``<repo>/.apt_home``): ``prefect/`` is PREFECT_HOME (its SQLite database),
``stack/*.pid`` the pid files, ``stack/logs/*.log`` the server and worker logs. The server binds 127.0.0.1 unless
``--host`` says otherwise. After ``up`` it prints the ``export PREFECT_API_URL=...`` line to paste, after which
``prefect deployment run apt/full-pipeline`` works as typed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
POOLS_FILE = Path(__file__).resolve().parent / "work_pools.yaml"
DEFAULT_PORT = 4200
LOCAL_POOL = "apt-local-gpu"


@dataclass
class Stack:
    home: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    output_root: Path | None = None
    workers: list[str] = field(default_factory=lambda: [LOCAL_POOL])

    @property
    def api_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/api"

    @property
    def state_dir(self) -> Path:
        return self.home / "stack"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    def pid_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def env(self) -> dict[str, str]:
        env = os.environ.copy()
        env.update(
            PREFECT_HOME=str(self.prefect_home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_API_HOST=self.host,
            PREFECT_SERVER_API_PORT=str(self.port),
            # Concurrency leases in the database folder, not the server's memory: a restarted server would otherwise
            # forget the training's lease on the apt-gpu slot while the slot count stays taken, for ever.
            PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="prefect.server.concurrency.lease_storage.filesystem",
            APT_REPO_ROOT=str(REPO_ROOT),
            APT_OUTPUT_ROOT=str(self.output_root or (REPO_ROOT / "runs" / "stack")),
            MPLCONFIGDIR=env.get("MPLCONFIGDIR", str(self.home / "matplotlib")),
            PYTHONPATH=os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
        )
        return env


# --------------------------------------------------------------------------------------------- process handling
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _spawn(stack: Stack, name: str, argv: list[str]) -> int:
    stack.log_file(name).parent.mkdir(parents=True, exist_ok=True)
    log = open(stack.log_file(name), "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        env=stack.env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # survives this command; `down` signals its whole group
    )
    log.close()
    stack.pid_file(name).write_text(f"{proc.pid}\n")
    return proc.pid


def _stop(stack: Stack, name: str, *, sigint_twice: bool, grace_s: float = 20.0) -> bool:
    path = stack.pid_file(name)
    pid = _read_pid(path)
    if pid is None:
        path.unlink(missing_ok=True)
        return False
    signals = [signal.SIGINT, signal.SIGINT] if sigint_twice else [signal.SIGTERM]
    for i, sig in enumerate(signals):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)  # the process itself first: a worker shuts down its runs cleanly
        if i + 1 < len(signals):
            time.sleep(
                1.0
            )  # a process worker ignores the first SIGINT/SIGTERM (it prints a hint); the second stops it
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):  # whatever is left of its process group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        t = time.monotonic() + 5
        while time.monotonic() < t and _alive(pid):
            time.sleep(0.2)
    path.unlink(missing_ok=True)
    return True


def _healthy(stack: Stack, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{stack.api_url}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def _prefect_cli(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "prefect", *args]
    return subprocess.run(argv, cwd=REPO_ROOT, env=stack.env(), text=True, capture_output=True, check=check)


# -------------------------------------------------------------------------------------------------- the steps
def start_server(stack: Stack, timeout_s: float = 120.0) -> str:
    if _read_pid(stack.pid_file("server")) and _healthy(stack):
        return "already running"
    if _healthy(stack):
        raise SystemExit(f"error: something else answers on {stack.api_url}; pick another --port")
    _spawn(
        stack,
        "server",
        [sys.executable, "-m", "prefect", "server", "start", "--host", stack.host, "--port", str(stack.port)],
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _healthy(stack):
            return "started"
        if _read_pid(stack.pid_file("server")) is None:
            raise SystemExit(f"error: the Prefect server exited; see {stack.log_file('server')}")
        time.sleep(0.5)
    raise SystemExit(
        f"error: the Prefect server did not answer within {timeout_s:.0f} s; see {stack.log_file('server')}"
    )


def load_pool_definitions(path: Path = POOLS_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def ensure_pools_and_limits(stack: Stack) -> list[str]:
    """Create or update the work pools and global concurrency limits of ``work_pools.yaml`` (idempotent)."""
    os.environ.update({k: v for k, v in stack.env().items() if k.startswith("PREFECT_")})
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    spec = load_pool_definitions()
    done = []
    with get_client(sync_client=True) as client:
        for pool in spec["pools"]:
            template = ProcessWorker.get_default_base_job_template()
            env = template["variables"]["properties"]["env"]
            env["default"] = {**(env.get("default") or {}), **(pool.get("env") or {})}
            try:
                client.read_work_pool(pool["name"])
                client.update_work_pool(
                    pool["name"],
                    WorkPoolUpdate(
                        description=pool.get("description"),
                        base_job_template=template,
                        concurrency_limit=pool.get("concurrency_limit"),
                    ),
                )
                done.append(f"pool {pool['name']} updated")
            except ObjectNotFound:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=pool["name"],
                        type=pool.get("type", "process"),
                        description=pool.get("description"),
                        base_job_template=template,
                        concurrency_limit=pool.get("concurrency_limit"),
                    )
                )
                done.append(f"pool {pool['name']} created")
        for limit in spec.get("concurrency_limits", []):
            client.upsert_global_concurrency_limit_by_name(limit["name"], int(limit["limit"]))
            done.append(f"concurrency limit {limit['name']}={limit['limit']}")
    return done


ZOMBIE_AUTOMATION = "apt-crash-zombie-flow-runs"


def zombie_automation(crashed_after_s: int) -> dict[str, Any]:
    """Prefect's zombie-flow automation: no flow-run event ``crashed_after_s`` after a heartbeat → Crashed."""
    return {
        "name": ZOMBIE_AUTOMATION,
        "description": "Marks a flow run Crashed when its heartbeats stop (its worker or machine was lost).",
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "after": ["prefect.flow-run.heartbeat"],
            "expect": ["prefect.flow-run.*"],
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": crashed_after_s,
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "CRASHED",
                "message": "Flow run marked as crashed due to missing heartbeats.",
            }
        ],
    }


def ensure_zombie_automation(stack: Stack) -> str:
    """Create the zombie-run automation, or update it if its settings changed; leave an identical one alone.

    Never delete and re-create it on every ``up``: the automation's pending state (which runs sent a heartbeat and
    are awaited) would go with it, and a run lost just before ``up`` restarts its worker would never be marked.
    """
    import httpx

    spec = load_pool_definitions().get("zombie_runs") or {}
    after = int(os.environ.get("APT_ZOMBIE_AFTER_S") or spec.get("crashed_after_s", 90))
    wanted = zombie_automation(after)
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        found = http.post("/automations/filter", json={}).raise_for_status().json()
        mine = [a for a in found if a["name"] == ZOMBIE_AUTOMATION]
        for extra in mine[1:]:
            http.delete(f"/automations/{extra['id']}").raise_for_status()
        if not mine:
            http.post("/automations/", json=wanted).raise_for_status()
            verb = "created"
        elif float(mine[0]["trigger"].get("within", 0)) != after or not mine[0]["enabled"]:
            http.put(f"/automations/{mine[0]['id']}", json=wanted).raise_for_status()
            verb = "updated"
        else:
            verb = "unchanged"
    return f"automation {ZOMBIE_AUTOMATION} {verb}: flow runs silent for {after} s after a heartbeat become Crashed"


def deploy(stack: Stack) -> str:
    result = _prefect_cli(stack, "--no-prompt", "deploy", "--all", check=False)
    if result.returncode != 0:
        raise SystemExit(f"error: prefect deploy failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return "deployed prefect.yaml (apt/full-pipeline, apt/full-pipeline-deepspeed, apt/full-pipeline-azure, apt/retrain)"


def start_worker(stack: Stack, pool: str) -> str:
    name = f"worker-{pool}"
    if _read_pid(stack.pid_file(name)):
        return f"worker for {pool} already running"
    _spawn(
        stack, name, [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    )
    return f"worker for {pool} started (log {stack.log_file(name)})"


def up(stack: Stack) -> list[str]:
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    stack.prefect_home.mkdir(parents=True, exist_ok=True)
    steps = [f"server {start_server(stack)} on {stack.api_url}"]
    steps += ensure_pools_and_limits(stack)
    steps.append(ensure_zombie_automation(stack))
    steps.append(deploy(stack))
    steps += [start_worker(stack, pool) for pool in stack.workers]
    (stack.state_dir / "stack.json").write_text(
        json.dumps({"api_url": stack.api_url, "workers": stack.workers, "home": str(stack.home)}, indent=2)
    )
    return steps


def down(stack: Stack) -> list[str]:
    steps = []
    for pid_file in sorted(stack.state_dir.glob("worker-*.pid")):
        name = pid_file.stem
        if _stop(stack, name, sigint_twice=True):
            steps.append(f"{name} stopped")
    if _stop(stack, "server", sigint_twice=False):
        steps.append("server stopped")
    return steps or ["nothing was running"]


def status(stack: Stack) -> dict[str, Any]:
    procs = (
        {p.stem: _read_pid(p) for p in sorted(stack.state_dir.glob("*.pid"))}
        if stack.state_dir.is_dir()
        else {}
    )
    return {"api_url": stack.api_url, "healthy": _healthy(stack), "processes": procs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.local_stack", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=("up", "down", "status", "pools"))
    parser.add_argument(
        "--home", type=Path, default=REPO_ROOT / ".apt_home", help="state folder (default .apt_home)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="server bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--output-root", type=Path, default=None, help="output_root of the deployments' runs")
    parser.add_argument(
        "--workers",
        default=LOCAL_POOL,
        help=f"comma-separated pools to start a worker for (default {LOCAL_POOL})",
    )
    args = parser.parse_args(argv)
    stack = Stack(
        home=args.home.resolve(),
        host=args.host,
        port=args.port,
        output_root=args.output_root.resolve() if args.output_root else None,
        workers=[w for w in args.workers.split(",") if w],
    )
    if args.action == "up":
        for line in up(stack):
            print(line)
        print(f"\nexport PREFECT_API_URL={stack.api_url}")
        print("prefect deployment run apt/full-pipeline --param epochs=3")
    elif args.action == "down":
        for line in down(stack):
            print(line)
    elif args.action == "pools":
        for line in ensure_pools_and_limits(stack):
            print(line)
        print(ensure_zombie_automation(stack))
    else:
        print(json.dumps(status(stack), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
