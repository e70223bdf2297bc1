"""SPDY/3.1 sessions, the transport of kubectl exec, attach and port-forward.

After an HTTP/1.1 ``Upgrade: SPDY/3.1`` (done by the caller), both ends exchange
SPDY frames. The peer is always Go's ``github.com/moby/spdystream`` (through
``k8s.io/apimachinery/pkg/util/httpstream/spdy``: kubectl, client-go, the API
server), so this module implements the subset that peer uses, and depends on
nothing it does not do.

Wire format (SPDY/3 draft, section 2, plus the 3.1 session window):

* Control frame: ``1 | version:15 | type:16``, ``flags:8 | length:24``, payload.
  Types used: SYN_STREAM (1), SYN_REPLY (2), RST_STREAM (3), SETTINGS (4), PING (6),
  GOAWAY (7), HEADERS (8), WINDOW_UPDATE (9). Flags: FIN 0x01, UNIDIRECTIONAL 0x02.
* Data frame: ``0 | stream-id:31``, ``flags:8 | length:24``, data; flag FIN 0x01.
* Header blocks (SYN_STREAM, SYN_REPLY, HEADERS): ``count:32`` then per pair
  ``len:32 name len:32 value`` (names lowercase, several values joined by NUL),
  deflated with the SPDY/3 dictionary in ONE zlib context per direction for the
  whole connection, each block ending in a sync flush. Every received block must
  therefore be inflated, even one we then ignore, or the context goes out of step.
* Stream ids: the client's odd, the server's even, each side's strictly increasing.

What spdystream does as a peer (read in moby/spdystream ``connection.go``,
``stream.go``, ``spdy/read.go``, ``spdy/write.go``; k8s ``httpstream/spdy/connection.go``):

* It never sends SETTINGS or WINDOW_UPDATE, and ignores both when received (parsed,
  then dropped as an "unhandled frame type"): it does no flow control at all and
  writes one DATA frame per ``Write`` call, of any size up to 2^24-1 bytes.
* It drops DATA (FIN included) that arrives on a stream it opened before our
  SYN_REPLY for it, so we reply before the first DATA or FIN on a peer's stream.
  It may send DATA on its own stream before our reply; k8s waits for the reply
  (``WaitTimeout``) before using a stream, and rejects one with RST_STREAM.
* It echoes a PING whose id has the other side's parity; k8s may ping periodically
  (``sendPings``). Frames of one stream are handled in order, so a SYN_REPLY
  written before DATA is seen before it.
* GOAWAY ends its read loop: it is sent by ``Close`` when k8s is done with the
  connection, and on receipt spdystream closes every stream and the connection.
* RST_STREAM closes the stream both ways. FIN is an empty DATA frame with FLAG_FIN.
* It does not check the version field, does not bound frame or header sizes, and
  ends the connection on an unknown control frame type or a malformed frame.
* Header names are lowercased on the wire (``streamtype``, ``port``, ``requestid``).

Flow control decision. We advertise the default 64 KiB windows (no SETTINGS) and
send WINDOW_UPDATE, per stream and for the session (stream 0), as the application
reads, so a conforming peer never has more than a window in flight. We cannot
rely on it: spdystream ignores our windows, and since it never sends WINDOW_UPDATE,
a writer here that waited for its window would stop for ever after 64 KiB. So by
default our writes ignore the peer's windows, exactly as spdystream does, and are
bounded by TCP: each frame is written synchronously, nothing is queued. The
receiving side bounds memory instead of resetting streams for overrunning the
window: when ``max_buffered`` bytes are read from the socket but not yet by the
application, the reader stops reading the socket until the application catches
up (the same head-of-line back-pressure spdystream applies to itself). With
``flow_control=True`` (for a peer known to send WINDOW_UPDATE, such as this
module) writes do wait for both windows.

Bounds against a hostile peer: a control frame over 64 KiB or a header block
inflating beyond 256 KiB (k8s sends well under 1 KiB), a malformed frame, a
version other than 3 or a stream id out of order end the session (GOAWAY
PROTOCOL_ERROR). A DATA frame may use the format's full 2^24-1 bytes, as
spdystream may legitimately send that. A stream beyond ``max_streams`` open is
refused (RST_STREAM REFUSED_STREAM), as the spec prescribes, so a burst of
port-forward connections loses one connection, not the session. Unknown control
frame types are skipped, as the SPDY/2 draft required (3 is silent). So a
session holds at most ``max_buffered`` unread bytes (4 MiB; a stream's unread
bytes stop counting once both sides finished it), plus the frame being read
(< 16 MiB, briefly twice while copied out of the socket buffer). As with spdystream, a GOAWAY from the peer
ends the session at once, and we answer the peer's PINGs.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_CLEAR_SETTINGS = 0x01

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
UNSUPPORTED_VERSION = 4
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7
STREAM_IN_USE = 8
STREAM_ALREADY_CLOSED = 9
INVALID_CREDENTIALS = 10
FRAME_TOO_LARGE = 11

# GOAWAY status codes.
GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

SETTINGS_MAX_CONCURRENT_STREAMS = 4
SETTINGS_INITIAL_WINDOW_SIZE = 7

INITIAL_WINDOW = 65536
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
MAX_DATA_LENGTH = 2**24 - 1
MAX_CONTROL_PAYLOAD = 64 * 1024
MAX_HEADER_BLOCK = 256 * 1024
# Our DATA frames: 32 KiB, the size Go's io.Copy (client-go's copies) writes, keeps
# streams sharing the connection interleaved.
MAX_SEND_CHUNK = 32 * 1024
DEFAULT_MAX_STREAMS = 256
DEFAULT_MAX_BUFFERED = 4 * 1024 * 1024

_RECV_SIZE = 256 * 1024
# A window update per half window read: few frames, and a conforming peer never stalls.
_UPDATE_THRESHOLD = INITIAL_WINDOW // 2
# How long close() waits for a writer to finish its frame before giving up the GOAWAY.
_GOAWAY_LOCK_WAIT = 0.5
# While the reader waits for the application to catch up: how often it checks that the
# peer is still there.
_HANGUP_CHECK = 1.0

# The SPDY/3 header compression dictionary (1423 bytes): length-prefixed words,
# then a run of status lines, dates and common values.
# Separated by "|" (one word, "200 OK", has a space).
_DICTIONARY_WORDS = (
    "options|head|post|put|delete|trace|accept|accept-charset|accept-encoding|accept-language|"
    "accept-ranges|age|allow|authorization|cache-control|connection|content-base|content-encoding|"
    "content-language|content-length|content-location|content-md5|content-range|content-type|date|"
    "etag|expect|expires|from|host|if-match|if-modified-since|if-none-match|if-range|"
    "if-unmodified-since|last-modified|location|max-forwards|pragma|proxy-authenticate|"
    "proxy-authorization|range|referer|retry-after|server|te|trailer|transfer-encoding|upgrade|"
    "user-agent|vary|via|warning|www-authenticate|method|get|status|200 OK|version|HTTP/1.1|url|"
    "public|set-cookie|keep-alive|origin"
)
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = (
    b"".join(struct.pack(">I", len(w)) + w.encode() for w in _DICTIONARY_WORDS.split("|"))
    + _DICTIONARY_TAIL.encode()
)


class SpdyError(Exception):
    pass


class StreamClosed(SpdyError):
    """The stream was reset, closed for writing, or its connection is gone."""


class FrameError(SpdyError):
    """The peer broke the protocol: the session ends with GOAWAY `status`."""

    def __init__(self, message: str, status: int = GOAWAY_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.status = status


# ---- frames ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataFrame:
    stream_id: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: dict[str, str]  # values as on the wire: several values joined by NUL
    fin: bool = False
    unidirectional: bool = False
    associated_id: int = 0
    priority: int = 0


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    headers: dict[str, str]
    fin: bool = False


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Settings:
    values: dict[int, int]  # id -> value; per-entry persistence flags are not kept
    clear: bool = False


@dataclass(frozen=True)
class Ping:
    ping_id: int


@dataclass(frozen=True)
class GoAway:
    last_good_id: int
    status: int = GOAWAY_OK


@dataclass(frozen=True)
class Headers:
    stream_id: int
    headers: dict[str, str]
    fin: bool = False


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int  # 0: the session window (SPDY/3.1)
    delta: int


@dataclass(frozen=True)
class UnknownFrame:
    frame_type: int
    flags: int
    payload: bytes


Frame = (
    DataFrame
    | SynStream
    | SynReply
    | RstStream
    | Settings
    | Ping
    | GoAway
    | Headers
    | WindowUpdate
    | UnknownFrame
)


@dataclass(frozen=True)
class FrameHeader:
    control: bool
    frame_type: int  # control frames only
    stream_id: int  # data frames only
    flags: int
    length: int


def encode_header_block(headers: dict[str, str]) -> bytes:
    parts = [struct.pack(">I", len(headers))]
    for name, value in headers.items():
        raw_name = name.lower().encode("latin-1")
        if not raw_name:
            raise ValueError("empty header name")
        raw_value = value.encode("latin-1")
        parts += [struct.pack(">I", len(raw_name)), raw_name, struct.pack(">I", len(raw_value)), raw_value]
    return b"".join(parts)


def decode_header_block(block: bytes) -> dict[str, str]:
    if len(block) < 4:
        raise FrameError("truncated header block")
    (count,) = struct.unpack_from(">I", block)
    # Each pair takes at least 8 bytes: a count beyond that is a lie, not a loop to run.
    if count > (len(block) - 4) // 8:
        raise FrameError(f"header block claims {count} pairs in {len(block)} bytes")
    headers: dict[str, str] = {}
    offset = 4
    for _ in range(count):
        name, offset = _take_string(block, offset)
        value, offset = _take_string(block, offset)
        if not name:
            raise FrameError("empty header name")
        key = name.decode("latin-1").lower()
        if key in headers:
            raise FrameError(f"duplicate header {key!r}")
        headers[key] = value.decode("latin-1")
    if offset != len(block):
        raise FrameError("bytes after the header block")
    return headers


def _take_string(block: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 4 > len(block):
        raise FrameError("truncated header block")
    (size,) = struct.unpack_from(">I", block, offset)
    end = offset + 4 + size
    if end > len(block):
        raise FrameError("truncated header block")
    return block[offset + 4 : end], end


class HeaderDeflater:
    """One direction's compression context: every header block we send, in order."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(zdict=DICTIONARY)

    def deflate(self, headers: dict[str, str]) -> bytes:
        block = encode_header_block(headers)
        return self._z.compress(block) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderInflater:
    """The peer's compression context, with a bound on each block's inflated size."""

    def __init__(self, limit: int = MAX_HEADER_BLOCK) -> None:
        self._z = zlib.decompressobj(zdict=DICTIONARY)
        self._limit = limit

    def inflate(self, data: bytes) -> dict[str, str]:
        try:
            # One byte over the limit tells a bomb from a block of exactly the limit,
            # and no more is ever produced.
            block = self._z.decompress(data, self._limit + 1)
        except zlib.error as e:
            raise FrameError(f"header block does not inflate: {e}") from e
        if len(block) > self._limit:
            raise FrameError(f"header block inflates beyond {self._limit} bytes")
        return decode_header_block(block)


