"""RELIABILITY.md row 13, Prefect side: credentials in the workers' environment never reach Prefect or a run's files.

The session's stack runs its server and workers with ``PLANTED_SECRETS`` (tests/pipeline/conftest.py) in their
environment, so every flow run and every training process of the session has them. This test reads back, through
the REST API and paging to the end, everything the server holds for the session: flow runs (parameters, job
variables, states and their history), task runs (inputs, states, results), logs, artifacts (data and description),
events, deployments, work pools, variables, blocks and automations. Then it reads every file under the stack's
home: the run outputs (caches, checkpoints, reports, plots, ``mlflow.db``, ``mlartifacts/``), the Prefect database
and result storage, and the server and worker logs. None may contain a planted value, its random part, or an
obvious encoding of it (JSON-escaped, URL-encoded, hex, base64 at each byte alignment, standard or URL-safe).
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any
from urllib.parse import quote

import psutil
import pytest

from tests.pipeline.conftest import PLANTED_SECRETS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# A cheap run, only when the session has no completed full-pipeline run yet (e.g. this file runs alone).
CHEAP = {
    "dataset_kind": "full",
    "dataset_size": "small",
    "dataset_seed": 8113,
    "epochs": 1,
    "batch_size": 32,
    "save_interval": 1,
    "verify_sample": 10,
    "train_seed": 8113,
}
PAGE = 200


def _b64_forms(raw: bytes) -> set[bytes]:
    """Base64 of ``raw`` as it looks inside a longer encoded blob, whatever the byte alignment."""
    out = set()
    for k in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            text = enc(b"\0" * k + raw + b"\0\0").rstrip(b"=")
            head = 4 if k else 0  # the first group mixes prefix bytes
            whole = (k + len(raw)) // 3 * 4  # groups made of secret bytes only (and the prefix)
            out.add(text[head:whole])
    return {x for x in out if len(x) >= 16}


def needles() -> dict[bytes, str]:
    """Every byte string whose presence means a leak, mapped to the secret's name."""
    out: dict[bytes, str] = {}
    for name, value in PLANTED_SECRETS.items():
        core = re.search(r"[0-9a-f]{20}", value)
        assert core, value
        forms = {
            value,
            core.group(0),
            json.dumps(value)[1:-1],
            value.replace("/", "\\/"),
            quote(value, safe=""),
        }
        raw = {f.encode() for f in forms}
        raw |= {value.encode().hex().encode(), value.encode().hex().upper().encode()}
        raw |= _b64_forms(value.encode()) | _b64_forms(core.group(0).encode())
        for n in raw:
            out[n] = name
    return out


def _find(blob: bytes, table: dict[bytes, str]) -> list[str]:
    return sorted({f"{name} ({n[:12]!r}...)" for n, name in table.items() if n in blob})


def _api(stack, method: str, path: str, **kwargs: Any) -> Any:
    """One REST call, retried like Prefect's own client does on 503 (SQLite busy) and 429; returns the JSON."""
    for _ in range(20):
        resp = stack.http.request(method, path, **kwargs)
        if resp.status_code not in (429, 503):
            break
        time.sleep(1.0)
    assert resp.status_code == 200, (method, path, resp.status_code, resp.text[:500])
    return resp.json()


class Scan:
    def __init__(self, stack) -> None:
        self.stack = stack
        self.table = needles()
        self.counts: dict[str, int] = {}
        self.nbytes = 0
        self.hits: list[str] = []

    def check(self, kind: str, where: str, payload: Any, n: int = 1) -> None:
        blob = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode()
        self.counts[kind] = self.counts.get(kind, 0) + n
        self.nbytes += len(blob)
        for hit in _find(blob, self.table):
            self.hits.append(f"{kind} {where}: {hit}")

    def paged(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while True:
            page = _api(self.stack, "POST", path, json={**body, "limit": PAGE, "offset": len(rows)})
            rows += page
            if len(page) < PAGE:
                return rows

    def get(self, path: str, **params: Any) -> Any:
        return _api(self.stack, "GET", path, params=params)


def _completed_full_pipeline_runs(stack) -> list[dict[str, Any]]:
    dep = _api(stack, "GET", "/deployments/name/apt/full-pipeline")
    body = {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}, "state": {"type": {"any_": ["COMPLETED"]}}}}
    return _api(stack, "POST", "/flow_runs/filter", json=body)


