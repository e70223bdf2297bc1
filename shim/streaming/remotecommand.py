"""Exec and attach sessions over Kubernetes' remote-command protocols.

SPDY/3.1 (X-Stream-Protocol-Version v4, v3, v2 or channel.k8s.io): the client
opens one SPDY stream per standard stream, named by its `streamType` header
(error, stdin, stdout, stderr, resize); we wait for all those the request
implies. WebSocket (v5/v4.channel.k8s.io, channel.k8s.io, base64.channel.k8s.io):
one connection, channels 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize.

The end is the same in both: the exit status on the error stream (v4 and later:
a JSON Status, whose NonZeroExitCode cause carries the code; older protocols:
the message as text, nothing on success), then the streams close.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shim import metrics
from shim.errors import InvalidArgument, ShimError
from shim.streaming import spdy
from shim.streaming.requests import AttachRequest, ExecRequest, Targets
from shim.streaming.session import (
    AttachTarget,
    ExecTarget,
    StreamIO,
    TerminalSize,
    parse_size,
    run_attach,
    run_exec,
)
from shim.streaming.upgrade import (
    SPDY,
    STREAM_PROTOCOL,
    WEBSOCKET,
    Upgraded,
    check_upgrade,
    half_close,
    negotiate,
)
from shim.streaming.websocket import CLOSE_SIGNAL, ChannelInput, ChannelOutput, ChannelSocket

log = logging.getLogger(__name__)

V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"
SPDY_PROTOCOLS = (V4, "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io")
# v5 is what client-go's WebSocket executor (crictl --transport websocket) offers;
# kubelet's own server stops at v4.
WEBSOCKET_PROTOCOLS = (V5, V4, "v4.base64.channel.k8s.io", "channel.k8s.io", "base64.channel.k8s.io")
# As kubelet's streaming server: the client has this long to open its streams.
STREAM_CREATION_TIMEOUT = 30.0
# After the status is sent, how long the client gets to read it and hang up.
LINGER = 5.0
STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
MAX_RESIZE_MESSAGE = 4096

Request = ExecRequest | AttachRequest


@dataclass(frozen=True, slots=True)
class Outcome:
    exit_code: int | None  # None: attach, or the command never ran
    error: str = ""  # why it failed to run


def serve(upgraded: Upgraded, request: Request, targets: Targets) -> None:
    kind = "exec" if isinstance(request, ExecRequest) else "attach"
    # Resolved before the upgrade: a container that stopped meanwhile is an HTTP error.
    target = (
        targets.exec_target(request) if isinstance(request, ExecRequest) else targets.attach_target(request)
    )
    start = time.monotonic()
    if upgraded.kind == SPDY:
        protocol = _serve_spdy(upgraded, request, lambda io: _run(target, io))
    elif upgraded.kind == WEBSOCKET:
        protocol = _serve_websocket(upgraded, request, lambda io: _run(target, io))
    else:
        raise InvalidArgument("this URL is for streaming: upgrade to SPDY/3.1 or websocket")
    metrics.STREAM_SESSIONS.labels(kind=kind, protocol=protocol).inc()
    log.info(
        "event=stream_ended kind=%s container=%s protocol=%s seconds=%.3f",
        kind,
        request.container_id,
        protocol,
        time.monotonic() - start,
    )


def _run(target: ExecTarget | AttachTarget, io: StreamIO) -> Outcome:
    try:
        if isinstance(target, ExecTarget):
            return Outcome(exit_code=run_exec(target, io))
        run_attach(target, io)
        return Outcome(exit_code=None)
    except Exception as exc:  # whatever it is, the client hears of it: never a silent success
        reason = str(exc) if isinstance(exc, ShimError) else f"{type(exc).__name__}: {exc}"
        log.info("event=stream_failed container=%s reason=%r", target.container_id, reason)
        log.debug("event=stream_failed_traceback", exc_info=not isinstance(exc, ShimError))
        what = (
            "executing command in container" if isinstance(target, ExecTarget) else "attaching to container"
        )
        return Outcome(exit_code=None, error=f"error {what}: {reason}")


def status(protocol: str, request: Request, outcome: Outcome) -> bytes:
    """What the error stream carries at the end."""
    if protocol in (V4, V5, "v4.base64.channel.k8s.io"):
        return json.dumps(_status_object(request, outcome), separators=(",", ":")).encode()
    return _message(request, outcome).encode()


def _status_object(request: Request, outcome: Outcome) -> dict[str, object]:
    if not outcome.error and not outcome.exit_code:
        return {"metadata": {}, "status": "Success"}
    if outcome.error:  # as Kubernetes' NewInternalError reads
        return {
            "metadata": {},
            "status": "Failure",
            "message": f"Internal error occurred: {outcome.error}",
            "reason": "InternalError",
            "details": {"causes": [{"message": outcome.error}]},
            "code": 500,
        }
    return {
        "metadata": {},
        "status": "Failure",
        "message": _message(request, outcome),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(outcome.exit_code)}]},
    }


def _message(request: Request, outcome: Outcome) -> str:
    if outcome.error:
        return outcome.error
    if outcome.exit_code:
        # The command as Go prints a slice, as containerd's message has it.
        cmd = " ".join(request.cmd) if isinstance(request, ExecRequest) else ""
        return (
            f"command terminated with non-zero exit code: error executing command [{cmd}], "
            f"exit code {outcome.exit_code}"
        )
    return ""


# ---- SPDY ---------------------------------------------------------------------------


def expected_streams(request: Request, protocol: str) -> set[str]:
    wanted = {"error"}
    if request.stdin:
        wanted.add("stdin")
    if request.stdout:
        wanted.add("stdout")
    if request.stderr and not request.tty:
        wanted.add("stderr")
    if request.tty and protocol in (V4, "v3.channel.k8s.io"):
        wanted.add("resize")
    return wanted


class _Collector:
    """Takes the client's streams as they arrive (in the SPDY reader thread)."""

    def __init__(self, wanted: set[str]) -> None:
        self.wanted = wanted
        self.streams: dict[str, spdy.Stream] = {}
        self.ready = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, stream: spdy.Stream) -> None:
        kind = stream.headers.get("streamtype", "")
        stream.reply()
        with self._lock:
            if kind in self.wanted and kind not in self.streams:
                self.streams[kind] = stream
            else:
                stream.reset(spdy.REFUSED_STREAM)
                return
            if self.complete():
                self.ready.set()

    def complete(self) -> bool:
        return self.wanted <= self.streams.keys()


