"""Port forwarding into a pod: each forwarded connection is a TCP connection to
localhost:PORT inside the pod's network namespace (the node's, for a pod on the
host network), dialled from a short-lived thread that enters the namespace (a
network namespace is per thread) and ends with the dial.

SPDY (portforward.k8s.io): the client opens two streams per connection, `data`
and `error`, paired by their `requestID` header and naming the `port`. Any
number of connections share one SPDY session. WebSocket: the ports are in the
query (?port=80&port=8080), one connection each; channel 2i carries the i-th
port's data and 2i+1 its errors, and each channel's first message is the port
as two little-endian bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

from shim import metrics
from shim.errors import InvalidArgument
from shim.streaming import spdy
from shim.streaming.requests import PortForwardRequest, Targets
from shim.streaming.upgrade import SPDY, STREAM_PROTOCOL, WEBSOCKET, Upgraded, check_upgrade, negotiate
from shim.streaming.websocket import ChannelOutput, ChannelSocket

log = logging.getLogger(__name__)

SPDY_PROTOCOL = "portforward.k8s.io"
TUNNEL_PROTOCOL = "SPDY/3.1+portforward.k8s.io"
WEBSOCKET_PROTOCOLS = ("v4.channel.k8s.io", "v4.base64.channel.k8s.io", "portforward.k8s.io")
PAIR_TIMEOUT = 30.0
OTHER_SIDE_GRACE = 1.0
DIAL_TIMEOUT = 10.0
CHUNK = 64 * 1024
MAX_PORTS = 64  # per WebSocket connection
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def serve(upgraded: Upgraded, request: PortForwardRequest, targets: Targets) -> None:
    netns = targets.netns(request)
    start = time.monotonic()
    if upgraded.kind == SPDY:
        _serve_spdy(upgraded, request, netns)
    elif upgraded.kind == WEBSOCKET:
        _serve_websocket(upgraded, request, netns)
    else:
        raise InvalidArgument("this URL is for streaming: upgrade to SPDY/3.1 or websocket")
    metrics.STREAM_SESSIONS.labels(kind="portforward", protocol=upgraded.kind).inc()
    log.info(
        "event=stream_ended kind=portforward sandbox=%s seconds=%.3f",
        request.sandbox_id,
        time.monotonic() - start,
    )


# ---- dialling -----------------------------------------------------------------------


def dial(netns: Path | None, port: int) -> socket.socket:
    """A TCP connection to localhost:`port` in `netns` (None: the daemon's own)."""
    if netns is None:
        return _dial_localhost(port)
    result: list[socket.socket | BaseException] = []

    def in_namespace() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"entering the pod's network namespace: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(_dial_localhost(port))
        except BaseException as exc:
            result.append(exc)

    # This thread ends with the dial, namespace and all: nothing else ever runs in it.
    thread = threading.Thread(target=in_namespace, name="portforward-dial", daemon=True)
    thread.start()
    thread.join()
    found = result[0]
    if isinstance(found, BaseException):
        raise found
    return found


def _dial_localhost(port: int) -> socket.socket:
    """IPv4 loopback first, then IPv6's, as `localhost` resolves."""
    last: OSError | None = None
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(DIAL_TIMEOUT)
        try:
            sock.connect((address, port))
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.settimeout(None)
        return sock
    assert last is not None
    raise last


def _port(raw: str, request: PortForwardRequest) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise InvalidArgument(f"invalid port {raw[:20]!r}") from None
    if not 0 < port < 65536:
        raise InvalidArgument(f"port {port} is out of range (1-65535)")
    if request.ports and port not in request.ports:
        raise InvalidArgument(f"port {port} was not asked for in PortForward ({list(request.ports)})")
    return port


def _failure(port: str, sandbox_id: str, exc: Exception) -> bytes:
    """What the error stream says, in kubelet's words (the uid is kubelet's to know)."""
    if isinstance(exc, OSError):
        reason = (
            f"failed to connect to localhost:{port} inside the pod's network namespace: {exc.strerror or exc}"
        )
    else:
        reason = str(exc)
    return f"error forwarding port {port} to pod {sandbox_id}, uid : {reason}".encode()


def _pump(source: Callable[[], bytes], sink: Callable[[bytes], None], done: Callable[[], None]) -> None:
    try:
        while data := source():
            sink(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            done()


def _copy(
    sock: socket.socket, read: Callable[[], bytes], write: Callable[[bytes], None], end: Callable[[], None]
) -> None:
    """Both directions: the client's end half-closes the TCP connection; the pod's end
    ends the client's stream, and then the client gets a second to finish its side
    before everything is closed (as containerd and CRI-O do: client-go closes its local
    connection only when the whole forwarded one ended)."""
    inbound = threading.Thread(
        target=_pump, args=(read, sock.sendall, lambda: sock.shutdown(socket.SHUT_WR)), daemon=True
    )
    inbound.start()
    _pump(lambda: sock.recv(CHUNK), write, end)
    inbound.join(OTHER_SIDE_GRACE)


# ---- SPDY ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Pair:
    created: float
    data: spdy.Stream | None = None
    error: spdy.Stream | None = None


@dataclass(slots=True)
class _SpdyForwarder:
    request: PortForwardRequest
    netns: Path | None
    pairs: dict[str, _Pair] = field(default_factory=dict)
    sockets: set[socket.socket] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False  # the session ended: a dial that completes now is hung up at once

    def on_stream(self, stream: spdy.Stream) -> None:
        kind = stream.headers.get("streamtype", "")
        request_id = stream.headers.get("requestid", "")
        if kind not in ("data", "error") or not request_id:
            stream.reset(spdy.PROTOCOL_ERROR)
            return
        stream.reply()
        now = time.monotonic()
        with self.lock:
            self._expire(now)
            pair = self.pairs.setdefault(request_id, _Pair(created=now))
            if getattr(pair, kind) is not None:
                stream.reset(spdy.PROTOCOL_ERROR)
                return
            setattr(pair, kind, stream)
            if pair.data is None or pair.error is None:
                return
            del self.pairs[request_id]
        threading.Thread(
            target=self._forward, args=(pair.data, pair.error), name="portforward", daemon=True
        ).start()

    def _expire(self, now: float) -> None:
        for request_id, pair in list(self.pairs.items()):
            if now - pair.created > PAIR_TIMEOUT:
                del self.pairs[request_id]
                for stream in (pair.data, pair.error):
                    if stream is not None:
                        stream.reset(spdy.CANCEL)

    def _forward(self, data: spdy.Stream, error: spdy.Stream) -> None:
        try:
            port = _port(data.headers.get("port", ""), self.request)
            sock = dial(self.netns, port)
        except (InvalidArgument, OSError) as exc:
            with contextlib.suppress(spdy.StreamClosed, OSError):
                error.write(_failure(data.headers.get("port", ""), self.request.sandbox_id, exc))
            for stream in (error, data):
                with contextlib.suppress(spdy.StreamClosed, OSError):
                    stream.close()
            return
        with self.lock:
            if self.closed:
                sock.close()
                return
            self.sockets.add(sock)
        try:
            _copy(sock, data.read, data.write, data.close)
        finally:
            with self.lock:
                self.sockets.discard(sock)
            sock.close()
            with contextlib.suppress(spdy.StreamClosed, OSError):
                error.close()

    def abort(self) -> None:
        with self.lock:
            self.closed = True
            live = list(self.sockets)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _serve_spdy(upgraded: Upgraded, request: PortForwardRequest, netns: Path | None) -> None:
    check_upgrade(upgraded)
    offered = upgraded.values(STREAM_PROTOCOL)
    if negotiate(offered, (SPDY_PROTOCOL,)) is None:
        upgraded.refuse(
            403,
            f"none of the stream protocols {offered} is supported",
            [("x-accepted-stream-protocol-versions", SPDY_PROTOCOL)],
        )
        return
    _forward_over(upgraded.conn, upgraded.switch_spdy(SPDY_PROTOCOL), request, netns)


def _forward_over(
    sock: socket.socket, initial: bytes, request: PortForwardRequest, netns: Path | None
) -> None:
    """A port-forward SPDY session on `sock`, until the client hangs up."""
    forwarder = _SpdyForwarder(request, netns)
    session = spdy.Session(sock, server=True, initial=initial, on_stream=forwarder.on_stream)
    try:
        session.run()
    finally:
        forwarder.abort()
        session.close()


def _serve_tunnel(upgraded: Upgraded, request: PortForwardRequest, netns: Path | None) -> None:
    """SPDY carried in WebSocket binary messages (client-go's tunnel: crictl's
    `--transport websocket`, kubectl's PortForwardWebsockets): the same session, fed
    through a socket pair from a relay that unwraps and wraps the messages."""
    ws = ChannelSocket(upgraded.conn, upgraded.switch_websocket(TUNNEL_PROTOCOL), text=False, raw=True)
    ours, relay = socket.socketpair()

    def inbound(_: int, data: bytes) -> None:
        with contextlib.suppress(OSError):
            relay.sendall(data)

    def from_websocket() -> None:
        try:
            ws.run(inbound)
        finally:
            with contextlib.suppress(OSError):
                relay.shutdown(socket.SHUT_RDWR)

    def to_websocket() -> None:
        with contextlib.suppress(OSError):
            while data := relay.recv(CHUNK):
                ws.send_raw(data)
        ws.close()

    threads = [
        threading.Thread(target=f, name="pf-tunnel", daemon=True) for f in (from_websocket, to_websocket)
    ]
    for thread in threads:
        thread.start()
    try:
        _forward_over(ours, b"", request, netns)
    finally:
        ours.close()
        for thread in threads:
            thread.join(5)
        relay.close()


# ---- WebSocket ----------------------------------------------------------------------


def _serve_websocket(upgraded: Upgraded, request: PortForwardRequest, netns: Path | None) -> None:
    check_upgrade(upgraded)
    if TUNNEL_PROTOCOL in upgraded.values("sec-websocket-protocol"):
        _serve_tunnel(upgraded, request, netns)
        return
    # The call's ports, as kubelet's server takes them; a call that named none may name
    # them in the query (?port=80&port=8080), as Kubernetes' own API does.
    ports = list(request.ports) or [
        _port(p, request) for value in parse_qs(upgraded.query).get("port", []) for p in value.split(",")
    ]
    if not ports:
        raise InvalidArgument("no port to forward: name them in PortForward or in the query (?port=N)")
    if len(ports) > MAX_PORTS:
        raise InvalidArgument(f"at most {MAX_PORTS} ports per connection")
    offered = upgraded.values("sec-websocket-protocol")
    protocol = negotiate(offered, WEBSOCKET_PROTOCOLS)
    if protocol is None:
        raise InvalidArgument(f"none of the WebSocket subprotocols {offered} is supported")
    ws = ChannelSocket(upgraded.conn, upgraded.switch_websocket(protocol), text="base64" in protocol)
    sockets: dict[int, socket.socket] = {}
    for index, port in enumerate(ports):
        prefix = struct.pack("<H", port)
        ws.send(2 * index, prefix)
        ws.send(2 * index + 1, prefix)
        try:
            sockets[index] = dial(netns, port)
        except OSError as exc:
            ws.send(2 * index + 1, _failure(str(port), request.sandbox_id, exc))
    # As kubelet's server: once every port's connection has ended, so does the WebSocket.
    open_ports = [len(sockets)]
    lock = threading.Lock()

    def ended() -> None:
        with lock:
            open_ports[0] -= 1
            last = open_ports[0] == 0
        if last:
            ws.close()

    if not sockets:
        ws.close()
    pumps = []
    for index, sock in sockets.items():
        out = ChannelOutput(ws, 2 * index)
        thread = threading.Thread(
            target=_pump, args=(lambda s=sock: s.recv(CHUNK), out.write, ended), daemon=True
        )
        thread.start()
        pumps.append(thread)

    def on_message(channel: int, data: bytes) -> None:
        sock = sockets.get(channel // 2)
        if channel % 2 == 0 and sock is not None and data:
            with contextlib.suppress(OSError):
                sock.sendall(data)

    try:
        ws.run(on_message)
    finally:
        for sock in sockets.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        ws.close()
        for thread in pumps:
            thread.join(1)
