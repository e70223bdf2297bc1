"""conmon, one per container, as CRI-O uses it: it holds the container's stdio,
writes the CRI log, runs the OCI runtime's `create`, and records the exit code
(and an OOM kill) in files that outlive the daemon.

The protocol (conmon 2.1, `--api-version 1 --sync`): conmon is spawned with two
inherited sockets named by `_OCI_SYNCPIPE` and `_OCI_STARTPIPE`. It waits for one
byte on the start pipe, forks once (with `--sync` the process we spawned stays
the monitor, our child), runs `RUNTIME create`, and writes one JSON line on the
sync pipe: `{"pid": N}` (the container's first process, stopped before its exec
until `RUNTIME start`) or `{"pid": -1, "message": "..."}`; EOF means it failed.
When the container exits conmon writes the code to `<exit-dir>/<id>` and
`<persist-dir>/exit` (137 after SIGKILL), plus `<persist-dir>/oom` after an OOM
kill, then exits. Writing `2 0 0` to `<bundle>/ctl` makes it reopen the log.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shim.cgroups import Cgroups
from shim.containers.runtime import Runtime
from shim.errors import FailedPrecondition, Internal
from shim.procs import ProcessIdentity, TrackedProcess, identify, with_argv

log = logging.getLogger(__name__)

EXIT_FILE = "exit"
OOM_FILE = "oom"
CONTROL_FIFO = "ctl"


@dataclass(frozen=True, slots=True)
class Launched:
    pid: ProcessIdentity  # the container's first process
    monitor: TrackedProcess  # conmon, our child


@dataclass(frozen=True, slots=True)
class Exit:
    code: int
    finished_at: int  # ns since the epoch
    oom_killed: bool


class Conmon:
    def __init__(self, binary: Path, cgroups: Cgroups, attach_dir: Path, timeout: float) -> None:
        self.binary = binary
        self.cgroups = cgroups
        self.attach_dir = attach_dir
        self.timeout = timeout
        attach_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def argv(
        self,
        runtime: Runtime,
        container_id: str,
        name: str,
        bundle: Path,
        log_path: str,
        tty: bool,
        stdin: bool,
        stdin_once: bool = False,
    ) -> list[str]:
        argv = [
            "conmon",
            "--api-version",
            "1",
            "--sync",
            "-c",
            container_id,
            "-u",
            container_id,
            "-n",
            name,
            "-r",
            str(runtime.create_program),
            "--runtime-arg",
            f"--root={runtime.root}",
            "-b",
            str(bundle),
            "-p",
            str(bundle / "pidfile"),
            "--exit-dir",
            str(bundle),
            "--persist-dir",
            str(bundle),
            "--socket-dir-path",
            str(self.attach_dir),
            "-l",
            f"k8s-file:{log_path}" if log_path else "none:",
        ]
        if tty:
            argv.append("--terminal")
        if stdin:
            argv.append("--stdin")
            # Without it conmon closes the container's stdin when an attach client
            # leaves: right for stdin_once, wrong otherwise (as CRI-O passes it).
            if not stdin_once:
                argv.append("--leave-stdin-open")
        return argv

    def launch(
        self,
        runtime: Runtime,
        container_id: str,
        name: str,
        bundle: Path,
        log_path: str,
        cgroup: str,
        tty: bool = False,
        stdin: bool = False,
        stdin_once: bool = False,
    ) -> Launched:
        """Start conmon in `cgroup` and have it create the container. On failure
        nothing of conmon is left (the runtime's half-made container is the caller's)."""
        sync, sync_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        start, start_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Started from the bundle dir: conmon writes files into its cwd (an "oom" marker).
            # subprocess forks and execs in C: no Python runs in the child.
            child = subprocess.Popen(
                self.argv(runtime, container_id, name, bundle, log_path, tty, stdin, stdin_once),
                executable=str(self.binary),
                cwd=bundle,
                env={
                    "_OCI_SYNCPIPE": str(sync_theirs.fileno()),
                    "_OCI_STARTPIPE": str(start_theirs.fileno()),
                    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    **dict(runtime.create_env),
                },
                pass_fds=(sync_theirs.fileno(), start_theirs.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # its own session: a daemon restart or ^C never reaches it
            )
        except OSError as exc:
            for s in (sync, sync_theirs, start, start_theirs):
                s.close()
            raise Internal(f"starting {self.binary}: {exc.strerror}") from exc
        # Reaped through its pidfd (the exit watcher), never by subprocess, whose late
        # waitpid on a reused pid could steal another child's exit status.
        child.returncode = 0
        pid = child.pid
        sync_theirs.close()
        start_theirs.close()
        monitor: TrackedProcess | None = None
        try:
            identity = identify(pid)
            monitor = TrackedProcess.adopt(identity) if identity else None
            if monitor is None:
                raise Internal(f"conmon for {container_id} exited at start")
            # Before it runs anything: its children (the runtime, the container's
            # monitor) then start in the pod's cgroup, never in the daemon's.
            self.cgroups.join(cgroup, pid)
            start.sendall(b"\0")
            reply = _read_line(sync, self.timeout)
            container_pid = _container_pid(reply, container_id)
            container = identify(container_pid)
            if container is None:
                raise FailedPrecondition(f"container {container_id} exited as soon as it was created")
            return Launched(pid=container, monitor=monitor)
        except BaseException:
            if monitor is not None:
                monitor.kill_and_reap()
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            raise
        finally:
            sync.close()
            start.close()


def forget(attach_dir: Path, container_id: str) -> None:
    """conmon links <socket dir>/<id> to the bundle (for attach sockets): gone with it."""
    (attach_dir / container_id).unlink(missing_ok=True)


def _read_line(sock: socket.socket, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise Internal(f"conmon did not report within {timeout:.0f}s") from None
        if not chunk:
            break
        data += chunk
        if len(data) > 1024 * 1024:
            break
    return data


def _container_pid(reply: bytes, container_id: str) -> int:
    line = reply.split(b"\n", 1)[0]
    try:
        answer = json.loads(line) if line else {}
    except ValueError:
        answer = {}
    pid = answer.get("data", answer.get("pid", -1)) if isinstance(answer, dict) else -1
    if isinstance(pid, int) and pid > 0:
        return pid
    message = answer.get("message") if isinstance(answer, dict) else None
    # The runtime refused the spec (e.g. a command that is not in the image): the request's doing.
    reason = message or "conmon exited without a reason"
    raise FailedPrecondition(f"the OCI runtime could not create container {container_id}: {reason}")


def read_exit(bundle: Path) -> Exit | None:
    """The exit conmon recorded, or None if it recorded none (it never saw one)."""
    path = bundle / EXIT_FILE
    try:
        text = path.read_text().strip()
        finished = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    try:
        code = int(text)
    except ValueError:
        code = 255
    return Exit(code=code, finished_at=finished, oom_killed=(bundle / OOM_FILE).exists())


def reopen_log(bundle: Path, log_path: str, timeout: float = 5.0) -> bool:
    """Ask conmon to reopen the log file (after a rotation) and return once it has (as
    CRI-O does: the caller looks for the file at once). False if nobody listens."""
    try:
        fd = os.open(bundle / CONTROL_FIFO, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):
            return False
        raise
    try:
        os.write(fd, b"2 0 0\n")
    finally:
        os.close(fd)
    deadline = time.monotonic() + timeout
    while log_path and not os.path.exists(log_path) and time.monotonic() < deadline:
        time.sleep(0.001)
    return True


def monitors_of(container_id: str) -> Iterator[int]:
    """Pids of conmons started for this container id (from their argv): for the sweep."""
    return with_argv("conmon", "-c", container_id)
