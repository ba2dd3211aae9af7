"""Locks that keep one process on a directory: :func:`hold_lock` takes an exclusive ``fcntl.flock`` on a lock
file for the life of the process (a second process gets one error line naming the first one's pid), and
:func:`waiting_lock` waits for the lock instead (the GGUF conversion cache: a second process waits for the
first conversion, then reuses it). The OS releases a lock when its process ends, however it ends."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from arrtune.errors import ArrtuneError

_HELD: dict[str, int] = {}  # lock path -> open descriptor, kept for the life of the process


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "another process"


def hold_lock(path: str | os.PathLike, what: str) -> None:
    """Lock ``path`` (created if needed) for the rest of this process, or raise ``ArrtuneError`` naming the
    process that holds it. ``what`` names the locked thing in the message. Re-entrant within a process."""
    path = Path(path)
    if str(path) in _HELD:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ArrtuneError(f"{path}: cannot create the lock file ({exc.strerror or exc})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ArrtuneError(f"{what} is in use by {holder} (lock {path}); wait for it to finish") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD[str(path)] = fd


def release_lock(path: str | os.PathLike) -> None:
    """Release a lock taken with :func:`hold_lock` (a no-op when this process does not hold it)."""
    fd = _HELD.pop(str(Path(path)), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the ``with`` block, waiting for another process to let go."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
