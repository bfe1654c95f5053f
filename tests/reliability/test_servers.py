"""Row "servers the project starts bind to 127.0.0.1 unless told otherwise".

The only server the project starts is the Prefect API of ``deployments/local_stack.py`` (the MLflow UI is started
by users, with the command printed in the docs). Checked twice: the command ``up`` builds (default and explicit
``--host``), and a real server started in a temporary home, whose listening sockets (every process of its group,
via psutil) must all be on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import deployments.local_stack as ls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv_host, expected", [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
def test_server_command_binds_loopback_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv_host: str | None, expected: str
) -> None:
    spawned: list[tuple[list[str], dict[str, str]]] = []

    def fake_spawn(stack: ls.Stack, name: str, argv: list[str]) -> int:
        spawned.append((argv, stack.env()))
        return 0

    monkeypatch.setattr(ls, "_spawn", fake_spawn)
    monkeypatch.setattr(ls, "_healthy", lambda stack, timeout_s=2.0: bool(spawned))
    monkeypatch.setattr(ls, "ensure_pools_and_limits", lambda stack: [])
    monkeypatch.setattr(ls, "ensure_zombie_automation", lambda stack: "automation")
    monkeypatch.setattr(ls, "deploy", lambda stack: "deployed")
    argv = ["up", "--home", str(tmp_path), "--port", "4999", "--workers", "apt-local-gpu"]
    assert ls.main(argv + (["--host", argv_host] if argv_host else [])) == 0
    (server_argv, env), (worker_argv, _) = spawned
    assert server_argv[server_argv.index("--host") + 1] == expected
    assert env["PREFECT_SERVER_API_HOST"] == expected
    assert env["PREFECT_API_URL"].startswith("http://127.0.0.1:4999/")  # clients always use loopback
    assert "--with-healthcheck" not in worker_argv  # a worker's health server would bind 0.0.0.0 by default


def _listening(pid: int) -> list[tuple[str, int]]:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    pids = {p.pid for p in procs}
    return [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


@pytest.mark.slow
def test_real_prefect_server_listens_on_loopback_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _free_port()
    stack = ls.Stack(home=tmp_path / "home", port=port)
    stack.state_dir.mkdir(parents=True)
    stack.prefect_home.mkdir(parents=True)
    for var in ("PREFECT_API_URL", "PREFECT_SERVER_API_HOST"):
        monkeypatch.delenv(var, raising=False)
    try:
        assert ls.start_server(stack, timeout_s=180) == "started"
        pid = int(stack.pid_file("server").read_text())
        listening: list[Any] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(p == port for _, p in listening):
            listening = _listening(pid)
            time.sleep(0.2)
        assert any(p == port for _, p in listening), listening
        assert all(ip == "127.0.0.1" for ip, _ in listening), listening
    finally:
        ls._stop(stack, "server", sigint_twice=False, grace_s=15)
    assert not ls._healthy(stack)
    assert os.environ.get("PREFECT_API_URL") is None
