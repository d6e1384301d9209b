"""This process's private temp folders (the files the app serves, offloaded pruned weights): removed at exit, on
SIGTERM and SIGINT, and, when a server died without removing them (SIGKILL, a crash), by the next server to start.

Each folder's name carries its process id (`wanda-gui-[KIND-]PID-XXXXXXXX`), so that a later start can tell a dead
server's folders from a live one's without reading anything inside them."""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import signal
import stat
import tempfile
from pathlib import Path

PREFIX = "wanda-gui-"
OWNED_NAME = re.compile(r"^wanda-gui-(?:[a-z]+-)?(?P<pid>[1-9][0-9]{0,6})-[a-z0-9_]+$")

_folders: list[Path] = []


def private_folder(kind: str = "") -> Path:
    """A new folder (0700) in the temp dir, named after this process; removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}{os.getpid()}-")).resolve()
    if not _folders:
        atexit.register(remove_private_folders)
    _folders.append(folder)
    return folder


def remove_private_folders() -> None:
    for folder in _folders:
        shutil.rmtree(folder, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_servers_folders() -> None:
    """Remove the private folders of this user's servers that are no longer running; a live one's are never touched,
    nor folders named otherwise (older versions', which carry no process id)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        owner = OWNED_NAME.match(folder.name)
        try:
            info = folder.lstat()
        except OSError:
            continue
        if owner and stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not alive(int(owner["pid"])):
            shutil.rmtree(folder, ignore_errors=True)


def remove_on_signals() -> None:
    """SIGTERM (a plain `kill`) and SIGINT (Ctrl-C) remove the private folders as a normal exit does, run whatever
    handled the signal before, and end the process with the shell's code for it (128 + the signal's number). A
    signal the process was started ignoring (a background job's SIGINT) stays ignored."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if previous != signal.SIG_IGN:
            signal.signal(signum, functools.partial(_on_signal, previous))


def _on_signal(previous, signum: int, frame) -> None:
    remove_private_folders()
    if callable(previous) and previous is not signal.default_int_handler:  # Python's own: a KeyboardInterrupt
        previous(signum, frame)
    raise SystemExit(128 + signum)