def _serve_spdy(upgraded: Upgraded, request: Request, run: Callable[[StreamIO], Outcome]) -> str:
    check_upgrade(upgraded)
    offered = upgraded.values(STREAM_PROTOCOL)
    if not offered:
        raise InvalidArgument("unable to upgrade: X-Stream-Protocol-Version is required")
    protocol = negotiate(offered, SPDY_PROTOCOLS)
    if protocol is None:
        upgraded.refuse(
            403,
            f"none of the stream protocols {offered} is supported",
            [("x-accepted-stream-protocol-versions", ", ".join(SPDY_PROTOCOLS))],
        )
        return ",".join(offered)
    collector = _Collector(expected_streams(request, protocol))
    initial = upgraded.switch_spdy(protocol)
    session = spdy.Session(upgraded.conn, server=True, initial=initial, on_stream=collector)
    io_box: list[StreamIO] = []
    reader = threading.Thread(
        target=_read_until_gone(session, io_box, collector.ready), name="spdy-read", daemon=True
    )
    reader.start()
    try:
        # Woken by the last stream, or by the connection's end (the reader sets it too).
        collector.ready.wait(STREAM_CREATION_TIMEOUT)
        if not collector.complete() or session.closed.is_set():
            log.info("event=stream_refused reason=streams_not_created protocol=%s", protocol)
            return protocol
        streams = collector.streams
        io = StreamIO(
            stdin=streams.get("stdin"),
            stdout=streams.get("stdout"),
            stderr=streams.get("stderr"),
            resize=_size_reader(streams["resize"].read) if "resize" in streams else None,
        )
        io_box.append(io)
        if session.closed.is_set():
            io.client_gone()
        outcome = run(io)
        with contextlib.suppress(spdy.StreamClosed, OSError):
            for name in ("stdout", "stderr"):
                if name in streams:
                    streams[name].close()
            message = status(protocol, request, outcome)
            if message:
                streams["error"].write(message)
            streams["error"].close()
        return protocol
    finally:
        _linger(session, upgraded.conn, reader)
        session.close()