def parse_frame_header(head: bytes) -> FrameHeader:
    word, flags_length = struct.unpack(">II", head)
    flags, length = flags_length >> 24, flags_length & 0xFFFFFF
    if not word & 0x80000000:
        return FrameHeader(False, 0, word & 0x7FFFFFFF, flags, length)
    version = (word >> 16) & 0x7FFF
    if version != VERSION:
        raise FrameError(f"SPDY version {version}")
    if length > MAX_CONTROL_PAYLOAD:
        raise FrameError(f"control frame of {length} bytes")
    return FrameHeader(True, word & 0xFFFF, 0, flags, length)


def decode_frame(header: FrameHeader, payload: bytes, inflater: HeaderInflater) -> Frame:
    if len(payload) != header.length:
        raise FrameError("truncated frame")
    fin = bool(header.flags & FLAG_FIN)
    if not header.control:
        if header.stream_id == 0:
            raise FrameError("DATA on stream 0")
        return DataFrame(header.stream_id, payload, fin)
    kind = header.frame_type
    if kind == SYN_STREAM:
        _need(header, 10, exact=False)
        sid, assoc, prio = struct.unpack_from(">IIB", payload)
        headers = inflater.inflate(payload[10:])
        frame: Frame = SynStream(
            _stream_id(sid),
            headers,
            fin,
            bool(header.flags & FLAG_UNIDIRECTIONAL),
            assoc & MAX_STREAM_ID,
            prio >> 5,
        )
    elif kind in (SYN_REPLY, HEADERS):
        _need(header, 4, exact=False)
        sid = _stream_id(struct.unpack_from(">I", payload)[0])
        headers = inflater.inflate(payload[4:])
        frame = SynReply(sid, headers, fin) if kind == SYN_REPLY else Headers(sid, headers, fin)
    elif kind == RST_STREAM:
        _need(header, 8)
        sid, status = struct.unpack(">II", payload)
        if status == 0:
            raise FrameError("RST_STREAM with status 0")
        frame = RstStream(_stream_id(sid), status)
    elif kind == SETTINGS:
        _need(header, 4, exact=False)
        (count,) = struct.unpack_from(">I", payload)
        if header.length != 4 + 8 * count:
            raise FrameError(f"SETTINGS of {count} entries in {header.length} bytes")
        values = {}
        for i in range(count):
            flags_id, value = struct.unpack_from(">II", payload, 4 + 8 * i)
            values[flags_id & 0xFFFFFF] = value
        frame = Settings(values, bool(header.flags & FLAG_CLEAR_SETTINGS))
    elif kind == PING:
        _need(header, 4)
        frame = Ping(struct.unpack(">I", payload)[0])
    elif kind == GOAWAY:
        _need(header, 8)
        last, status = struct.unpack(">II", payload)
        frame = GoAway(last & MAX_STREAM_ID, status)
    elif kind == WINDOW_UPDATE:
        _need(header, 8)
        sid, delta = struct.unpack(">II", payload)
        delta &= 0x7FFFFFFF
        if delta == 0:
            raise FrameError("WINDOW_UPDATE of 0")
        frame = WindowUpdate(sid & MAX_STREAM_ID, delta)
    else:
        frame = UnknownFrame(kind, header.flags, payload)
    return frame


