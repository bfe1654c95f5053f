"""Row "two runs with identical parameters at once": one builds each cached artifact, the other reuses it.

Real processes (forked) call ``Cache.get_or_build`` on the same key at the same moment; every build appends a line
to a shared file (``O_APPEND``), so the count is exact across processes. Also: a builder SIGKILLed while holding the
key's lock neither deadlocks the next run nor leaves a half entry. Pipeline level:
``tests/pipeline/test_pipeline_e2e.py::test_concurrent_identical_runs_build_once``; threads and the lock timeout:
``tests/test_cache.py``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from apt_model.cache import Cache, verify_entry
from tests.reliability.helpers import count


def _builder(log: Path, delay: float, started: Path | None = None):  # type: ignore[no-untyped-def]
    def build(work: Path) -> dict:
        with open(
            log, "a", encoding="utf-8"
        ) as fh:  # O_APPEND: one whole line per build, whatever the process
            fh.write(f"{os.getpid()}\n")
        if started is not None:
            started.write_text("x")
        payload = os.urandom(1 << 20)  # what a second build would write differs: a double build is visible
        time.sleep(delay)
        (work / "blob.bin").write_bytes(payload)
        (work / "meta.json").write_text(json.dumps({"pid": os.getpid()}))
        return {"pid": os.getpid()}

    return build


def _fork(fn) -> int:  # type: ignore[no-untyped-def]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"process {pid} did not finish in {timeout} s")


def test_identical_concurrent_runs_build_once(tmp_path: Path) -> None:
    root, log, go = tmp_path / "cache", tmp_path / "builds.log", tmp_path / "go"
    results = [tmp_path / f"result{i}.json" for i in range(4)]

    def run(out: Path) -> None:
        while not go.exists():  # all start together
            time.sleep(0.005)
        res = Cache(root).get_or_build("train", "k1", _builder(log, delay=0.5))
        out.write_text(json.dumps({"hit": res.hit, "manifest": res.manifest}))

    pids = [_fork(lambda out=out: run(out)) for out in results]
    go.write_text("x")
    statuses = [_wait(pid) for pid in pids]
    count("faults:concurrent-runs", len(pids))
    assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in statuses)
    assert len(log.read_text().splitlines()) == 1  # built exactly once
    outs = [json.loads(p.read_text()) for p in results]
    assert sorted(o["hit"] for o in outs) == [False, True, True, True]
    assert all(o["manifest"] == outs[0]["manifest"] for o in outs)  # everyone got the same, intact entry
    entry = Cache(root).entry("train", "k1")
    assert verify_entry(entry)[1] == "ok"
    assert not [p for p in (root / "train" / ".work").iterdir()]  # no temp build left behind


def test_builder_killed_holding_the_lock_does_not_block_or_corrupt(tmp_path: Path) -> None:
    root, log, started = tmp_path / "cache", tmp_path / "builds.log", tmp_path / "started"
    pid = _fork(lambda: Cache(root).get_or_build("data", "k1", _builder(log, delay=60, started=started)))
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline, "the first builder never started"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)  # dies mid-build, holding the key's flock
    _wait(pid)
    count("faults:sigkill-builder")
    entry = Cache(root).entry("data", "k1")
    assert verify_entry(entry)[0] is None  # nothing half-built was published
    t0 = time.monotonic()
    res = Cache(root).get_or_build("data", "k1", _builder(log, delay=0.0), lock_timeout_s=10)
    assert time.monotonic() - t0 < 10  # the kernel released the dead builder's lock
    assert not res.hit and verify_entry(entry)[1] == "ok"
    assert len(log.read_text().splitlines()) == 2
