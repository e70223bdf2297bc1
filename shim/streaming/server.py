"""The streaming server's listener: one thread per connection, HTTP/1.1 (h11)
until the client upgrades to SPDY/3.1 or WebSocket, then the session.

URLs are /exec/TOKEN, /attach/TOKEN and /portforward/TOKEN, as kubelet's own
streaming server lays them out; the token names the request an Exec, Attach or
PortForward call stored (see cache.py), and nothing is reachable without one.
A connection must finish its request within a few seconds and its headers are
bounded, so that a flood of idle or garbage connections costs little; the
number of connections at once is bounded too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import h11

from shim.errors import FailedPrecondition, InvalidArgument, NotFound, ShimError
from shim.streaming import portforward, remotecommand
from shim.streaming.cache import RequestCache
from shim.streaming.requests import AttachRequest, ExecRequest, PortForwardRequest, Targets
from shim.streaming.upgrade import Upgraded, reject

log = logging.getLogger(__name__)

# Seconds a connection gets to send its whole request (and finish a TLS handshake).
REQUEST_TIMEOUT = 10.0
# Seconds a write to a client that does not read may block: kubelet's stream idle timeout.
IDLE_TIMEOUT = 4 * 3600
MAX_HEADER_BYTES = 16 * 1024
# Connections at once: sessions plus those still sending their request.
MAX_CONNECTIONS = 512

Request = ExecRequest | AttachRequest | PortForwardRequest
# What a request that fails before its session gets (the container went, or stopped).
_HTTP_STATUS: dict[type[ShimError], int] = {InvalidArgument: 400, NotFound: 404, FailedPrecondition: 409}
_KINDS: dict[str, type] = {"exec": ExecRequest, "attach": AttachRequest, "portforward": PortForwardRequest}


@dataclass(frozen=True, slots=True)
class TLSFiles:
    cert: Path
    key: Path


class StreamServer:
    def __init__(self, address: str, port: int, tls: TLSFiles | None = None) -> None:
        self.targets: Targets | None = None
        self.cache: RequestCache[Request] = RequestCache()
        self._tls = _tls_context(tls) if tls else None
        self._listener = _listen(address, port)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._closed = threading.Event()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        host, bound_port = self._listener.getsockname()[:2]
        self.base_url = f"{'https' if tls else 'http'}://{_url_host(host)}:{bound_port}"
        self._thread = threading.Thread(target=self._accept_loop, name="stream-accept", daemon=True)

    def start(self, targets: Targets) -> None:
        self.targets = targets
        self._thread.start()
        log.info("event=stream_serving url=%s", self.base_url)

    def url(self, request: Request) -> str:
        kind = next(k for k, t in _KINDS.items() if isinstance(request, t))
        return f"{self.base_url}/{kind}/{self.cache.insert(request)}"

    def close(self) -> None:
        """Stop accepting and end every session (their processes are killed)."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            live = list(self._connections)
        for conn in live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    # ---- connections ----------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError as exc:
                if self._closed.is_set():
                    return
                # Out of fds (EMFILE) and the like: a pause, not a spin, not an end.
                log.warning("event=stream_accept_failed reason=%r", exc.strerror)
                time.sleep(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                log.warning("event=stream_refused reason=too_many_connections peer=%s", peer[0])
                conn.close()
                continue
            try:
                threading.Thread(
                    target=self._serve, args=(conn, peer[0]), name="stream-conn", daemon=True
                ).start()
            except RuntimeError:  # no thread to be had: this connection goes, the loop stays
                conn.close()
                self._slots.release()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        raw = conn
        with self._lock:
            self._connections.add(raw)
        deadline = time.monotonic() + REQUEST_TIMEOUT
        try:
            _tune(conn)
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                conn.settimeout(REQUEST_TIMEOUT)
                conn.do_handshake()
                with self._lock:
                    self._connections.discard(raw)
                    self._connections.add(conn)
            self._handle(conn, peer, deadline)
        except Exception as exc:  # one connection's trouble never reaches the others
            log.info("event=stream_failed peer=%s reason=%r", peer, f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._connections.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()
            self._slots.release()

    def _handle(self, conn: socket.socket, peer: str, deadline: float) -> None:
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        request = _read_request(conn, http, deadline)
        if request is None:
            return
        kind, _, token = request.target.decode("ascii", "replace").partition("?")[0].strip("/").partition("/")
        if kind not in _KINDS or not token or "/" in token:
            reject(conn, http, 404, "not found")
            return
        stored = self.cache.consume(token)
        if stored is None or not isinstance(stored, _KINDS[kind]):
            log.info("event=stream_refused reason=unknown_token kind=%s peer=%s", kind, peer)
            reject(conn, http, 404, "unknown, used or expired token")
            return
        conn.settimeout(None)
        upgraded = Upgraded(conn, http, request)
        assert self.targets is not None  # set before the first connection is accepted
        try:
            if isinstance(stored, PortForwardRequest):
                portforward.serve(upgraded, stored, self.targets)
            else:
                remotecommand.serve(upgraded, stored, self.targets)
        except ShimError as exc:
            log.info(
                "event=stream_refused kind=%s peer=%s upgrade=%s protocols=%s reason=%r",
                kind,
                peer,
                upgraded.kind or "none",
                ",".join(
                    upgraded.values("x-stream-protocol-version") + upgraded.values("sec-websocket-protocol")
                ),
                str(exc),
            )
            upgraded.refuse(_HTTP_STATUS.get(type(exc), 500), str(exc))


def _tune(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A peer that vanished is noticed (keepalive); one that stops reading blocks our writes
    # for at most as long as kubelet's streams may idle.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", IDLE_TIMEOUT, 0))


def _read_request(conn: socket.socket, http: h11.Connection, deadline: float) -> h11.Request | None:
    """The request, if it comes whole before `deadline` (the whole of it: a client that
    sends a byte at a time gets no longer)."""
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            with contextlib.suppress(Exception):
                reject(conn, http, exc.error_status_hint, "bad request")
            return None
        if isinstance(event, h11.Request):
            return event
        if event is h11.NEED_DATA:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            conn.settimeout(left)
            data = conn.recv(MAX_HEADER_BYTES)
            http.receive_data(data)
            if not data:
                return None
            continue
        return None


def _listen(address: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    except ValueError:
        raise InvalidArgument(f"--stream-address {address!r} is not an IP address") from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(128)
    except OSError as exc:
        listener.close()
        raise InvalidArgument(
            f"streaming server: cannot listen on {address} port {port}: {exc.strerror}"
        ) from None
    return listener


def _url_host(host: str) -> str:
    """Where clients on this node reach the listener: a wildcard address is not one."""
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _tls_context(files: TLSFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(files.cert), str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"streaming TLS: cannot load {files.cert} / {files.key}: {exc}") from None
    return context
