"""Spawning the native pause program and reading its report.

The daemon never forks Python code (gRPC threads are live): the pause is
posix_spawn'ed as an executable, does the namespace work itself, and reports
over a SOCK_SEQPACKET socketpair (see pause.c for the messages).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shim.errors import Internal, InvalidArgument
from shim.procs import ProcessIdentity, identify, with_argv

log = logging.getLogger(__name__)

PAUSE_NAME = "pyshim-pause"
_SYNC_FD = 3


def find_pause(explicit: Path | None) -> Path:
    """The pause executable: the flag, else the one built into the package, else PATH."""
    candidates = [explicit] if explicit else [Path(__file__).with_name(PAUSE_NAME)]
    found = shutil.which(PAUSE_NAME)
    if not explicit and found:
        candidates.append(Path(found))
    for path in candidates:
        if path is not None and os.access(path, os.X_OK):
            return path.resolve()
    raise FileNotFoundError(
        f"{PAUSE_NAME} not found (looked at {', '.join(map(str, candidates))}); "
        "install pyshim with pip so that it is built, or pass --pause"
    )


@dataclass(slots=True)
class PauseOrders:
    sandbox_id: str
    namespaces: frozenset[str]
    hostname: str | None = None
    sysctls: dict[str, str] = field(default_factory=dict)
    oom_score_adj: int | None = None

    def argv(self) -> list[str]:
        args = [PAUSE_NAME, "--id", self.sandbox_id, "--sync-fd", str(_SYNC_FD)]
        if self.namespaces:
            args += ["--ns", ",".join(sorted(self.namespaces))]
        if self.hostname:
            args += ["--hostname", self.hostname]
        for key, value in sorted(self.sysctls.items()):
            args += ["--sysctl", f"{key}={value}"]
        if self.oom_score_adj is not None:
            args += ["--oom-score-adj", str(self.oom_score_adj)]
        return args


@dataclass(slots=True)
class SpawnedPause:
    identity: ProcessIdentity
    # A NETLINK_ROUTE socket inside the new network namespace, if one was made.
    netlink: socket.socket | None
    warnings: list[str]


_devnull_fd: int | None = None


def _devnull() -> int:
    global _devnull_fd
    if _devnull_fd is None:
        _devnull_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return _devnull_fd


def spawn(pause: Path, orders: PauseOrders, timeout: float) -> SpawnedPause:
    """Start a pause and return once it holds its namespaces, or raise Internal.

    On failure nothing is left running: a pause that reported its pid is killed.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    null = _devnull()
    actions = [
        (os.POSIX_SPAWN_DUP2, null, 0),
        (os.POSIX_SPAWN_DUP2, null, 1),
        (os.POSIX_SPAWN_DUP2, null, 2),
        (os.POSIX_SPAWN_DUP2, theirs.fileno(), _SYNC_FD),
    ]
    try:
        spawned = os.posix_spawn(
            str(pause),
            orders.argv(),
            {},
            file_actions=actions,
            setsid=True,  # its own session: a daemon restart or ^C never reaches it
            setsigmask=(),
            setsigdef=(signal.SIGPIPE,),
        )
    except OSError as exc:
        ours.close()
        theirs.close()
        raise Internal(f"starting {pause}: {exc.strerror}") from exc
    theirs.close()
    try:
        return _read_report(ours, spawned, orders, timeout)
    finally:
        ours.close()


def _read_report(sock: socket.socket, spawned: int, orders: PauseOrders, timeout: float) -> SpawnedPause:
    pid: int | None = None
    netlink: socket.socket | None = None
    warnings: list[str] = []
    error: str | None = None
    invalid: str | None = None
    ready = False
    deadline = time.monotonic() + timeout
    try:
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                data, ancillary, _, _ = sock.recvmsg(512, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                error = f"no report within {timeout:.0f}s"
                break
            if not data:
                break  # every writer closed its end
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    netlink = socket.socket(fileno=int.from_bytes(payload[:4], "little"))
            word, _, rest = data.decode(errors="replace").partition(" ")
            if word == "pid":
                pid = int(rest)
            elif word == "ready":
                ready = True
            elif word == "warn":
                warnings.append(rest)
            elif word == "invalid":
                invalid = rest
            else:
                error = rest
        if invalid is not None:
            raise InvalidArgument(invalid)
        if error is None and not (ready and pid):
            error = "exited before it was ready"
        identity = identify(pid) if pid else None
        if error is None and identity is None:
            error = f"pid {pid} vanished right after start"
        if error is not None:
            raise Internal(f"pause for sandbox {orders.sandbox_id}: {error}")
        assert identity is not None
    except BaseException:
        if netlink is not None:
            netlink.close()
        for victim in {pid, spawned} - {None}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)  # type: ignore[arg-type]
        with contextlib.suppress(ChildProcessError):
            os.waitpid(spawned, 0)
        if pid and pid != spawned:
            # Orphaned by its parent's exit, it is now ours (we are a subreaper).
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        # A pid-namespace child whose parent was killed before it reported: find it by id.
        for stray in pauses_of(orders.sandbox_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(stray, signal.SIGKILL)
        raise
    if spawned != identity.pid:
        # New pid namespace: the spawned process was the pause's parent and has exited.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(spawned, 0)
    return SpawnedPause(identity=identity, netlink=netlink, warnings=warnings)


def pauses_of(sandbox_id: str) -> Iterator[int]:
    """Pids of pyshim-pause processes started for this sandbox id (from their argv)."""
    return with_argv(PAUSE_NAME, "--id", sandbox_id)
