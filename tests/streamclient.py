"""Streaming clients for the tests and the benchmark, speaking the protocols as
crictl and kubelet do: SPDY/3.1 with the remote-command and port-forward stream
protocols, and WebSocket with Kubernetes' channel framing."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from shim.streaming import spdy

TIMEOUT = 30.0


@dataclass
class Result:
    stdout: bytes = b""
    stderr: bytes = b""
    error: bytes = b""  # what the error stream carried

    @property
    def status(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.error) if self.error else {}

    @property
    def exit_code(self) -> int:
        status = self.status
        if not status or status.get("status") == "Success":
            return 0
        causes = status.get("details", {}).get("causes", [])
        return int(next(c["message"] for c in causes if c["reason"] == "ExitCode"))


class HTTPError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


def _connect(url: str) -> tuple[socket.socket, str]:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "", parts.port or 80), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return sock, target


def http_request(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request; the status, headers (lowercase names) and what
    followed the headers, read until 101's end or the server closes."""
    sock, target = _connect(url)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {urlsplit(url).netloc}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head, rest = _read_head(sock)
        status, found = _parse_head(head)
        if status != 101:
            while chunk := sock.recv(65536):
                rest += chunk
        return status, found, rest
    finally:
        sock.close()


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before the response's headers: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    first, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return int(first.split()[1]), headers


# ---- SPDY -------------------------------------------------------------------------


@dataclass
class SpdyClient:
    sock: socket.socket
    session: spdy.Session
    protocol: str
    reader: threading.Thread
    others: tuple[socket.socket, ...] = ()  # a tunnel's WebSocket and relay

    def close(self) -> None:
        self.session.close()
        self.reader.join(TIMEOUT)
        self.sock.close()
        for sock in self.others:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def spdy_connect(url: str, protocols: list[str], method: str = "POST") -> SpdyClient:
    sock, target = _connect(url)
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {urlsplit(url).netloc}",
        "Connection: Upgrade",
        "Upgrade: SPDY/3.1",
        *(f"X-Stream-Protocol-Version: {p}" for p in protocols),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head, rest = _read_head(sock)
    status, headers = _parse_head(head)
    if status != 101:
        while chunk := sock.recv(65536):
            rest += chunk
        sock.close()
        raise HTTPError(status, rest)
    sock.settimeout(None)
    session = spdy.Session(sock, server=False, initial=rest)
    reader = threading.Thread(target=session.run, daemon=True)
    reader.start()
    return SpdyClient(sock, session, headers.get("x-stream-protocol-version", ""), reader)


def _drain(stream: spdy.Stream, into: list[bytes]) -> threading.Thread:
    def read() -> None:
        while data := stream.read(65536, timeout=TIMEOUT):
            into.append(data)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def spdy_exec(
    url: str,
    *,
    stdin: bytes | None = None,
    tty: bool = False,
    stderr: bool = True,
    sizes: list[tuple[int, int]] | None = None,
    protocols: list[str] | None = None,
) -> Result:
    """Run a remote command as client-go's SPDY executor does: error stream first,
    then stdin, stdout, stderr and resize; wait for the outputs and the status."""
    client = spdy_connect(url, protocols or ["v4.channel.k8s.io"])
    try:
        error = client.session.open_stream({"streamtype": "error"}, fin=True)
        streams: dict[str, spdy.Stream] = {}
        if stdin is not None:
            streams["stdin"] = client.session.open_stream({"streamtype": "stdin"})
        streams["stdout"] = client.session.open_stream({"streamtype": "stdout"}, fin=True)
        if stderr and not tty:
            streams["stderr"] = client.session.open_stream({"streamtype": "stderr"}, fin=True)
        if tty and client.protocol in ("v4.channel.k8s.io", "v3.channel.k8s.io"):
            streams["resize"] = client.session.open_stream({"streamtype": "resize"})
            for width, height in sizes or []:
                streams["resize"].write(json.dumps({"Width": width, "Height": height}).encode())
        out: list[bytes] = []
        err: list[bytes] = []
        status: list[bytes] = []
        readers = [_drain(streams["stdout"], out), _drain(error, status)]
        if "stderr" in streams:
            readers.append(_drain(streams["stderr"], err))
        if stdin is not None:
            if stdin:
                streams["stdin"].write(stdin)
            streams["stdin"].close()
        for thread in readers:
            thread.join(TIMEOUT)
        return Result(b"".join(out), b"".join(err), b"".join(status))
    finally:
        client.close()


def spdy_forward(client: SpdyClient, request_id: int, port: int, payload: bytes) -> tuple[bytes, bytes]:
    """One forwarded connection: send `payload`, half-close, read until the pod's end;
    (data received, error stream text)."""
    headers = {"port": str(port), "requestid": str(request_id)}
    error = client.session.open_stream({"streamtype": "error", **headers}, fin=True)
    data = client.session.open_stream({"streamtype": "data", **headers})
    received: list[bytes] = []
    errors: list[bytes] = []
    readers = [_drain(data, received), _drain(error, errors)]
    if payload:
        data.write(payload)
    data.close()
    for thread in readers:
        thread.join(TIMEOUT)
    return b"".join(received), b"".join(errors)


# ---- WebSocket --------------------------------------------------------------------