def _need(header: FrameHeader, size: int, *, exact: bool = True) -> None:
    if header.length < size or (exact and header.length != size):
        raise FrameError(f"control frame {header.frame_type} of {header.length} bytes")


def _stream_id(raw: int) -> int:
    sid = raw & MAX_STREAM_ID
    if sid == 0:
        raise FrameError("stream id 0")
    return sid


def decode_frames(data: bytes, inflater: HeaderInflater) -> list[Frame]:
    """Every frame in `data`, which must end at a frame boundary."""
    frames = []
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise FrameError("truncated frame header")
        header = parse_frame_header(data[offset : offset + 8])
        payload = data[offset + 8 : offset + 8 + header.length]
        frames.append(decode_frame(header, payload, inflater))
        offset += 8 + header.length
    return frames


def encode_frame(frame: Frame, deflater: HeaderDeflater) -> bytes:
    if isinstance(frame, DataFrame):
        if not 0 < frame.stream_id <= MAX_STREAM_ID or len(frame.data) > MAX_DATA_LENGTH:
            raise ValueError(f"bad DATA frame for stream {frame.stream_id}")
        flags = FLAG_FIN if frame.fin else 0
        return struct.pack(">II", frame.stream_id, flags << 24 | len(frame.data)) + frame.data
    fin = FLAG_FIN if getattr(frame, "fin", False) else 0
    if isinstance(frame, SynStream):
        flags = fin | (FLAG_UNIDIRECTIONAL if frame.unidirectional else 0)
        fixed = struct.pack(">IIBB", frame.stream_id, frame.associated_id, (frame.priority & 7) << 5, 0)
        return _control(SYN_STREAM, flags, fixed + deflater.deflate(frame.headers))
    if isinstance(frame, SynReply | Headers):
        kind = SYN_REPLY if isinstance(frame, SynReply) else HEADERS
        return _control(kind, fin, struct.pack(">I", frame.stream_id) + deflater.deflate(frame.headers))
    if isinstance(frame, RstStream):
        return _control(RST_STREAM, 0, struct.pack(">II", frame.stream_id, frame.status))
    if isinstance(frame, Settings):
        entries = b"".join(struct.pack(">II", k & 0xFFFFFF, v) for k, v in frame.values.items())
        flags = FLAG_CLEAR_SETTINGS if frame.clear else 0
        return _control(SETTINGS, flags, struct.pack(">I", len(frame.values)) + entries)
    if isinstance(frame, Ping):
        return _control(PING, 0, struct.pack(">I", frame.ping_id))
    if isinstance(frame, GoAway):
        return _control(GOAWAY, 0, struct.pack(">II", frame.last_good_id, frame.status))
    if isinstance(frame, WindowUpdate):
        return _control(WINDOW_UPDATE, 0, struct.pack(">II", frame.stream_id, frame.delta))
    return _control(frame.frame_type, frame.flags, frame.payload)


