"""Atomic file writes and content hashes.

Every checkpoint, dataset, report and export is written to a temporary file in the target's folder and
renamed over the target, so a reader never sees a partial file and a crash (or a full disk) leaves the
previous version intact.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_stale_temps(directory: str | os.PathLike[str], targets: Iterable[str]) -> list[Path]:
    """Remove what :func:`atomic_path` / :func:`atomic_dir` leave behind when their process is killed mid-write.

    Only temporaries of the given target names (glob patterns, e.g. ``checkpoint_epoch_*.pt``) are removed: the
    caller must be the one writer of those targets in ``directory``, so that nothing removed is still being written.
    Returns the removed paths.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    patterns = [f".{target}.*.tmp" for target in targets]
    removed = []
    for entry in sorted(root.iterdir()):
        if not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` as a whole."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM):  # kernel or filesystem without the flag
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(src: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make directory ``src`` become ``target``, replacing an existing ``target`` as a whole.

    Where the kernel can, the two are exchanged in one step, so a crash leaves either the old or the new
    directory at ``target``, never neither. Elsewhere the old one is renamed aside first; a crash between the
    two renames leaves it beside the target as ``.{name}.old-*``.
    """
    src, target = Path(src), Path(target)
    if not target.exists():
        os.replace(src, target)
    elif _exchange(src, target):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old directory
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, old)
        os.replace(src, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, UTF-8 kept readable, trailing newline; byte-identical for equal input."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=2) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(
    path: str | os.PathLike[str],
    *,
    timeout_s: float | None = None,
    poll_s: float = 0.2,
    timeout_error: Callable[[], Exception] | None = None,
) -> Iterator[float]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing); yields the seconds spent waiting for it.

    The kernel drops the lock when its process dies, so it never goes stale. The file holds the holder's pid and is
    never deleted: unlinking a lock file lets two processes lock two different inodes. Past ``timeout_s`` it raises
    ``timeout_error()`` (default: a :class:`TimeoutError` naming the file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    start = time.monotonic()
    try:
        if timeout_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() - start >= timeout_s:
                        if timeout_error is not None:
                            raise timeout_error() from None
                        raise TimeoutError(f"{path} held by another process") from None
                    time.sleep(poll_s)
        waited = time.monotonic() - start
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield waited
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
