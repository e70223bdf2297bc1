"""ExecSync: a command run in a running container, its output and exit code.

The OCI runtime's `exec` runs it (with the container's process settings: user,
environment, capabilities); its stdout and stderr come back on pipes, each
bounded. On timeout the command and everything it started are killed: the
runtime's client alone would leave a grandchild holding the pipes open.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.containers.runtime import Runtime
from shim.errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted
from shim.store import write_atomically

# Each of stdout and stderr; the reply must also fit a gRPC message (16 MiB).
MAX_OUTPUT = 7 * 1024 * 1024
# After the command is killed, how long the runtime's client gets to reap it and exit.
CLIENT_WAIT = 5.0
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


@dataclass(frozen=True, slots=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int


def exec_sync(
    runtime: Runtime,
    container_id: str,
    bundle: Path,
    cmd: list[str],
    timeout: float,
    tasks: Callable[[], list[int]],
) -> ExecResult:
    """Run `cmd` in the container with the container's own process settings (user,
    groups, capabilities, no_new_privs, cwd, environment); timeout 0 waits for ever.
    `tasks` lists the pids in the container's cgroup: on timeout, those the command
    started are killed too."""
    with exec_files(bundle, cmd) as files:
        proc = subprocess.Popen(
            files.argv(runtime, container_id),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
            start_new_session=True,
        )
        out, err, problem = _collect(proc, time.monotonic() + timeout if timeout > 0 else None)
        if problem is not None:
            kill_command(proc, files.pid, tasks)
            proc.wait()
            if problem == "timeout":
                raise DeadlineExceeded(
                    f"ExecSync in {container_id}: the command did not end within {timeout:g}s"
                )
            raise ResourceExhausted(
                f"ExecSync in {container_id}: the command wrote more than {MAX_OUTPUT} bytes to {problem}; "
                "it was killed"
            )
        return ExecResult(stdout=out, stderr=err, exit_code=proc.wait())


@dataclass(frozen=True, slots=True)
class ExecFiles:
    """An exec's process spec and the pid file the runtime writes, in the bundle."""

    process: Path
    pid: Path

    def argv(self, runtime: Runtime, container_id: str, *extra: str) -> list[str]:
        return runtime.argv(
            "exec", "--process", str(self.process), "--pid-file", str(self.pid), *extra, container_id
        )


@contextlib.contextmanager
def exec_files(bundle: Path, cmd: list[str], terminal: bool = False) -> Iterator[ExecFiles]:
    """The files of one exec, removed when it is over."""
    token = secrets.token_hex(8)
    files = ExecFiles(process=bundle / f"exec-{token}.json", pid=bundle / f"exec-{token}.pid")
    # Spelled out, as CRI-O does: crun's exec without --process runs as root in /.
    write_atomically(files.process, json.dumps(process_for(bundle, cmd, terminal)).encode(), durable=False)
    try:
        yield files
    finally:
        files.pid.unlink(missing_ok=True)
        files.process.unlink(missing_ok=True)


def process_for(bundle: Path, cmd: list[str], terminal: bool = False) -> dict[str, Any]:
    """The container's `process` from its config.json, running `cmd`."""
    try:
        process = json.loads((bundle / "config.json").read_bytes())["process"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FailedPrecondition(f"the container's spec cannot be read: {exc}") from None
    process["args"] = list(cmd)
    process["terminal"] = terminal
    return dict(process)


def _collect(proc: subprocess.Popen[bytes], deadline: float | None) -> tuple[bytes, bytes, str | None]:
    assert proc.stdout is not None and proc.stderr is not None
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    sizes = {"stdout": 0, "stderr": 0}
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, "stdout")
        selector.register(proc.stderr, selectors.EVENT_READ, "stderr")
        while selector.get_map():
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return b"", b"", "timeout"
            for key, _ in selector.select(wait):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                sizes[key.data] += len(data)
                if sizes[key.data] > MAX_OUTPUT:
                    return b"", b"", str(key.data)
                chunks[key.data].append(data)
    return b"".join(chunks["stdout"]), b"".join(chunks["stderr"]), None


def kill_command(proc: subprocess.Popen[bytes], pid_file: Path, tasks: Callable[[], list[int]]) -> None:
    """The command and what it started (its process group, and its descendants in the
    container's cgroup: a runtime may put it in a group of its own), then the runtime's
    client."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().strip())
        victims = {pid} | {p for p in tasks() if pid in _ancestors(p)}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
    # The runtime's client reaps the command it started: killed first, it would leave the
    # command a zombie (ours, as a subreaper) that keeps a pod's pid namespace from ending.
    try:
        proc.wait(CLIENT_WAIT)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _ancestors(pid: int) -> set[int]:
    found: set[int] = set()
    while pid > 1 and pid not in found:
        try:
            with open(f"/proc/{pid}/stat") as f:
                raw = f.read()
        except OSError:
            break
        pid = int(raw[raw.rindex(")") + 2 :].split()[1])
        found.add(pid)
    return found