def test_planted_secrets_never_reach_prefect_or_run_files(live_stack):
    stack = live_stack
    t0 = time.monotonic()
    # The secrets really are in the environment of the processes that run the flows.
    worker = psutil.Process(int((stack.home / "stack" / "worker-apt-local-gpu.pid").read_text()))
    env = worker.environ()
    assert all(env.get(k) == v for k, v in PLANTED_SECRETS.items())

    if not _completed_full_pipeline_runs(stack):
        fr = stack.wait(stack.run_deployment("apt/full-pipeline", **CHEAP), timeout_s=600)
        assert fr["state"]["type"] == "COMPLETED", fr["state"]
    assert _completed_full_pipeline_runs(stack)

    scan = Scan(stack)
    flow_runs = scan.paged("/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"})
    for fr in flow_runs:
        scan.check("flow run", fr["id"], fr)  # parameters, job variables, state, tags, empirical policy
        scan.check("flow run state", fr["id"], scan.get("/flow_run_states/", flow_run_id=fr["id"]))
    task_runs = scan.paged("/task_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"})
    for tr in task_runs:
        scan.check("task run", tr["id"], tr)  # inputs, state (with its result reference), cache key
        scan.check("task run state", tr["id"], scan.get("/task_run_states/", task_run_id=tr["id"]))
    logs = scan.paged("/logs/filter", {"sort": "TIMESTAMP_ASC"})
    for row in logs:
        scan.check("log", f"{row.get('flow_run_id')}/{row.get('task_run_id')}", row)
    artifacts = scan.paged("/artifacts/filter", {"sort": "CREATED_DESC"})
    for art in artifacts:
        scan.check("artifact", f"{art.get('key')} {art['id']}", art)  # data and description included
    # Events: the server's own record of every state change, heartbeat, artifact and worker action.
    page = _api(stack, "POST", "/events/filter", json={"limit": 50})
    while True:
        for ev in page["events"]:
            scan.check("event", f"{ev['event']} {ev['id']}", ev)
        if not page.get("next_page"):
            break
        page = _api(stack, "GET", page["next_page"])
    for what, path in [
        ("deployment", "/deployments/filter"),
        ("work pool", "/work_pools/filter"),
        ("variable", "/variables/filter"),
        ("block document", "/block_documents/filter"),
        ("automation", "/automations/filter"),
    ]:
        rows = _api(stack, "POST", path, json={})
        scan.check(what, path, rows, n=len(rows))

    # Every file under the stack's home: run outputs, caches, mlflow.db, the Prefect DB and result storage, logs.
    files = sorted(p for p in stack.home.rglob("*") if p.is_file() and not p.is_symlink())
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:  # removed meanwhile (a temp file of the server)
            continue
        scan.check("file", str(path.relative_to(stack.home)), data)

    n_runs = sum(1 for fr in flow_runs if fr["state"] and fr["state"]["type"] == "COMPLETED")
    print(
        f"\nscanned {len(flow_runs)} flow runs ({n_runs} completed), {len(task_runs)} task runs, {len(logs)} logs, "
        f"{len(artifacts)} artifacts, {scan.counts.get('event', 0)} events, {scan.counts.get('file', 0)} files; "
        f"{scan.nbytes / 1e6:.1f} MB for {len(scan.table)} needles ({len(PLANTED_SECRETS)} secrets) "
        f"in {time.monotonic() - t0:.1f} s"
    )
    # The scan saw the real thing: training output in the logs, the run's artifacts, its report on disk.
    assert any("epoch 1/" in row["message"] for row in logs)
    assert {"apt-verification-report", "apt-training-curves"} <= {a.get("key") for a in artifacts}
    assert any(p.name == "experiment_report.json" for p in files) and any(
        p.name == "mlflow.db" for p in files
    )
    assert any(p.suffix == ".db" and "prefect" in p.parts for p in files)  # the server's database
    assert not scan.hits, "\n".join(scan.hits[:50])


def test_needles_find_each_encoding():
    """The scanner itself: each planted value is found raw, inside JSON, URL-encoded, hex and base64 at any offset."""
    table = needles()
    for name, value in PLANTED_SECRETS.items():
        raw = value.encode()
        for k in range(3):
            for enc in (base64.b64encode, base64.urlsafe_b64encode):
                blob = b"prefix " + enc(b"ab"[:k] + raw + b"tail") + b" suffix"
                assert f"{name} (" in " ".join(_find(blob, table)), (name, k, enc)
        for blob in (
            raw,
            json.dumps({"x": f"a{value}b"}).encode(),
            quote(value, safe="").encode(),
            raw.hex().encode(),
            value[3:].encode(),
        ):
            assert any(h.startswith(name) for h in _find(blob, table)), (name, blob[:40])
    assert not _find(b"nothing secret here " * 100, table)
