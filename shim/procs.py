"""Process identity, signalling and exit watching through pidfds.

A recorded process is named by pid, start time (field 22 of /proc/PID/stat,
in clock ticks since boot) and boot id, so that a reused pid or a reboot is
never mistaken for the process that was recorded.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36


@cache
def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    pid: int
    start_time: int
    boot_id: str


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def identify(pid: int) -> ProcessIdentity | None:
    """The identity of a live (non-zombie) process, or None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return ProcessIdentity(pid=pid, start_time=int(fields[19]), boot_id=boot_id())


def with_argv(program: str, *args: str) -> Iterator[int]:
    """Pids of live processes started as `program` with `args` next to each other in
    their argv (e.g. "--id", ID): how the sweep finds what a dead daemon started."""
    head = f"{program}\0".encode()
    marker = ("\0" + "\0".join(args) + "\0").encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if cmdline.startswith(head) and marker in cmdline:
            yield int(entry.name)


def chrooted() -> bool:
    """We run in a chroot (our root is not init's): then an OCI runtime's `exec`
    enters a container's mount namespace with that namespace's root, the real one,
    not the container's (seen on Debian 12's runc and crun)."""
    try:
        ours, inits = os.stat("/"), os.stat("/proc/1/root")
    except OSError:
        return False
    return (ours.st_dev, ours.st_ino) != (inits.st_dev, inits.st_ino)


def become_subreaper() -> None:
    """Orphaned pauses (their spawner exits) are re-parented to us, so we can reap them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("event=subreaper_failed errno=%d", ctypes.get_errno())


class TrackedProcess:
    """A process held by a pidfd: signals and waits are exact, never racing pid reuse."""

    def __init__(self, identity: ProcessIdentity, pidfd: int) -> None:
        self.identity = identity
        self._pidfd: int | None = pidfd
        self._lock = threading.Lock()
        self.exited = threading.Event()

    @classmethod
    def adopt(cls, identity: ProcessIdentity) -> TrackedProcess | None:
        """Open a pidfd for a recorded process if it is still that process, else None."""
        if identity.boot_id != boot_id():
            return None
        try:
            pidfd = os.pidfd_open(identity.pid)
        except ProcessLookupError:
            return None
        # Checked after the pidfd is open: if the pid was reused before, the start time differs.
        if identify(identity.pid) != identity:
            os.close(pidfd)
            return None
        return cls(identity, pidfd)

    @property
    def pidfd(self) -> int | None:
        return self._pidfd

    def signal(self, signo: int) -> None:
        with self._lock:
            if self._pidfd is None:
                return
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signo)

    def reap_and_close(self) -> None:
        """Called once the pidfd is readable (the process exited)."""
        with self._lock:
            if self._pidfd is None:
                return
            # Reaps only if it is our child; a re-adopted pause belongs to init.
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
            os.close(self._pidfd)
            self._pidfd = None
        self.exited.set()

    def kill_and_reap(self, timeout: float = 5.0) -> None:
        """SIGKILL and wait for the exit without the ExitWatcher (a pause never watched)."""
        with self._lock:
            fd = self._pidfd
            if fd is None:
                return
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            try:
                os.waitid(os.P_PIDFD, fd, os.WEXITED)  # our child: returns once it is gone
            except ChildProcessError:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                if not poller.poll(timeout * 1000):
                    raise TimeoutError(
                        f"pid {self.identity.pid} still alive {timeout}s after SIGKILL"
                    ) from None
            os.close(fd)
            self._pidfd = None
        self.exited.set()

    def terminate(self, grace: float) -> bool:
        """SIGTERM, then SIGKILL after `grace` seconds (at once if 0); True once it exited.

        Needs an ExitWatcher watching this process: it sets `exited`.
        """
        if grace > 0:
            self.signal(signal.SIGTERM)
            if self.exited.wait(grace):
                return True
            log.warning("event=sigkill pid=%d reason=no exit %.1fs after SIGTERM", self.identity.pid, grace)
        self.signal(signal.SIGKILL)
        return self.exited.wait(5.0)


class ExitWatcher:
    """One thread, one epoll over every tracked pidfd; runs a callback on each exit."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watched: dict[int, tuple[TrackedProcess, Callable[[TrackedProcess], None]]] = {}
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._epoll.register(self._stop_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._loop, name="exit-watcher", daemon=True)
        self._thread.start()

    def watch(self, proc: TrackedProcess, on_exit: Callable[[TrackedProcess], None]) -> None:
        fd = proc.pidfd
        if fd is None:
            on_exit(proc)
            return
        with self._lock:
            self._watched[fd] = (proc, on_exit)
            self._epoll.register(fd, select.EPOLLIN)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        self._epoll.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _loop(self) -> None:
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == self._stop_r:
                    return
                with self._lock:
                    entry = self._watched.pop(fd, None)
                    if entry is not None:
                        self._epoll.unregister(fd)
                if entry is None:
                    continue
                proc, on_exit = entry
                try:
                    proc.reap_and_close()
                    on_exit(proc)
                except Exception:  # this thread must outlive any one process's trouble
                    log.exception("event=exit_callback_failed pid=%d", proc.identity.pid)


def wait_gone(pids: list[int], timeout: float = 2.0) -> None:
    """Wait until processes signalled with SIGKILL (not ours to reap) have exited."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while identify(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.005)


class OrphanReaper:
    """Reaps zombies re-parented to the daemon (a subreaper) that nothing else waits
    for: a container process whose conmon died, a command an exec client left. Left
    unreaped, a dead process pins its pid namespace (the pod's pause cannot exit) and
    keeps its cgroup from being removed. Only children outside the daemon's own
    cgroup are taken: the daemon's own children (runtime clients, plugins) are in its
    cgroup and their callers wait for them."""

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._own = _cgroup_of("self")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="orphan-reaper", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.reap()
            except Exception:  # this thread must outlive any one process's trouble
                log.exception("event=orphan_reap_failed")

    def reap(self) -> int:
        reaped = 0
        for pid in _children():
            fields = _stat_fields(pid)
            if fields is None or fields[0] != "Z" or _cgroup_of(str(pid)) == self._own:
                continue
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped += 1
                    log.info("event=orphan_reaped pid=%d", pid)
        return reaped


def _children() -> set[int]:
    found: set[int] = set()
    for task in os.scandir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task.name}/children") as f:
                found.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return found


def _cgroup_of(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return f.read()
    except OSError:
        return ""
