"""The content-addressed cache: keys, verified hits, refresh, locking, atomic publish, resumable work dirs."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pytest

from apt_model.cache import Cache, CacheLockTimeout, cache_key, code_version, verify_entry


def _writer(content: str, calls: list[str] | None = None, delay: float = 0.0):
    def build(work: Path) -> dict:
        if calls is not None:
            calls.append(str(work))
        time.sleep(delay)
        (work / "sub").mkdir(exist_ok=True)
        (work / "data.json").write_text(content)
        (work / "sub" / "x.bin").write_bytes(content.encode() * 3)
        return {"content": content}

    return build


def test_cache_key_is_canonical_and_sensitive():
    a = cache_key("data", {"seed": 1, "size": "small"})
    assert a == cache_key("data", {"size": "small", "seed": 1})  # key order does not matter
    assert a != cache_key("data", {"seed": 2, "size": "small"})
    assert a != cache_key("train", {"seed": 1, "size": "small"})
    assert a.isalnum() and len(a) == 32


def test_code_version_tracks_library_sources():
    v = code_version()
    assert v.startswith("0.") and "+" in v
    assert code_version() == v


def test_build_then_verified_hit(tmp_path):
    cache = Cache(tmp_path)
    calls: list[str] = []
    first = cache.get_or_build("data", "k1", _writer("a", calls))
    assert not first.hit and first.reason == "no entry"
    assert set(first.manifest["files"]) == {"data.json", "sub/x.bin"}
    assert first.manifest["meta"] == {"content": "a"}
    mtime = (first.dir / "data.json").stat().st_mtime_ns
    second = cache.get_or_build("data", "k1", _writer("b", calls))
    assert second.hit and second.manifest == first.manifest
    assert len(calls) == 1
    assert (second.dir / "data.json").read_text() == "a"
    assert (second.dir / "data.json").stat().st_mtime_ns == mtime
    # no temp leftovers beside the entry
    assert [p.name for p in (tmp_path / "data").iterdir() if not p.name.startswith(".")] == ["k1"]
    assert list((tmp_path / "data" / ".work").iterdir()) == []


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: (d / "sub" / "x.bin").unlink(), "sub/x.bin missing"),
        (lambda d: (d / "data.json").write_text("tampered"), "data.json sha256 mismatch"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "manifest unreadable (JSONDecodeError)"),
        (lambda d: (d / "manifest.json").unlink(), "manifest missing"),
    ],
)
def test_damaged_entry_is_rebuilt(tmp_path, damage, reason):
    cache = Cache(tmp_path)
    built = cache.get_or_build("data", "k1", _writer("a"))
    damage(built.dir)
    again = cache.get_or_build("data", "k1", _writer("a"))
    assert not again.hit and again.reason == reason
    assert verify_entry(again.entry)[1] == "ok"


def test_manifest_of_another_key_is_not_trusted(tmp_path):
    cache = Cache(tmp_path)
    built = cache.get_or_build("data", "k1", _writer("a"))
    target = tmp_path / "data" / "k2"
    os.rename(built.dir, target)
    manifest, reason = verify_entry(cache.entry("data", "k2"))
    assert manifest is None and reason == "manifest does not belong to this key"


def test_refresh_rebuilds(tmp_path):
    cache = Cache(tmp_path)
    cache.get_or_build("data", "k1", _writer("a"))
    out = cache.get_or_build("data", "k1", _writer("b"), refresh=True)
    assert not out.hit and out.reason == "refresh requested"
    assert (out.dir / "data.json").read_text() == "b"


def test_failed_build_leaves_previous_entry_and_no_temp(tmp_path):
    cache = Cache(tmp_path)
    cache.get_or_build("data", "k1", _writer("a"))

    def boom(work: Path) -> dict:
        (work / "data.json").write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        cache.get_or_build("data", "k1", boom, refresh=True)
    assert (tmp_path / "data" / "k1" / "data.json").read_text() == "a"
    assert list((tmp_path / "data" / ".work").iterdir()) == []
    assert cache.lookup("data", "k1") is not None


def test_resumable_build_keeps_partial_work(tmp_path):
    cache = Cache(tmp_path)
    seen: list[list[str]] = []

    def crashing(work: Path) -> dict:
        seen.append(sorted(p.name for p in work.iterdir()))
        (work / "checkpoint_epoch_1.pt").write_text("ckpt")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.get_or_build("train", "k", crashing, resumable=True)

    def finishing(work: Path) -> dict:
        seen.append(sorted(p.name for p in work.iterdir()))
        (work / "final.pt").write_text("done")
        return {}

    out = cache.get_or_build("train", "k", finishing, resumable=True)
    assert seen == [[], ["checkpoint_epoch_1.pt"]]
    assert set(out.manifest["files"]) == {"checkpoint_epoch_1.pt", "final.pt"}
    assert not out.entry.work_dir.exists()  # moved onto the entry
    # refresh discards partial work
    with pytest.raises(RuntimeError):
        cache.get_or_build("train", "k2", crashing, resumable=True)
    cache.get_or_build("train", "k2", finishing, resumable=True, refresh=True)
    assert seen[-1] == []


def test_concurrent_threads_build_once(tmp_path):
    cache = Cache(tmp_path)
    calls: list[str] = []
    results = []

    def run():
        results.append(cache.get_or_build("data", "k1", _writer("a", calls, delay=0.5)))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r.hit for r in results) == [False, True, True]
    assert all(r.manifest == results[0].manifest for r in results)
    assert verify_entry(results[0].entry)[1] == "ok"


def _proc_build(root: str, out: str) -> None:
    calls: list[str] = []
    res = Cache(root).get_or_build("data", "k1", _writer("a", calls, delay=0.8))
    Path(out).write_text(json.dumps({"hit": res.hit, "built": len(calls), "waited": res.waited_s}))


def test_concurrent_processes_build_once(tmp_path):
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_proc_build, args=(str(tmp_path / "c"), str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    res = [json.loads(o.read_text()) for o in outs]
    assert sorted(r["built"] for r in res) == [0, 1]
    waiter = next(r for r in res if r["hit"])
    assert waiter["waited"] > 0.2  # it waited for the builder, then saw the hit


def test_lock_timeout(tmp_path):
    cache = Cache(tmp_path)
    entry = cache.entry("data", "k1")
    with cache.lock(entry), pytest.raises(CacheLockTimeout), cache.lock(entry, timeout_s=0.3):
        pass


def test_bad_key_rejected(tmp_path):
    with pytest.raises(ValueError):
        Cache(tmp_path).entry("data", "../x")
