"""The HTTP side of a streaming connection: which upgrade the client asked for,
which subprotocols it offers, and the answer (101 Switching Protocols, or a plain
error response while the connection is still HTTP)."""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass, field

import h11
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionType
from wsproto.utilities import generate_accept_token

from shim.errors import InvalidArgument

SPDY = "spdy/3.1"
WEBSOCKET = "websocket"
# The header through which SPDY clients offer stream protocols (and servers pick one).
STREAM_PROTOCOL = "x-stream-protocol-version"


def reject(conn: socket.socket, http: h11.Connection, status: int, message: str) -> None:
    body = (message.rstrip("\n") + "\n").encode()
    headers = [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))]
    headers.append(("connection", "close"))
    for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
        conn.sendall(http.send(event) or b"")


@dataclass(slots=True)
class Upgraded:
    conn: socket.socket
    http: h11.Connection
    request: h11.Request
    switched: bool = field(default=False)

    def values(self, name: str) -> list[str]:
        """Every comma-separated value of every `name` header, in order."""
        wanted = name.lower().encode()
        found: list[str] = []
        for key, value in self.request.headers:
            if key == wanted:
                found.extend(v.strip() for v in value.decode("latin-1").split(",") if v.strip())
        return found

    @property
    def kind(self) -> str:
        """The protocol asked for in Upgrade (lowercase), "" if none."""
        return next((v.lower() for v in self.values("upgrade")), "")

    @property
    def query(self) -> str:
        return self.request.target.decode("ascii", "replace").partition("?")[2]

    def refuse(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        if self.switched:
            return
        self.switched = True  # nothing more may be sent as HTTP
        with contextlib.suppress(OSError, h11.LocalProtocolError):
            if headers:
                body = (message + "\n").encode()
                response = h11.Response(
                    status_code=status,
                    headers=[*headers, ("content-length", str(len(body))), ("connection", "close")],
                )
                for event in (response, h11.Data(data=body), h11.EndOfMessage()):
                    self.conn.sendall(self.http.send(event) or b"")
            else:
                reject(self.conn, self.http, status, message)

    def switch_spdy(self, protocol: str) -> bytes:
        """Answer 101 for SPDY/3.1; the bytes the client sent past its request."""
        headers = [("connection", "Upgrade"), ("upgrade", "SPDY/3.1")]
        if protocol:
            headers.append(("x-stream-protocol-version", protocol))
        self._switch(headers)
        return self.http.trailing_data[0]

    def switch_websocket(self, subprotocol: str) -> WSConnection:
        key = next(iter(self.values("sec-websocket-key")), "")
        headers: list[tuple[str, str]] = [
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-accept", generate_accept_token(key.encode()).decode()),
        ]
        if subprotocol:
            headers.append(("sec-websocket-protocol", subprotocol))
        self._switch(headers)
        return WSConnection(ConnectionType.SERVER, trailing_data=self.http.trailing_data[0])

    def _switch(self, headers: list[tuple[str, str]]) -> None:
        self.switched = True
        self.conn.sendall(self.http.send(h11.InformationalResponse(status_code=101, headers=headers)) or b"")


def negotiate(offered: list[str], supported: tuple[str, ...]) -> str | None:
    """The first protocol the client offers that we speak (the client's order wins,
    as in Kubernetes' handshake); "" when the client offered none."""
    if not offered:
        return ""
    return next((p for p in offered if p in supported), None)


def check_upgrade(upgraded: Upgraded) -> None:
    """What an upgrade needs besides its Upgrade header: `Connection: Upgrade`, and for
    WebSocket a GET with a key."""
    if "upgrade" not in (v.lower() for v in upgraded.values("connection")):
        raise InvalidArgument("unable to upgrade: missing Connection: Upgrade in the request")
    if upgraded.kind == WEBSOCKET and (
        upgraded.request.method != b"GET" or not upgraded.values("sec-websocket-key")
    ):
        raise InvalidArgument("a WebSocket upgrade is a GET with a Sec-WebSocket-Key")


def half_close(conn: socket.socket) -> None:
    """No more from us; the peer may still talk. Not on TLS: Python's SSLSocket drops
    TLS on any shutdown, and the peer would then read plain bytes."""
    if isinstance(conn, ssl.SSLSocket):
        return
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
