"""One daemon per state dir and per socket: an exclusive lock on a file in each,
taken before anything is read or made, held for the daemon's life.

The kernel drops a flock when its holder dies (also on kill -9), so a lock is
never stale. The file holds the holder's pid, for the loser's message.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from shim.errors import FailedPrecondition

LOCK_NAME = "pyshim.lock"


def hold(path: Path, what: str) -> int:
    """Take the lock at `path` (created if missing); the fd must stay open."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # CLOEXEC: a pause or conmon must never inherit it, or it would outlive us.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise FailedPrecondition(
            f"another pyshim (pid {holder}) is running with {what}; stop it first, "
            "or give this one its own --socket, --root and --run-root"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """The pid in the lock file; a holder that just took the lock writes it a moment later."""
    for _ in range(50):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.01)
    return "unknown"


def hold_all(root: Path, run_root: Path, socket: Path) -> list[int]:
    fds: list[int] = []
    try:
        fds.append(hold(root / LOCK_NAME, f"--root {root}"))
        fds.append(hold(run_root / LOCK_NAME, f"--run-root {run_root}"))
        fds.append(hold(socket.with_name(socket.name + ".lock"), f"--socket {socket}"))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds
