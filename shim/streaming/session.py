"""The processes behind a stream: a command run in a container (exec, with or
without a terminal) and a container's own stdio (attach, through conmon).

They talk to the client through `StreamIO`, which each transport (SPDY,
WebSocket) fills in; they know nothing of frames or channels. A client that goes
away aborts the session: an exec'd command is killed (with whatever it started),
an attach lets go of conmon's socket. Nothing outlives the session.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from shim.containers.exec import ENV, ExecFiles, exec_files, kill_command
from shim.containers.runtime import Runtime
from shim.errors import FailedPrecondition, Internal

log = logging.getLogger(__name__)

CHUNK = 32 * 1024
# How long the runtime gets to hand over the terminal of an exec.
CONSOLE_WAIT = 10.0
# How long an abort waits for the runtime to say which process it started.
PID_FILE_WAIT = 5.0
# After an exec'd command ended, output still buffered in pipes that a process it
# left behind holds open: how long we keep copying before we end the session.
DRAIN_WAIT = 2.0
# conmon (src/ctr_stdio.c, conn_sock.c): each attach message is one pipe byte then data.
_ATTACH_STDOUT = 2
_ATTACH_STDERR = 3
_ATTACH_BUFFER = 8192 + 1
_CTL_RESIZE = 1


class Input(Protocol):
    def read(self) -> bytes:
        """The next bytes from the client; b"" at end of input."""
        ...


class Output(Protocol):
    def write(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class TerminalSize:
    width: int
    height: int


@dataclass(slots=True)
class StreamIO:
    """What a session may use of its client. Absent streams are None."""

    stdin: Input | None
    stdout: Output | None
    stderr: Output | None
    # Blocks for the next terminal size the client sends; None when it sends no more.
    resize: Callable[[], TerminalSize | None] | None
    _abort: Callable[[], None] | None = None
    _gone: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def on_abort(self, abort: Callable[[], None]) -> None:
        """`abort` runs once if the client goes away (at once if it already has)."""
        with self._lock:
            self._abort = abort
            gone = self._gone
        if gone:
            abort()

    def client_gone(self) -> None:
        """Called by the transport when the connection ends before the session."""
        with self._lock:
            self._gone, abort = True, self._abort
        if abort is not None:
            abort()


@dataclass(frozen=True, slots=True)
class ExecTarget:
    runtime: Runtime
    container_id: str
    bundle: Path
    cmd: tuple[str, ...]
    tty: bool
    tasks: Callable[[], list[int]]  # pids in the container's cgroup


@dataclass(frozen=True, slots=True)
class AttachTarget:
    container_id: str
    socket_path: Path  # conmon's attach socket
    control_path: Path  # conmon's control fifo (terminal resize)
    tty: bool
    stdin: bool  # the container was created with stdin open


def _daemon(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=_logged(target, name), name=name, daemon=True)
    thread.start()
    return thread


def _logged(target: Callable[[], None], name: str) -> Callable[[], None]:
    def run() -> None:
        try:
            target()
        except Exception:  # a pump ends with its client or process; never with a traceback on stderr
            log.debug("event=stream_pump_failed pump=%s", name, exc_info=True)

    return run


# ---- exec ---------------------------------------------------------------------------


def run_exec(target: ExecTarget, io: StreamIO) -> int:
    """Run the command with the client's stdio; its exit code (128+N after signal N)."""
    with exec_files(target.bundle, list(target.cmd), terminal=target.tty) as files:
        if target.tty and target.runtime.kind == "runc":
            return _exec_host_terminal(target, io, files)
        if target.tty:
            return _exec_terminal(target, io, files)
        return _exec_pipes(target, io, files)


def _killer(
    proc: subprocess.Popen[bytes], pid_file: Path, target: ExecTarget, why: str
) -> Callable[[], None]:
    def kill() -> None:
        if proc.poll() is not None:
            return
        log.info("event=exec_killed container=%s reason=%s", target.container_id, why)
        # A client that leaves at once may beat the runtime's pid file: wait for it (or
        # for the runtime to give up), else the command would start after the kill.
        deadline = time.monotonic() + PID_FILE_WAIT
        while not pid_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        kill_command(proc, pid_file, target.tasks)

    return kill


def _exec_pipes(target: ExecTarget, io: StreamIO, files: ExecFiles) -> int:
    proc = subprocess.Popen(
        files.argv(target.runtime, target.container_id),
        stdin=subprocess.PIPE if io.stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        start_new_session=True,
    )
    io.on_abort(_killer(proc, files.pid, target, "client gone"))
    if io.stdin is not None:
        assert proc.stdin is not None
        # The pump owns the pipe's write end: the command sees EOF when the client's
        # stdin ends, and no fd number of ours is written to after it was closed.
        stdin, pipe = io.stdin, os.dup(proc.stdin.fileno())
        proc.stdin.close()
        _daemon(lambda: _pump_to_fd(stdin, pipe), "exec-stdin")
    assert proc.stdout is not None and proc.stderr is not None
    outputs = {proc.stdout.fileno(): io.stdout, proc.stderr.fileno(): io.stderr}
    try:
        _copy_outputs(outputs, proc)
        return _exit_code(proc.wait())
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _pump_to_fd(source: Input, fd: int) -> None:
    """Client stdin into `fd`, which the pump owns and closes at the end (EOF)."""
    try:
        while data := source.read():
            _write_all(fd, data)
    except OSError:
        pass  # the command is gone
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_outputs(outputs: dict[int, Output | None], proc: subprocess.Popen[bytes]) -> None:
    """Until every pipe is at EOF; once the command ended, for DRAIN_WAIT more at most
    (something it started may hold the pipes open)."""
    with selectors.DefaultSelector() as selector:
        for fd in outputs:
            selector.register(fd, selectors.EVENT_READ)
        deadline: float | None = None
        while selector.get_map():
            if deadline is None and proc.poll() is not None:
                deadline = time.monotonic() + DRAIN_WAIT
            wait = 0.2 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                return
            for key, _ in selector.select(wait):
                data = os.read(key.fd, CHUNK)
                if not data:
                    selector.unregister(key.fd)
                    continue
                sink = outputs[key.fd]
                if sink is not None:
                    with contextlib.suppress(OSError):
                        sink.write(data)


def _exit_code(status: int) -> int:
    return 128 - status if status < 0 else status


