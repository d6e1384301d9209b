"""Lock files held by a writer for as long as it writes, and the file modes a plain mkdir/open would give."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator


class Busy(Exception):
    """Another live process holds the lock."""


def try_lock(path: Path, create: bool = True) -> int | None:
    """An fd holding path's exclusive lock, or None if a live process holds it (or, without create, it is gone).

    The lock is taken on the file that is at path *after* locking: a holder that finished may unlink it
    while we wait, and a lock on an unlinked file guards nothing.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
        except FileNotFoundError:
            if create:
                raise
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
        if not create:
            return None


def release(path: Path, fd: int) -> None:
    """Unlink the lock file while still holding it, so nothing is left behind, then let go."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


@contextlib.contextmanager
def held(path: Path, wait: float = 1.0) -> Iterator[None]:
    """Hold path's lock for the block; Busy if another process keeps it longer than `wait` seconds."""
    deadline = time.monotonic() + wait
    while (fd := try_lock(path)) is None:
        if time.monotonic() >= deadline:
            raise Busy(str(path))
        time.sleep(0.05)
    try:
        yield
    finally:
        release(path, fd)


def umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_modes(folder: Path) -> None:
    """Give a folder written by libraries that create private files (safetensors: 0600) the modes mkdir/open give."""
    mask = umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest last) so a failure can take them back."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    for path in missing:
        path.mkdir(exist_ok=True)
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Take back folders make_parents created, where they are still empty."""
    for path in reversed(folders):
        with contextlib.suppress(OSError):
            path.rmdir()