def _control(kind: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_DATA_LENGTH:
        raise ValueError(f"control frame of {len(payload)} bytes")
    return struct.pack(">HHI", 0x8000 | VERSION, kind, flags << 24 | len(payload)) + payload


# ---- sessions ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Stream:
    """One SPDY stream. Its state is guarded by its session's lock."""

    id: int
    headers: dict[str, str]  # the peer's SYN_STREAM headers, first value of each
    session: Session = field(repr=False)
    local: bool  # opened by us
    reset_status: int | None = field(default=None, init=False)  # set once either side reset it
    _chunks: deque[bytes] = field(default_factory=deque, init=False, repr=False)
    # Bytes of _chunks[0] already read: a big frame read in small pieces is not copied over and over.
    _head_offset: int = field(default=0, init=False, repr=False)
    _buffered: int = field(default=0, init=False)
    # The SYN_REPLY was sent (the peer's stream) or received (ours).
    _replied: bool = field(default=False, init=False)
    _reply_headers: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _local_fin: bool = field(default=False, init=False)
    _remote_fin: bool = field(default=False, init=False)
    _send_window: int = field(default=INITIAL_WINDOW, init=False, repr=False)
    # Its unread bytes count in the session's budget (until the stream is over).
    _counted: bool = field(default=True, init=False, repr=False)

    def reply(self, headers: dict[str, str] | None = None, *, fin: bool = False) -> None:
        """Accepts the peer's stream (SYN_REPLY). Does nothing if it was replied to
        (write() and close() reply first when needed) or is already reset."""
        if self.local:
            raise ValueError("only the peer's streams are replied to")
        self.session._stream_send(self, SynReply(self.id, dict(headers or {}), fin), fin=fin)

    def wait_reply(self, timeout: float) -> dict[str, str]:
        """The peer's SYN_REPLY headers; StreamClosed if it reset the stream instead."""
        s = self.session
        with s._cond:
            if not s._cond.wait_for(lambda: self._replied or self._gone(), timeout):
                raise TimeoutError(f"no reply on stream {self.id} in {timeout} s")
            if not self._replied:
                raise StreamClosed(f"stream {self.id} closed before its reply ({self.reset_status})")
            return self._reply_headers

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.session._reserve(self, min(len(view), MAX_SEND_CHUNK))
            self.session._stream_send(self, DataFrame(self.id, bytes(view[:n])), fin=False)
            view = view[n:]

    def read(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        """Up to max_bytes; b"" once the peer finished (FIN), reset, or the session ended.
        TimeoutError when nothing came within `timeout` seconds."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        s = self.session
        with s._cond:
            if not s._cond.wait_for(lambda: self._chunks or self._remote_fin or self._gone(), timeout):
                raise TimeoutError(f"nothing to read on stream {self.id} in {timeout} s")
            parts = []
            want = max_bytes
            while self._chunks and want > 0:
                head = self._chunks[0]
                part = head[self._head_offset : self._head_offset + want]
                parts.append(part)
                want -= len(part)
                self._head_offset += len(part)
                if self._head_offset == len(head):
                    self._chunks.popleft()
                    self._head_offset = 0
            data = b"".join(parts)
            s._consumed(self, len(data))
        s._flush_updates()
        return data

    def close(self) -> None:
        """Half-closes our side (empty DATA with FIN); idempotent."""
        with contextlib.suppress(StreamClosed):
            self.session._stream_send(self, DataFrame(self.id, b"", fin=True), fin=True)

    def reset(self, status: int = CANCEL) -> None:
        self.session._reset(self, status, send=True)

    def _gone(self) -> bool:
        return self.reset_status is not None or self.session.closed.is_set()


class Session:
    """One SPDY/3.1 connection: `run()` in a thread reads; any thread writes."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        server: bool,
        initial: bytes = b"",
        on_stream: Callable[[Stream], None] | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        flow_control: bool = False,
    ) -> None:
        # Blocking: a timeout could cut a frame in half on the wire, and idle streams
        # (an exec waiting for input) are normal; the peer's PINGs and GOAWAY end them.
        sock.settimeout(None)
        self._sock = sock
        self._server = server
        self._input = bytearray(initial)
        self._input_pos = 0
        self._on_stream = on_stream
        self._max_streams = max_streams
        self._max_buffered = max_buffered
        self._flow_control = flow_control
        self.closed = threading.Event()
        # Frame writes and the deflater, which must see header blocks in wire order.
        # Lock order: _wlock, then _cond.
        self._wlock = threading.Lock()
        self._deflater = HeaderDeflater()
        self._inflater = HeaderInflater()  # the reader thread's alone
        self._cond = threading.Condition(threading.Lock())
        self._streams: dict[int, Stream] = {}
        self._next_id = 2 if server else 1
        self._last_peer_id = 0
        self._buffered = 0
        self._send_window = INITIAL_WINDOW
        self._initial_send_window = INITIAL_WINDOW
        self._updates: dict[int, int] = {}  # stream id (0: session) -> bytes read, not yet credited
        self._ping_parity = 0 if server else 1
        self._next_ping = 2 if server else 1
        self._pings: dict[int, threading.Event] = {}
        self._running = False
        self._socket_closed = False
        self._broken = False  # a write failed: the byte stream is no longer framed

    # ---- public ----

    def run(self) -> None:
        """Reads frames until EOF, GOAWAY, close() or a protocol error; never raises."""
        with self._cond:
            if self.closed.is_set():
                return
            self._running = True
        status: int | None = None
        try:
            self._read_loop()
        except FrameError as e:
            log.warning("SPDY session: peer broke the protocol: %s", e)
            status = e.status
        except (EOFError, OSError, StreamClosed):
            pass
        except Exception:
            log.exception("SPDY session: reader failed")
            status = GOAWAY_INTERNAL_ERROR
        finally:
            self._end(status, reader=True)

    def open_stream(self, headers: dict[str, str], *, fin: bool = False) -> Stream:
        with self._wlock:
            # Ids must reach the wire in increasing order: allocated under the write lock.
            with self._cond:
                if self.closed.is_set():
                    raise StreamClosed("session closed")
                if len(self._streams) >= self._max_streams:
                    raise SpdyError(f"{len(self._streams)} streams open")
                if self._next_id > MAX_STREAM_ID:
                    raise SpdyError("stream ids exhausted")
                lowered = {k.lower(): v for k, v in headers.items()}
                stream = Stream(self._next_id, lowered, self, local=True)
                stream._local_fin = fin
                stream._send_window = self._initial_send_window
                self._next_id += 2
                self._streams[stream.id] = stream
            self._write_locked([SynStream(stream.id, lowered, fin)])
        self._flush_updates()
        return stream

    def ping(self, timeout: float) -> float:
        """Round-trip time of a PING in seconds; TimeoutError if unanswered."""
        with self._cond:
            ping_id = self._next_ping
            self._next_ping += 2
            if self._next_ping > MAX_STREAM_ID:
                self._next_ping = 2 - self._ping_parity
            answered = self._pings[ping_id] = threading.Event()
        try:
            start = time.monotonic()
            self._send([Ping(ping_id)])
            if not answered.wait(timeout):
                raise TimeoutError(f"PING {ping_id} unanswered in {timeout} s")
            if self.closed.is_set():
                raise StreamClosed("session closed")
            return time.monotonic() - start
        finally:
            with self._cond:
                self._pings.pop(ping_id, None)

    def goaway(self) -> None:
        """Tell the peer we are done (GOAWAY OK), as spdystream's Close does, without
        closing: the peer may still read what we sent, then hang up."""
        with self._cond:
            last = self._last_peer_id
        self._goaway(GoAway(last, GOAWAY_OK))

    def close(self) -> None:
        """GOAWAY (best effort), then shutdown; wakes every blocked reader and writer.
        For a graceful end, close the streams and wait for the peer's GOAWAY (run()
        returns, `closed` is set) before calling this."""
        self._end(GOAWAY_OK, reader=False)

    # ---- reading ----

    def _read_exact(self, n: int) -> bytes:
        buf = self._input
        if len(buf) - self._input_pos < n:
            del buf[: self._input_pos]
            self._input_pos = 0
            while len(buf) < n:
                # At most 1 MiB a call: recv allocates what it is asked for.
                chunk = self._sock.recv(min(max(n - len(buf), _RECV_SIZE), 1 << 20))
                if not chunk:
                    raise EOFError
                buf += chunk
        data = bytes(buf[self._input_pos : self._input_pos + n])
        self._input_pos += n
        if self._input_pos >= min(len(buf), 1 << 20):
            # A big frame's bytes are not kept once copied out.
            del buf[: self._input_pos]
            self._input_pos = 0
        return data

    def _read_loop(self) -> None:
        while not self.closed.is_set():
            header = parse_frame_header(self._read_exact(8))
            frame = decode_frame(header, self._read_exact(header.length), self._inflater)
            if isinstance(frame, GoAway):
                log.debug("SPDY session: GOAWAY from peer (status %d)", frame.status)
                return
            self._dispatch(frame)

    def _dispatch(self, frame: Frame) -> None:
        if isinstance(frame, DataFrame):
            self._on_data(frame)
        elif isinstance(frame, SynStream):
            self._on_syn_stream(frame)
        elif isinstance(frame, SynReply):
            with self._cond:
                stream = self._streams.get(frame.stream_id)
                # A reply to a stream already reset, or a second reply: ignored, as spdystream.
                if stream is not None and stream.local and not stream._replied:
                    stream._replied = True
                    stream._reply_headers = _first_values(frame.headers)
                    if frame.fin:
                        self._remote_finished(stream)
                    self._cond.notify_all()
        elif isinstance(frame, Headers):
            if frame.fin:
                with self._cond:
                    stream = self._streams.get(frame.stream_id)
                    if stream is not None:
                        self._remote_finished(stream)
                        self._cond.notify_all()
        elif isinstance(frame, RstStream):
            with self._cond:
                stream = self._streams.get(frame.stream_id)
            if stream is not None:
                self._reset(stream, frame.status, send=False)
        elif isinstance(frame, Ping):
            if frame.ping_id % 2 == self._ping_parity:
                with self._cond:
                    answered = self._pings.get(frame.ping_id)
                if answered is not None:
                    answered.set()
            else:
                self._send([frame])
        elif isinstance(frame, WindowUpdate):
            self._on_window_update(frame)
        elif isinstance(frame, Settings):
            self._on_settings(frame)
        # UnknownFrame: skipped.

    def _on_syn_stream(self, frame: SynStream) -> None:
        sid = frame.stream_id
        if sid % 2 != (1 if self._server else 0) or sid <= self._last_peer_id:
            raise FrameError(f"SYN_STREAM {sid} after {self._last_peer_id}")
        self._last_peer_id = sid
        with self._cond:
            refuse = len(self._streams) >= self._max_streams
            if not refuse:
                stream = Stream(sid, _first_values(frame.headers), self, local=False)
                stream._send_window = self._initial_send_window
                # Unidirectional: the peer expects neither reply nor data from us.
                stream._local_fin = stream._replied = frame.unidirectional
                stream._remote_fin = frame.fin
                if not (stream._local_fin and stream._remote_fin):
                    self._streams[sid] = stream
        if refuse:
            log.info("SPDY session: refused stream %d, %d open", sid, self._max_streams)
            self._send([RstStream(sid, REFUSED_STREAM)])
            return
        if self._on_stream is None:
            stream.reset(REFUSED_STREAM)
            return
        try:
            self._on_stream(stream)
        except Exception:
            log.exception("SPDY session: stream handler failed")
            stream.reset(INTERNAL_ERROR)

    def _on_data(self, frame: DataFrame) -> None:
        n = len(frame.data)
        with self._cond:
            found = self._streams.get(frame.stream_id)
            after_fin = found is not None and found._remote_fin
            if found is None or after_fin:
                # Frames of a stream reset meanwhile, or unknown: dropped, as spdystream
                # does; the peer counted them against the session window all the same.
                self._credit(0, n)
            else:
                self._buffer(found, frame)
        if found is None:
            self._flush_updates()
        elif after_fin and frame.data:
            self._reset(found, STREAM_ALREADY_CLOSED, send=True)

    def _buffer(self, stream: Stream, frame: DataFrame) -> None:
        n = len(frame.data)
        # Back-pressure on a peer that ignores our windows: stop reading the socket
        # until the application has read enough (a frame larger than the whole budget
        # is let in once everything else was read).
        room = lambda: self._buffered == 0 or self._buffered + n <= self._max_buffered or stream._gone()  # noqa: E731
        while not self._cond.wait_for(room, _HANGUP_CHECK):
            # Not reading the socket meanwhile: a peer that hung up would go unnoticed,
            # and whatever waits for it (an exec'd command to kill) would wait for ever.
            if _hung_up(self._sock):
                raise EOFError
        if stream._gone():
            self._credit(0, n)
            return
        if n:
            stream._chunks.append(frame.data)
            stream._buffered += n
            self._buffered += n
        if frame.fin:
            self._remote_finished(stream)
        self._cond.notify_all()

    def _on_window_update(self, frame: WindowUpdate) -> None:
        if not self._flow_control:
            return
        with self._cond:
            if frame.stream_id == 0:
                self._send_window += frame.delta
                if self._send_window > MAX_WINDOW:
                    raise FrameError("session window beyond 2^31-1")
                self._cond.notify_all()
                return
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                return
            stream._send_window += frame.delta
            overflow = stream._send_window > MAX_WINDOW
            self._cond.notify_all()
        if overflow:
            self._reset(stream, FLOW_CONTROL_ERROR, send=True)

    def _on_settings(self, frame: Settings) -> None:
        size = frame.values.get(SETTINGS_INITIAL_WINDOW_SIZE)
        if not self._flow_control or size is None:
            return
        if size > MAX_WINDOW:
            raise FrameError(f"initial window of {size}")
        with self._cond:
            delta = size - self._initial_send_window
            self._initial_send_window = size
            for stream in self._streams.values():
                stream._send_window += delta
            self._cond.notify_all()

    # ---- stream state (under _cond) ----

    def _remote_finished(self, stream: Stream) -> None:
        stream._remote_fin = True
        self._updates.pop(stream.id, None)  # no more data comes: no window to give back
        if stream._local_fin:
            self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        """The stream is over (both FINs, or reset): it no longer counts against
        max_streams, and its unread bytes, which the application may still read or
        drop with the Stream, no longer hold the reader back nor the peer's window."""
        self._streams.pop(stream.id, None)
        self._updates.pop(stream.id, None)
        if stream._counted:
            stream._counted = False
            self._buffered -= stream._buffered
            self._credit(0, stream._buffered)
            self._cond.notify_all()

    def _consumed(self, stream: Stream, n: int) -> None:
        stream._buffered -= n
        if n and stream._counted:
            self._buffered -= n
            if not stream._remote_fin:
                self._credit(stream.id, n)
            self._credit(0, n)
            self._cond.notify_all()

    def _credit(self, stream_id: int, n: int) -> None:
        if n:
            self._updates[stream_id] = self._updates.get(stream_id, 0) + n

    # ---- writing ----

    def _reserve(self, stream: Stream, want: int) -> int:
        """How much of `want` bytes may go now: all of it unless honouring windows."""
        with self._cond:
            while True:
                if stream._gone() or stream._local_fin:
                    raise StreamClosed(f"stream {stream.id} is closed for writing")
                if not self._flow_control:
                    return want
                n = min(want, stream._send_window, self._send_window)
                if n > 0:
                    stream._send_window -= n
                    self._send_window -= n
                    return n
                self._cond.wait()

    def _stream_send(self, stream: Stream, frame: Frame, *, fin: bool) -> None:
        with self._wlock:
            with self._cond:
                if stream._gone() or stream._local_fin:
                    if isinstance(frame, SynReply):
                        return  # replied already (fin), or nothing left to accept
                    raise StreamClosed(f"stream {stream.id} is closed for writing")
                frames: list[Frame] = [frame]
                if not stream.local and not stream._replied:
                    # spdystream drops DATA, FIN included, on a stream not replied to yet.
                    stream._replied = True
                    if not isinstance(frame, SynReply):
                        frames.insert(0, SynReply(stream.id, {}))
                elif isinstance(frame, SynReply):
                    return
                if fin:
                    stream._local_fin = True
                    if stream._remote_fin:
                        self._forget(stream)
            self._write_locked(frames)
        self._flush_updates()

    def _reset(self, stream: Stream, status: int, *, send: bool) -> None:
        with self._cond:
            if stream.reset_status is not None or (stream._local_fin and stream._remote_fin):
                return
            stream.reset_status = status
            self._forget(stream)
            # Unread data goes with the stream.
            stream._buffered = 0
            stream._chunks.clear()
            self._cond.notify_all()
        if send:
            with contextlib.suppress(StreamClosed):
                self._send([RstStream(stream.id, status)])

    def _send(self, frames: list[Frame]) -> None:
        with self._wlock:
            self._write_locked(frames)
        self._flush_updates()

    def _write_locked(self, frames: Iterable[Frame]) -> None:
        if self.closed.is_set() or self._broken:
            raise StreamClosed("session closed")
        data = b"".join(encode_frame(f, self._deflater) for f in [*self._due_updates(), *frames])
        try:
            self._sock.sendall(data)
        except OSError as e:
            # Part of a frame may have gone: nothing more can be written, and the
            # reader is woken to end the session.
            self._broken = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            raise StreamClosed(f"connection lost: {e}") from e

    def _due_updates(self) -> list[WindowUpdate]:
        with self._cond:
            due = [sid for sid, n in self._updates.items() if n >= _UPDATE_THRESHOLD]
            return [WindowUpdate(sid, self._updates.pop(sid)) for sid in due]

    def _flush_updates(self) -> None:
        # Readers never wait for the write lock: a writer stuck on a full socket must
        # not stop the application reading. The holder sends what is due with its next
        # frame or here after releasing, so a credit published while the lock was
        # taken is always sent by one of the two.
        while True:
            with self._cond:
                if self.closed.is_set() or all(n < _UPDATE_THRESHOLD for n in self._updates.values()):
                    return
            if not self._wlock.acquire(blocking=False):
                return
            try:
                self._write_locked([])
            except StreamClosed:
                return
            finally:
                self._wlock.release()

    # ---- the end ----

    def _end(self, status: int | None, *, reader: bool) -> None:
        with self._cond:
            if reader:
                self._running = False
            first = not self.closed.is_set()
            self.closed.set()
            last = self._last_peer_id
            close_socket = not self._running
            self._cond.notify_all()
            pings = list(self._pings.values())
        for answered in pings:
            answered.set()
        if first and status is not None:
            self._goaway(GoAway(last, status))
        if first or close_socket:
            # Shutdown wakes a writer blocked on a full socket and the reader in recv.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        if close_socket:
            # Writers use the socket only under the write lock: closing there cannot
            # hand a reused descriptor to one of them.
            with self._wlock:
                if not self._socket_closed:
                    self._socket_closed = True
                    self._sock.close()

    def _goaway(self, frame: GoAway) -> None:
        # Best effort: a writer blocked on a full socket, or a full socket, costs the
        # GOAWAY, not a hang; the peer sees the connection end either way.
        if not self._wlock.acquire(timeout=_GOAWAY_LOCK_WAIT):
            return
        try:
            with contextlib.suppress(OSError):
                self._sock.send(encode_frame(frame, self._deflater), socket.MSG_DONTWAIT)
        finally:
            self._wlock.release()


def _first_values(headers: dict[str, str]) -> dict[str, str]:
    return {name: value.split("\0", 1)[0] for name, value in headers.items()}


def _hung_up(sock: socket.socket) -> bool:
    """The peer closed or reset the connection (seen without reading from it)."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))