def _exec_terminal(target: ExecTarget, io: StreamIO, files: ExecFiles) -> int:
    # A path the runtime can connect to, short enough for sun_path whatever the state dirs.
    where = Path(tempfile.mkdtemp(prefix="pyshim-tty-"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    master = -1
    try:
        console = where / "console.sock"
        listener.bind(str(console))
        listener.listen(1)
        proc = subprocess.Popen(
            files.argv(target.runtime, target.container_id, "--console-socket", str(console)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
            start_new_session=True,
        )
        try:
            master = _receive_terminal(listener, proc, target)
        except BaseException:
            kill_command(proc, files.pid, target.tasks)
            raise
        io.on_abort(_killer(proc, files.pid, target, "client gone"))
        return _serve_terminal(master, proc, io, lambda fd, size: _set_size(fd, size))
    finally:
        listener.close()
        if master >= 0:
            os.close(master)
        shutil.rmtree(where, ignore_errors=True)


def _exec_host_terminal(target: ExecTarget, io: StreamIO, files: ExecFiles) -> int:
    """runc uses a console socket only when it detaches (and then the command's exit
    would be reaped by others): in the foreground it relays between its own stdio and
    the container's terminal, so its stdio is a terminal of ours, as CRI-O does. It
    resizes the container's terminal from its own on SIGWINCH, which we send: it has
    no controlling terminal for the kernel to signal."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            files.argv(target.runtime, target.container_id),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=ENV,
            start_new_session=True,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    try:
        io.on_abort(_killer(proc, files.pid, target, "client gone"))

        return _serve_terminal(master, proc, io, lambda fd, size: _resize_runc(fd, size, proc))
    finally:
        os.close(master)


def _receive_terminal(listener: socket.socket, proc: subprocess.Popen[bytes], target: ExecTarget) -> int:
    """The pty master the runtime sends over the console socket (SCM_RIGHTS)."""
    deadline = time.monotonic() + CONSOLE_WAIT
    listener.settimeout(0.1)
    while True:
        try:
            conn, _ = listener.accept()
            break
        except TimeoutError:
            if proc.poll() is not None:
                assert proc.stderr is not None
                message = proc.stderr.read(4096).decode(errors="replace").strip()
                raise FailedPrecondition(
                    f"exec in {target.container_id} failed: {message or f'exit {proc.returncode}'}"
                ) from None
            if time.monotonic() > deadline:
                raise Internal(
                    f"exec in {target.container_id}: no terminal within {CONSOLE_WAIT:.0f}s"
                ) from None
    with conn:
        conn.settimeout(CONSOLE_WAIT)
        _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    if not fds:
        raise Internal(f"exec in {target.container_id}: the runtime sent no terminal")
    return fds[0]


def _serve_terminal(
    master: int, proc: subprocess.Popen[bytes], io: StreamIO, apply: Callable[[int, TerminalSize], None]
) -> int:
    if io.resize is not None:
        resize, sized = io.resize, os.dup(master)
        _daemon(lambda: _apply_sizes(resize, lambda size: apply(sized, size), sized), "exec-resize")
    if io.stdin is not None:
        stdin, own = io.stdin, os.dup(master)  # the pump's own: closed by it, never reused under it
        _daemon(lambda: _pump_to_terminal(stdin, own), "exec-tty-stdin")
    _copy_terminal(master, io.stdout, proc)
    if proc.stderr is not None:
        proc.stderr.close()
    return _exit_code(proc.wait())


def _apply_sizes(
    next_size: Callable[[], TerminalSize | None], apply: Callable[[TerminalSize], None], own: int = -1
) -> None:
    """Every size the client sends, until it sends no more; `own` (an fd of the
    thread's own) is closed at the end."""
    try:
        while (size := next_size()) is not None:
            if size.width and size.height:  # a zero size is no size, as runtimes take it
                with contextlib.suppress(OSError):
                    apply(size)
    finally:
        if own >= 0:
            os.close(own)


def _resize_runc(fd: int, size: TerminalSize, proc: subprocess.Popen[bytes]) -> None:
    _set_size(fd, size)
    if proc.poll() is None:  # never a signal to a pid that may have been reused
        os.kill(proc.pid, signal.SIGWINCH)


def _set_size(fd: int, size: TerminalSize) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.height, size.width, 0, 0))


def _pump_to_terminal(source: Input, master: int) -> None:
    try:
        while data := source.read():
            _write_all(master, data)
        # A terminal has no half-close: the end of input is its EOF character.
        eof = termios.tcgetattr(master)[6][termios.VEOF]
        _write_all(master, eof if isinstance(eof, bytes) else bytes([eof]))
    except OSError:
        pass  # the command and its terminal are gone
    finally:
        os.close(master)


def _copy_terminal(master: int, sink: Output | None, proc: subprocess.Popen[bytes]) -> None:
    """Until the terminal is closed by everything in the container (EIO)."""
    deadline: float | None = None
    with selectors.DefaultSelector() as selector:
        selector.register(master, selectors.EVENT_READ)
        while True:
            if deadline is None and proc.poll() is not None:
                deadline = time.monotonic() + DRAIN_WAIT
            wait = 0.2 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                return
            if not selector.select(wait):
                continue
            try:
                data = os.read(master, CHUNK)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return
                raise
            if not data:
                return
            if sink is not None:
                with contextlib.suppress(OSError):
                    sink.write(data)


# ---- attach -------------------------------------------------------------------------


def run_attach(target: AttachTarget, io: StreamIO) -> None:
    """Copy the container's output to the client and the client's input to the
    container, until either ends. conmon sends stdout and stderr over one socket,
    each message tagged with its pipe."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        _connect_long(sock, target.socket_path)
    except OSError as exc:
        sock.close()
        raise FailedPrecondition(
            f"container {target.container_id}: its monitor's attach socket is gone ({exc.strerror or exc})"
        ) from None
    io.on_abort(lambda: _shutdown(sock))
    try:
        if io.resize is not None and target.tty:
            resize = io.resize
            _daemon(
                lambda: _apply_sizes(resize, lambda size: _resize_through(target.control_path, size)),
                "attach-resize",
            )
        if io.stdin is not None and target.stdin:
            stdin = io.stdin
            _daemon(lambda: _pump_to_socket(stdin, sock), "attach-stdin")
        elif io.stdin is not None:
            # The container has no stdin: what the client sends is dropped, not left to
            # fill the transport's buffers (which would stop it noticing the client go).
            drained = io.stdin
            _daemon(lambda: _drain(drained), "attach-stdin-drop")
        while True:
            try:
                message = sock.recv(_ATTACH_BUFFER)
            except OSError:
                return
            if not message:
                return
            sink = io.stderr if message[0] == _ATTACH_STDERR and not target.tty else io.stdout
            if sink is not None and len(message) > 1:
                with contextlib.suppress(OSError):
                    sink.write(message[1:])
    finally:
        sock.close()


def _connect_long(sock: socket.socket, path: Path) -> None:
    """Connect to a socket whatever its path's length (sun_path holds 107 bytes): through
    the /proc link of an fd of its directory, as conmon binds it."""
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock.connect(f"/proc/self/fd/{directory}/{path.name}")
    finally:
        os.close(directory)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _pump_to_socket(source: Input, sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.read():
            sock.sendall(data)
        # conmon closes the container's stdin when its client half-closes, if stdin_once.
        sock.shutdown(socket.SHUT_WR)


def _drain(source: Input) -> None:
    with contextlib.suppress(OSError):
        while source.read():
            pass


def _resize_through(control: Path, size: TerminalSize) -> None:
    fd = os.open(control, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.write(fd, f"{_CTL_RESIZE} {size.height} {size.width}\n".encode())
    finally:
        os.close(fd)


def parse_size(raw: bytes) -> TerminalSize | None:
    """A TerminalSize as clients send it: {"Width": W, "Height": H}."""
    try:
        value = json.loads(raw)
        width, height = int(value["Width"]), int(value["Height"])
    except (ValueError, KeyError, TypeError, OverflowError):
        return None
    if not (0 <= width <= 0xFFFF and 0 <= height <= 0xFFFF):
        return None
    return TerminalSize(width=width, height=height)