@dataclass
class WebSocketClient:
    sock: socket.socket
    ws: WSConnection
    protocol: str
    pending: list[tuple[int, bytes]] = field(default_factory=list)
    closed: bool = False

    def send(self, channel: int, data: bytes) -> None:
        if "base64" in self.protocol:
            self.sock.sendall(self.ws.send(TextMessage(data=str(channel) + base64.b64encode(data).decode())))
        else:
            self.sock.sendall(self.ws.send(BytesMessage(data=bytes([channel]) + data)))

    def messages(self, raw: bool = False) -> Iterator[tuple[int, bytes]]:
        """Every (channel, payload) until the server closes; with `raw`, every binary
        message whole as (-1, payload), for a connection without channels (a tunnel)."""
        parts: list[bytes | str] = []
        while not self.closed:
            while self.pending:
                yield self.pending.pop(0)
            data = self.sock.recv(65536)
            if not data:
                return
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Ping):
                    self.sock.sendall(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    with contextlib.suppress(Exception):
                        self.sock.sendall(self.ws.send(event.response()))
                    self.closed = True
                elif isinstance(event, Message):
                    parts.append(event.data)
                    if event.message_finished:
                        self.pending.append((-1, b"".join(map(bytes, parts))) if raw else _decode(parts))
                        parts = []
        while self.pending:
            yield self.pending.pop(0)

    def close(self) -> None:
        self.sock.close()


def _decode(parts: list[bytes | str]) -> tuple[int, bytes]:
    if isinstance(parts[0], str):
        text = "".join(str(p) for p in parts)
        return int(text[0]), base64.b64decode(text[1:])
    raw = b"".join(p for p in parts if isinstance(p, bytes))
    return raw[0], raw[1:]


def ws_connect(url: str, protocols: list[str]) -> WebSocketClient:
    sock, target = _connect(url)
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host=urlsplit(url).netloc, target=target, subprotocols=protocols)))
    body = b""
    while True:
        data = sock.recv(65536)
        if not data:
            raise HTTPError(0, b"closed during the handshake")
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                sock.settimeout(TIMEOUT)
                return WebSocketClient(sock, ws, event.subprotocol or "")
            if isinstance(event, RejectConnection):
                status = event.status_code
            if isinstance(event, RejectData):
                body += event.data
                if event.body_finished:
                    sock.close()
                    raise HTTPError(status, body)


def ws_exec(
    url: str,
    *,
    stdin: bytes | None = None,
    protocol: str = "v5.channel.k8s.io",
    sizes: list[tuple[int, int]] | None = None,
) -> Result:
    client = ws_connect(url, [protocol])
    try:
        for width, height in sizes or []:
            client.send(4, json.dumps({"Width": width, "Height": height}).encode())
        if stdin is not None:
            if stdin:
                client.send(0, stdin)
            if client.protocol == "v5.channel.k8s.io":
                client.send(255, bytes([0]))
        result = Result()
        for channel, data in client.messages():
            if channel == 1:
                result.stdout += data
            elif channel == 2:
                result.stderr += data
            elif channel == 3:
                result.error += data
        return result
    finally:
        client.close()


def ws_forward(url: str, ports: list[int], payload: bytes) -> dict[int, tuple[bytes, bytes]]:
    """Forward each port over one WebSocket (?port=...): send `payload` on each, then
    read until the server or the pod ends; per port (data, error) without the prefix."""
    query = "&".join(f"port={p}" for p in ports)
    client = ws_connect(f"{url}?{query}", ["v4.channel.k8s.io"])
    received: dict[int, list[bytes]] = {c: [] for c in range(2 * len(ports))}
    try:
        for index in range(len(ports)):
            client.send(2 * index, payload)
        client.sock.settimeout(3)
        with contextlib.suppress(TimeoutError):
            for channel, data in client.messages():
                received[channel].append(data)
    finally:
        client.close()
    out = {}
    for index, port in enumerate(ports):
        data = b"".join(received[2 * index])
        error = b"".join(received[2 * index + 1])
        prefix = struct.pack("<H", port)
        out[port] = (data.removeprefix(prefix), error.removeprefix(prefix))
    return out


def wait_until(predicate: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def tunnel_connect(url: str) -> SpdyClient:
    """Port forwarding as client-go's WebSocket tunnel does it: SPDY carried in the
    binary messages of a WebSocket with subprotocol SPDY/3.1+portforward.k8s.io."""
    client = ws_connect(url, ["SPDY/3.1+portforward.k8s.io"])
    ours, relay = socket.socketpair()

    def from_websocket() -> None:
        with contextlib.suppress(OSError):
            client.sock.settimeout(None)
            for _, data in client.messages(raw=True):
                relay.sendall(data)
        with contextlib.suppress(OSError):
            relay.shutdown(socket.SHUT_RDWR)

    def to_websocket() -> None:
        with contextlib.suppress(OSError):
            while data := relay.recv(65536):
                client.sock.sendall(client.ws.send(BytesMessage(data=data)))
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_RDWR)

    for relay_part in (from_websocket, to_websocket):
        threading.Thread(target=relay_part, daemon=True).start()
    session = spdy.Session(ours, server=False)
    reader = threading.Thread(target=session.run, daemon=True)
    reader.start()
    return SpdyClient(ours, session, client.protocol, reader, (client.sock, relay))
