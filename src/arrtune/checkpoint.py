"""Checkpoints that are verified before a resume, and OS locks that keep one process per directory.

* **Manifest.** Every checkpoint holds ``manifest.json``: the size and SHA-256 of each of its files, written
  last, inside the staging directory, before the atomic rename into place. A checkpoint is *complete* only
  when every file a resume reads is present and matches the manifest; :func:`last_complete_checkpoint`
  skips (and names) any other one and falls back to the previous complete checkpoint.
* **Locks.** :func:`hold_lock` takes an exclusive ``fcntl.flock`` on a lock file for the life of the process
  (a second ``arrtune train`` on the same ``output_dir``, or a second ``compare`` on the same grid, gets one
  error line naming the first process); :func:`waiting_lock` waits for the lock instead (the GGUF conversion
  cache: a second process waits for the first conversion, then reuses it). The OS releases a lock when its
  process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from arrtune.atomic import write_atomic
from arrtune.errors import ArrtuneError

log = logging.getLogger("arrtune")

#: files every resumable checkpoint holds (plus ``rng_state*.pth``, and the replay position when replay is on)
CHECKPOINT_FILES = ("trainer_state.json", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
                    "scheduler.pt")  # fmt: skip
MANIFEST = "manifest.json"
LOCK_NAME = ".arrtune.lock"
_HELD: dict[str, int] = {}  # lock path -> open descriptor, kept for the life of the process


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint: str | os.PathLike) -> None:
    """Record the size and SHA-256 of every file of ``checkpoint`` in its ``manifest.json``."""
    root = Path(checkpoint)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    write_atomic(root / MANIFEST, json.dumps({"files": entries}, indent=1))


def checkpoint_problems(checkpoint: str | os.PathLike, needs_replay: bool) -> list[str]:
    """What keeps ``checkpoint`` from being resumed: missing files, or files that differ from the manifest."""
    path = Path(checkpoint)
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if not any(path.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    if needs_replay and not (path / "replay_state_rank0.json").is_file():
        missing.append("replay_state_rank0.json")
    if not (path / MANIFEST).is_file():
        missing.append(MANIFEST)
    if missing:
        return [f"missing {', '.join(missing)}"]
    try:
        entries = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        items = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in entries.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f"unreadable {MANIFEST}"]
    problems = []
    for name, size, sha in items:
        file = path / name
        if not file.is_file():
            problems.append(f"missing {name}")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, its manifest says {size}")
        elif _sha256(file) != sha:
            problems.append(f"{name} differs from its manifest (sha256)")
    return problems


def last_complete_checkpoint(root: str | os.PathLike, needs_replay: bool) -> str | None:
    """The newest ``checkpoint-N`` under ``root`` that :func:`checkpoint_problems` finds nothing wrong with;
    newer ones are skipped with a warning naming what is wrong."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(p.name.split("-")[1]), p) for p in root.iterdir()
             if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]  # fmt: skip
    for _, path in sorted(found, reverse=True):
        problems = checkpoint_problems(path, needs_replay)
        if not problems:
            return str(path)
        log.warning("ignoring incomplete checkpoint %s (%s)", path, "; ".join(problems))
    return None


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


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from (they will be logged again), and a last line
    cut short by a killed process."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))
