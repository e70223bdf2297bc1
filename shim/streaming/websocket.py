"""Kubernetes' channel protocol over WebSocket (wsproto does the framing).

Every message starts with its channel number: one byte in the binary protocols
(channel.k8s.io, v4/v5.channel.k8s.io, portforward), one ASCII digit followed by
base64 text in the base64 ones. v5 adds channel 255, a close signal whose
payload names the channel the sender will write no more to (stdin's end).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import queue
import socket
import threading
from collections.abc import Callable

from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

from shim.streaming.upgrade import half_close

CLOSE_SIGNAL = 255
RAW = -1  # the "channel" of a message on a connection without channels
# A client message may carry stdin or forwarded data: bounded, as every frame we take.
MAX_MESSAGE = 1024 * 1024
_RECV = 64 * 1024


class ChannelSocket:
    def __init__(self, sock: socket.socket, ws: Connection, *, text: bool, raw: bool = False) -> None:
        self.sock = sock
        self.ws = ws
        self.text = text  # base64 channels in text messages
        self.raw = raw  # no channels: a byte stream in binary messages (the SPDY tunnel)
        self._send_lock = threading.Lock()
        self._closed = threading.Event()

    def send_raw(self, data: bytes) -> None:
        self._send(BytesMessage(data=data))

    def send(self, channel: int, data: bytes) -> None:
        if self.text:
            self._send(TextMessage(data=str(channel) + base64.b64encode(data).decode()))
        else:
            self._send(BytesMessage(data=bytes([channel]) + data))

    def close(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str = "") -> None:
        """Say goodbye (once) and stop sending; the read loop ends with the client's answer."""
        with self._send_lock:
            if self._closed.is_set():
                return
            self._closed.set()
            with contextlib.suppress(Exception):
                if self.ws.state is ConnectionState.OPEN:
                    self.sock.sendall(self.ws.send(CloseConnection(code=code, reason=reason)))
            half_close(self.sock)

    def run(self, on_message: Callable[[int, bytes], None]) -> None:
        """Read until the connection ends, handing each message to `on_message`
        (channel, payload). Pings are answered; a bad message ends the connection."""
        parts: list[bytes | str] = []
        size = 0
        while True:
            try:
                data = self.sock.recv(_RECV)
            except OSError:
                return
            if not data:
                return
            self.ws.receive_data(data)
            try:
                events = list(self.ws.events())
            except Exception:  # wsproto's protocol errors: the client spoke nonsense
                self.close(CloseReason.PROTOCOL_ERROR, "protocol error")
                return
            for event in events:
                if isinstance(event, Ping):
                    self._send(event.response())
                elif isinstance(event, CloseConnection):
                    with contextlib.suppress(Exception):
                        self._send(event.response())
                    self._closed.set()
                    return
                elif isinstance(event, Message):
                    parts.append(event.data)
                    size += len(event.data)
                    if size > MAX_MESSAGE:
                        self.close(CloseReason.MESSAGE_TOO_BIG, "message too big")
                        return
                    if event.message_finished:
                        decoded = (
                            (RAW, b"".join(p for p in parts if isinstance(p, bytes)))
                            if self.raw
                            else self._decode(parts)
                        )
                        parts, size = [], 0
                        if decoded is None:
                            self.close(CloseReason.INVALID_FRAME_PAYLOAD_DATA, "bad channel message")
                            return
                        on_message(*decoded)

    def _decode(self, parts: list[bytes | str]) -> tuple[int, bytes] | None:
        if all(isinstance(p, str) for p in parts):
            text = "".join(p for p in parts if isinstance(p, str))
            if not text or not text[0].isdigit():
                return None
            try:
                return int(text[0]), base64.b64decode(text[1:], validate=True)
            except binascii.Error:
                return None
        raw = b"".join(p for p in parts if isinstance(p, bytes))
        if not raw:
            return None
        return raw[0], raw[1:]

    def _send(self, event: object) -> None:
        with self._send_lock:
            if self._closed.is_set() and not isinstance(event, CloseConnection):
                raise BrokenPipeError("the WebSocket is closed")
            self.sock.sendall(self.ws.send(event))  # type: ignore[arg-type]


class ChannelInput:
    """A readable channel (stdin, resize): messages queued by the read loop."""

    def __init__(self, limit: int = 64) -> None:
        # Bounded: a client faster than the process waits (the read loop blocks).
        self._queue: queue.Queue[bytes | None] = queue.Queue(limit)
        self._ended = False

    def feed(self, data: bytes) -> None:
        """Blocks while the queue is full (back-pressure on the client), until the
        input is ended: then what comes is dropped."""
        while data and not self._ended:
            with contextlib.suppress(queue.Full):
                self._queue.put(data, timeout=0.5)
                return

    def finish(self) -> None:
        """The client's end of input (v5's close signal): read after what came before it."""
        while not self._ended:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=0.5)
                return

    def end(self) -> None:
        """The session's end. Never blocks: unread input is dropped, and every read from
        now on sees the end."""
        self._ended = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    def read(self) -> bytes:
        if self._ended and self._queue.empty():
            return b""
        data = self._queue.get()
        if data is None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)  # every later read sees the end too
            return b""
        return data


class ChannelOutput:
    def __init__(self, sock: ChannelSocket, channel: int) -> None:
        self.sock = sock
        self.channel = channel

    def write(self, data: bytes) -> None:
        self.sock.send(self.channel, data)
