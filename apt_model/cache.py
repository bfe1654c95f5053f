"""A content-addressed build cache whose hits are verified before they are trusted.

Layout under ``root`` (the pipeline uses ``<output_root>/cache``)::

    <kind>/<key>/manifest.json     the published entry: every file's sha256 plus the builder's metadata
    <kind>/<key>/...               the files themselves
    <kind>/.work/<key>/            where a build happens (stable per key, so a crashed build can resume)
    <kind>/.locks/<key>.lock       fcntl lock file: one builder per key across processes

A hit is an entry whose manifest parses, names this key, and whose files are all present with matching hashes.
Anything else is a miss and the entry is rebuilt. A build is published by renaming the finished work directory
onto ``<kind>/<key>`` (atomic on one file system), so readers never see a half-written entry.

Pure library: no Prefect import, so the cache logic is tested on its own.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apt_model.io import atomic_write_json, dumps_json, file_lock, replace_dir, sha256_file

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1


def cache_key(kind: str, payload: Mapping[str, Any], *, length: int = 32) -> str:
    """Key = hash of the kind and the canonical JSON of everything the result depends on."""
    blob = dumps_json({"kind": kind, "payload": payload}).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version + a hash of every ``apt_model/**/*.py`` source file (path and bytes).

    Part of the training key: a change to the library's code must never reuse a model trained by older code.
    """
    from apt_model import __version__

    package_dir = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(package_dir).as_posix().encode("utf-8") + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return f"{__version__}+{digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class CacheEntry:
    root: Path
    kind: str
    key: str

    @property
    def dir(self) -> Path:
        return self.root / self.kind / self.key

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    @property
    def work_dir(self) -> Path:
        return self.root / self.kind / ".work" / self.key

    @property
    def lock_path(self) -> Path:
        return self.root / self.kind / ".locks" / f"{self.key}.lock"


@dataclass
class CacheOutcome:
    """What ``get_or_build`` did: the verified manifest, whether it was a hit, and why it was (re)built."""

    manifest: dict[str, Any]
    hit: bool
    reason: str
    entry: CacheEntry
    waited_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.entry.dir


class CacheLockTimeout(TimeoutError):
    pass


def hash_tree(directory: Path) -> dict[str, str]:
    """sha256 of every regular file under ``directory`` (relative POSIX path -> hash), manifest excluded."""
    files: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            rel = path.relative_to(directory).as_posix()
            if rel == MANIFEST:
                continue
            files[rel] = sha256_file(path)
    return files


def verify_entry(entry: CacheEntry) -> tuple[dict[str, Any] | None, str]:
    """``(manifest, "ok")`` when the entry is complete and intact, else ``(None, why-not)``."""
    if not entry.manifest_path.is_file():
        return None, "no entry" if not entry.dir.exists() else "manifest missing"
    try:
        manifest = json.loads(entry.manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"manifest unreadable ({exc.__class__.__name__})"
    if (
        not isinstance(manifest, dict)
        or manifest.get("key") != entry.key
        or manifest.get("kind") != entry.kind
    ):
        return None, "manifest does not belong to this key"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return None, "manifest lists no files"
    for rel, expected in sorted(files.items()):
        path = entry.dir / rel
        if not path.is_file():
            return None, f"{rel} missing"
        if sha256_file(path) != expected:
            return None, f"{rel} sha256 mismatch"
    return manifest, "ok"


class Cache:
    """A cache rooted at ``root``; safe to share between processes on one host (and NFS with working flock)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def entry(self, kind: str, key: str) -> CacheEntry:
        if not kind.isidentifier() or not key.isalnum():
            raise ValueError(f"bad cache kind/key {kind!r}/{key!r}")
        return CacheEntry(self.root, kind, key)

    @contextlib.contextmanager
    def lock(
        self, entry: CacheEntry, *, timeout_s: float | None = None, poll_s: float = 0.2
    ) -> Iterator[float]:
        """Hold the key's exclusive lock (:func:`apt_model.io.file_lock`); yields the seconds spent waiting."""

        def held() -> CacheLockTimeout:
            return CacheLockTimeout(f"cache lock {entry.lock_path} held by another run")

        with file_lock(entry.lock_path, timeout_s=timeout_s, poll_s=poll_s, timeout_error=held) as waited:
            yield waited

    def lookup(self, kind: str, key: str) -> dict[str, Any] | None:
        manifest, _ = verify_entry(self.entry(kind, key))
        return manifest

    def publish(self, entry: CacheEntry, built_dir: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Hash ``built_dir``, write its manifest, and move it onto the entry atomically. Caller holds the lock."""
        files = hash_tree(built_dir)
        if not files:
            raise RuntimeError(f"cache build for {entry.kind}/{entry.key} produced no files")
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "kind": entry.kind,
            "key": entry.key,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "files": files,
            "meta": dict(meta),
        }
        atomic_write_json(built_dir / MANIFEST, manifest)
        entry.dir.parent.mkdir(parents=True, exist_ok=True)
        # Swaps out a stale entry in one step; the lock keeps other builders out.
        replace_dir(built_dir, entry.dir)
        return manifest

    def get_or_build(
        self,
        kind: str,
        key: str,
        build: Callable[[Path], Mapping[str, Any]],
        *,
        refresh: bool = False,
        resumable: bool = False,
        lock_timeout_s: float | None = None,
        on_wait: Callable[[CacheEntry], None] | None = None,
    ) -> CacheOutcome:
        """Return the verified entry for ``key``, building it with ``build(work_dir) -> meta`` when needed.

        ``resumable``: build in the stable ``.work/<key>`` directory and keep whatever a crashed build left there
        (checkpoints), so the next attempt can continue; otherwise every build starts in a fresh temp directory.
        ``refresh`` ignores (and replaces) an existing entry and discards any partial work.
        """
        entry = self.entry(kind, key)
        if on_wait is not None and _is_locked(entry):
            on_wait(entry)
        with self.lock(entry, timeout_s=lock_timeout_s) as waited:
            if refresh:
                reason = "refresh requested"
            else:
                manifest, reason = verify_entry(entry)
                if manifest is not None:
                    return CacheOutcome(manifest, True, "verified hit", entry, waited)
            if resumable:
                work = entry.work_dir
                if refresh:
                    shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True, exist_ok=True)
            else:
                entry.work_dir.parent.mkdir(parents=True, exist_ok=True)
                work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=entry.work_dir.parent))
            try:
                meta = build(work)
                manifest = self.publish(entry, work, meta)
            except BaseException:
                if not resumable:
                    shutil.rmtree(work, ignore_errors=True)
                raise
            return CacheOutcome(manifest, False, reason, entry, waited)


def _is_locked(entry: CacheEntry) -> bool:
    """Best-effort probe (for a log line only): is another process building this key right now?"""
    if not entry.lock_path.exists():
        return False
    fd = os.open(entry.lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
