"""shim.lockfile: one daemon per state dir; the loser names the holder."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from shim.errors import FailedPrecondition
from shim.lockfile import hold


def test_the_loser_names_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "pyshim.lock"
    fd = hold(path, "--root x")
    try:
        with pytest.raises(FailedPrecondition) as err:
            hold(path, "--root x")
        assert f"another pyshim (pid {os.getpid()}) is running with --root x" in str(err.value)
    finally:
        os.close(fd)
    os.close(hold(path, "--root x"))  # the lock went with its holder's fd


def test_a_loser_by_a_hair_still_names_the_holder(tmp_path: Path) -> None:
    """The holder writes its pid just after taking the lock; a loser in between read
    an empty file and said 'pid unknown' (test_server's two-daemon test flaked so)."""
    path = tmp_path / "pyshim.lock"
    winner = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(winner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    late = threading.Timer(0.05, lambda: os.pwrite(winner, b"4242\n", 0))
    late.start()
    try:
        with pytest.raises(FailedPrecondition, match=r"another pyshim \(pid 4242\)"):
            hold(path, "--root x")
    finally:
        late.join()
        os.close(winner)