def _read_until_gone(
    session: spdy.Session, io_box: list[StreamIO], waiting: threading.Event
) -> Callable[[], None]:
    def read() -> None:
        try:
            session.run()
        finally:
            session.close()
            waiting.set()  # nobody waits for streams a closed connection cannot bring
            if io_box:
                io_box[0].client_gone()

    return read


def _linger(session: spdy.Session, conn: socket.socket, reader: threading.Thread) -> None:
    """GOAWAY, half-close, and let the client read the end and hang up before the socket
    goes: closing with unread input would reset the connection and could lose our last
    frames."""
    session.goaway()
    half_close(conn)
    reader.join(LINGER)


def _size_reader(read: Callable[[], bytes]) -> Callable[[], TerminalSize | None]:
    """Terminal sizes from a byte stream of JSON objects, one after another."""
    decoder = json.JSONDecoder()
    buffer = ""

    def next_size() -> TerminalSize | None:
        nonlocal buffer
        while True:
            buffer = buffer.lstrip()
            if buffer:
                try:
                    value, end = decoder.raw_decode(buffer)
                except ValueError:
                    value, end = None, -1
                if end > 0:
                    buffer = buffer[end:]
                    size = parse_size(json.dumps(value).encode())
                    if size is not None:
                        return size
                    continue
                if len(buffer) > MAX_RESIZE_MESSAGE:
                    buffer = ""  # garbage: dropped, and reading goes on (a stalled stream stalls all)
            data = read()
            if not data:
                return None
            buffer += data.decode("utf-8", "replace")

    return next_size


# ---- WebSocket ----------------------------------------------------------------------


def _end_inputs(*inputs: ChannelInput | None) -> None:
    for channel in inputs:
        if channel is not None:
            channel.end()


def _serve_websocket(upgraded: Upgraded, request: Request, run: Callable[[StreamIO], Outcome]) -> str:
    check_upgrade(upgraded)
    offered = upgraded.values("sec-websocket-protocol")
    protocol = negotiate(offered, WEBSOCKET_PROTOCOLS)
    if protocol is None:
        raise InvalidArgument(f"none of the WebSocket subprotocols {offered} is supported")
    ws = ChannelSocket(upgraded.conn, upgraded.switch_websocket(protocol), text="base64" in protocol)
    protocol = protocol or "channel.k8s.io"
    stdin = ChannelInput() if request.stdin else None
    resize_input = ChannelInput() if request.tty else None

    def on_message(channel: int, data: bytes) -> None:
        if channel == STDIN and stdin is not None:
            if data:
                stdin.feed(data)
        elif channel == RESIZE and resize_input is not None:
            resize_input.feed(data)
        elif channel == CLOSE_SIGNAL and protocol == V5 and data == bytes([STDIN]) and stdin is not None:
            stdin.finish()

    io = StreamIO(
        stdin=stdin,
        stdout=ChannelOutput(ws, STDOUT) if request.stdout else None,
        stderr=ChannelOutput(ws, STDERR) if request.stderr and not request.tty else None,
        resize=_size_reader(resize_input.read) if resize_input is not None else None,
    )

    def read() -> None:
        try:
            ws.run(on_message)
        finally:
            _end_inputs(stdin, resize_input)
            io.client_gone()

    # As kubelet's server: an empty message on the first channel we write to says the
    # session is ready (older clients wait for it).
    ws.send(STDOUT if request.stdout else STDERR if request.stderr else ERROR, b"")
    reader = threading.Thread(target=read, name="ws-read", daemon=True)
    reader.start()
    try:
        outcome = run(io)
        _end_inputs(stdin, resize_input)  # the read loop never waits on inputs nobody reads
        with contextlib.suppress(OSError):
            message = status(protocol, request, outcome)
            if message:
                ws.send(ERROR, message)
        ws.close()
        reader.join(LINGER)
        return protocol
    finally:
        with contextlib.suppress(OSError):
            upgraded.conn.shutdown(socket.SHUT_RDWR)
