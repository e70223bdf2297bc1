"""shim.streaming.spdy: frames and header blocks, bytes as spdystream writes them, two
sessions over a socketpair (streams, FIN, reset, PING, GOAWAY, flow control, large and
many transfers), and hostile peers (garbage, bad version, oversized frames, header bombs,
stream floods): the session ends or refuses, nothing escapes its thread."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import examples
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shim.streaming import spdy
from shim.streaming.spdy import (
    DataFrame,
    GoAway,
    HeaderDeflater,
    HeaderInflater,
    Headers,
    Ping,
    RstStream,
    Session,
    Settings,
    Stream,
    StreamClosed,
    SynReply,
    SynStream,
    UnknownFrame,
    WindowUpdate,
)

# sha256 of the 1423 bytes of headerDictionary in moby/spdystream spdy/dictionary.go
# (the SPDY/3 draft's dictionary).
DICTIONARY_SHA256 = "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"


# ---- helpers -----------------------------------------------------------------------------------


def control(kind: int, flags: int, payload: bytes, version: int = 3) -> bytes:
    """A control frame laid out as in the SPDY/3 draft, section 2.2.1."""
    return struct.pack(">HHI", 0x8000 | version, kind, flags << 24 | len(payload)) + payload


def syn_stream(stream_id: int, block: bytes, flags: int = 0) -> bytes:
    """SYN_STREAM: stream id, associated-to id, priority (3 bits) and slot, header block."""
    return control(1, flags, struct.pack(">IIBB", stream_id, 0, 0, 0) + block)


def data(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">II", stream_id, flags << 24 | len(payload)) + payload


def header_block(pairs: list[tuple[str, str]]) -> bytes:
    out = struct.pack(">I", len(pairs))
    for name, value in pairs:
        out += struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(value)) + value.encode()
    return out


class GoDeflater:
    """What spdystream's framer does: zlib at BestCompression with the dictionary,
    one writer for the connection, Flush (a sync flush) after each block."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(9, zdict=spdy.DICTIONARY)

    def block(self, pairs: list[tuple[str, str]]) -> bytes:
        return self._z.compress(header_block(pairs)) + self._z.flush(zlib.Z_SYNC_FLUSH)


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def no_new_threads(before: set[threading.Thread], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left:
            return
        time.sleep(0.01)
    raise AssertionError(f"threads left: {left}")


@dataclass
class Runner:
    """run() in a thread, recording whether it raised."""

    session: Session
    thread: threading.Thread = field(init=False)
    raised: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="spdy-test-reader")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.session.run()
        except BaseException as e:
            self.raised.append(e)

    def join(self, timeout: float = 5.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run() did not return"
        assert not self.raised, self.raised


@dataclass
class Pair:
    server: Session
    client: Session
    accepted: list[Stream]
    runners: list[Runner]


def echo(stream: Stream) -> None:
    """A server-side handler: reply, then echo until FIN, in its own thread."""
    stream.reply({"echo": "yes"})

    def loop() -> None:
        try:
            while chunk := stream.read():
                stream.write(chunk)
            stream.close()
        except StreamClosed:
            pass

    threading.Thread(target=loop, name=f"echo-{stream.id}").start()


@contextmanager
def session_pair(
    on_stream: Callable[[Stream], None] | None = None,
    *,
    server_kw: dict[str, Any] | None = None,
    client_kw: dict[str, Any] | None = None,
) -> Iterator[Pair]:
    before = set(threading.enumerate())
    a, b = socket.socketpair()
    accepted: list[Stream] = []

    def accept(stream: Stream) -> None:
        accepted.append(stream)
        if on_stream is not None:
            on_stream(stream)

    server = Session(a, server=True, on_stream=accept, **(server_kw or {}))
    client = Session(b, server=False, **(client_kw or {}))
    runners = [Runner(server), Runner(client)]
    try:
        yield Pair(server, client, accepted, runners)
    finally:
        client.close()
        server.close()
        for r in runners:
            r.join()
    no_new_threads(before)


def write_and_close(stream: Stream, payload: bytes) -> None:
    stream.write(payload)
    stream.close()


def read_all(stream: Stream, timeout: float = 10.0) -> bytes:
    out = bytearray()
    while chunk := stream.read(1 << 20, timeout=timeout):
        out += chunk
    return bytes(out)


@contextmanager
def raw_peer(**kw: Any) -> Iterator[tuple[socket.socket, Session, Runner]]:
    """A pyshim server session facing a raw socket the test writes bytes into."""
    before = set(threading.enumerate())
    ours, theirs = socket.socketpair()
    session = Session(ours, server=True, **kw)
    runner = Runner(session)
    try:
        yield theirs, session, runner
    finally:
        session.close()
        runner.join()
        theirs.close()
    no_new_threads(before)


def frames_until_eof(sock: socket.socket, timeout: float = 5.0) -> list[spdy.Frame]:
    sock.settimeout(timeout)
    buf = b""
    while chunk := sock.recv(65536):
        buf += chunk
    return spdy.decode_frames(buf, HeaderInflater())


def read_frames(
    sock: socket.socket, count: int, inflater: HeaderInflater, timeout: float = 5.0
) -> list[spdy.Frame]:
    """Exactly `count` frames from a live connection."""
    sock.settimeout(timeout)
    out: list[spdy.Frame] = []
    buf = b""
    while len(out) < count:
        while len(buf) < 8 or len(buf) < 8 + (struct.unpack(">I", buf[4:8])[0] & 0xFFFFFF):
            chunk = sock.recv(65536)
            assert chunk, f"EOF after {out}"
            buf += chunk
        size = 8 + (struct.unpack(">I", buf[4:8])[0] & 0xFFFFFF)
        out += spdy.decode_frames(buf[:size], inflater)
        buf = buf[size:]
    return out


# ---- frames --------------------------------------------------------------------------------------


def test_dictionary_is_spdy3s() -> None:
    assert len(spdy.DICTIONARY) == 1423
    assert hashlib.sha256(spdy.DICTIONARY).hexdigest() == DICTIONARY_SHA256


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-:_", min_size=1, max_size=20)
values = st.text(alphabet=st.characters(max_codepoint=255), max_size=40)
header_dicts = st.dictionaries(names, values, max_size=6)
stream_ids = st.integers(1, 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)

frames = st.one_of(
    st.builds(DataFrame, stream_ids, st.binary(max_size=300), st.booleans()),
    st.builds(
        SynStream,
        stream_ids,
        header_dicts,
        st.booleans(),
        st.booleans(),
        st.integers(0, 2**31 - 1),
        st.integers(0, 7),
    ),
    st.builds(SynReply, stream_ids, header_dicts, st.booleans()),
    st.builds(Headers, stream_ids, header_dicts, st.booleans()),
    st.builds(RstStream, stream_ids, st.integers(1, 2**32 - 1)),
    st.builds(Settings, st.dictionaries(st.integers(0, 2**24 - 1), u32, max_size=8), st.booleans()),
    st.builds(Ping, u32),
    st.builds(GoAway, st.integers(0, 2**31 - 1), u32),
    st.builds(WindowUpdate, st.integers(0, 2**31 - 1), st.integers(1, 2**31 - 1)),
    st.builds(
        UnknownFrame,
        st.integers(10, 0xFFFF) | st.sampled_from([0, 5]),
        st.integers(0, 255),
        st.binary(max_size=100),
    ),
)


@hsettings(max_examples=examples(200))
@given(st.lists(frames, max_size=12))
def test_frames_round_trip_through_one_compression_context(sequence: list[spdy.Frame]) -> None:
    deflater = HeaderDeflater()
    wire = b"".join(spdy.encode_frame(f, deflater) for f in sequence)
    assert spdy.decode_frames(wire, HeaderInflater()) == sequence


@hsettings(max_examples=examples(100))
@given(st.lists(header_dicts, min_size=1, max_size=8))
def test_header_blocks_round_trip_and_are_standard_zlib(blocks: list[dict[str, str]]) -> None:
    deflater, inflater = HeaderDeflater(), HeaderInflater()
    plain = zlib.decompressobj(zdict=spdy.DICTIONARY)
    for headers in blocks:
        compressed = deflater.deflate(headers)
        # Each block ends at a sync flush, so the peer can inflate it whole.
        assert compressed.endswith(b"\x00\x00\xff\xff")
        assert plain.decompress(compressed) == spdy.encode_header_block(headers)
        assert inflater.inflate(compressed) == headers


def test_multi_valued_headers_and_lowercasing() -> None:
    deflater = GoDeflater()
    block = deflater.block([("Port", "80\x0090"), ("streamtype", "data")])
    assert HeaderInflater().inflate(block) == {"port": "80\x0090", "streamtype": "data"}


def test_recorded_frames_as_spdystream_writes_them() -> None:
    """Byte for byte what moby/spdystream's framer puts on the wire for a k8s
    port-forward client: two SYN_STREAMs sharing one deflate context, DATA, the
    empty DATA+FIN of Stream.Close, PING, RST_STREAM CANCEL, GOAWAY OK."""
    go = GoDeflater()
    error_headers = go.block([("port", "8080"), ("requestid", "0"), ("streamtype", "error")])
    data_headers = go.block([("port", "8080"), ("requestid", "0"), ("streamtype", "data")])
    wire = (
        # SYN_STREAM: stream 1, associated 0, priority 0 (<<5), slot 0, header block.
        control(1, 0, bytes.fromhex("00000001 00000000 00 00") + error_headers)
        + control(1, 0, bytes.fromhex("00000003 00000000 00 00") + data_headers)
        + bytes.fromhex("00000003 00000005") + b"hello"
        + bytes.fromhex("00000001 01000000")  # DATA, FIN, no payload
        + bytes.fromhex("80030006 00000004 00000001")  # PING 1
        + bytes.fromhex("80030003 00000008 00000003 00000005")  # RST_STREAM 3 CANCEL
        + bytes.fromhex("80030007 00000008 00000000 00000000")  # GOAWAY 0 OK
    )  # fmt: skip
    assert spdy.decode_frames(wire, HeaderInflater()) == [
        SynStream(1, {"port": "8080", "requestid": "0", "streamtype": "error"}),
        SynStream(3, {"port": "8080", "requestid": "0", "streamtype": "data"}),
        DataFrame(3, b"hello"),
        DataFrame(1, b"", fin=True),
        Ping(1),
        RstStream(3, spdy.CANCEL),
        GoAway(0, spdy.GOAWAY_OK),
    ]
    # Our encoder lays the fixed-size frames out the same way.
    ours = HeaderDeflater()
    assert spdy.encode_frame(Ping(1), ours) == bytes.fromhex("80030006 00000004 00000001")
    assert spdy.encode_frame(DataFrame(1, b"", fin=True), ours) == bytes.fromhex("00000001 01000000")
    assert spdy.encode_frame(RstStream(3, 5), ours) == bytes.fromhex("80030003 00000008 00000003 00000005")
    update = bytes.fromhex("80030009 00000008 00000000 00010000")
    assert spdy.encode_frame(WindowUpdate(0, 65536), ours) == update


def test_recorded_reply_settings_and_window_update() -> None:
    go = GoDeflater()
    wire = (
        control(2, 0, bytes.fromhex("00000002") + go.block([]))  # k8s: SendReply(http.Header{})
        + control(4, 1, bytes.fromhex("00000002 01000007 00010000 00000004 00000064"))
        + bytes.fromhex("80030009 00000008 00000002 00008000")
    )  # fmt: skip
    assert spdy.decode_frames(wire, HeaderInflater()) == [
        SynReply(2, {}),
        Settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 65536, spdy.SETTINGS_MAX_CONCURRENT_STREAMS: 100}, True),
        WindowUpdate(2, 32768),
    ]


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (control(6, 0, b"\x00\x00\x00\x01", version=2), "version 2"),
        (struct.pack(">HHI", 0x8003, 1, 0xFFFFFF), "control frame of"),
        (control(3, 0, bytes.fromhex("00000000 00000005")), "stream id 0"),
        (control(3, 0, bytes.fromhex("00000001 00000000")), "status 0"),
        (control(7, 0, bytes(4)), "of 4 bytes"),
        (control(9, 0, bytes.fromhex("00000001 00000000")), "WINDOW_UPDATE of 0"),
        (control(4, 0, bytes.fromhex("00000005 00000001 00000001")), "SETTINGS of 5"),
        (control(2, 0, bytes.fromhex("00000001") + b"not zlib"), "inflate"),
        (data(0, b"x"), "stream 0"),
    ],
)
def test_malformed_frames_are_refused(wire: bytes, message: str) -> None:
    with pytest.raises(spdy.FrameError, match=message):
        spdy.decode_frames(wire, HeaderInflater())


def test_header_block_bounds() -> None:
    bomb = zlib.compressobj(zdict=spdy.DICTIONARY)
    block = bomb.compress(header_block([("x", "a" * 5_000_000)])) + bomb.flush(zlib.Z_SYNC_FLUSH)
    assert len(block) < spdy.MAX_CONTROL_PAYLOAD
    with pytest.raises(spdy.FrameError, match="inflates beyond"):
        HeaderInflater().inflate(block)
    lying = zlib.compressobj(zdict=spdy.DICTIONARY)
    claim = lying.compress(struct.pack(">I", 2**31)) + lying.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(spdy.FrameError, match="claims"):
        HeaderInflater().inflate(claim)


# ---- two sessions ------------------------------------------------------------------------------


def test_stream_exchange_fin_and_headers() -> None:
    with session_pair(echo) as p:
        stream = p.client.open_stream({"streamType": "data", "port": "8080", "requestID": "7"})
        assert stream.id == 1
        assert stream.wait_reply(5) == {"echo": "yes"}
        (theirs,) = p.accepted
        assert theirs.headers == {"streamtype": "data", "port": "8080", "requestid": "7"}
        stream.write(b"ping")
        assert stream.read(timeout=5) == b"ping"
        stream.close()
        assert read_all(stream) == b""
        second = p.client.open_stream({"streamtype": "error"})
        assert second.id == 3


def test_server_opens_even_streams_and_data_before_reply_is_kept() -> None:
    got: list[bytes] = []
    with session_pair() as p:
        # The client accepts nothing: a server stream is refused.
        stream = p.server.open_stream({"streamtype": "stdout"})
        assert stream.id == 2
        with pytest.raises(StreamClosed):
            stream.wait_reply(5)
        assert stream.reset_status == spdy.REFUSED_STREAM
        # A client may send DATA before the reply: it is kept for the handler.
        out = p.client.open_stream({"streamtype": "stdin"})
        out.write(b"early")
        out.close()
        eventually(lambda: bool(p.accepted))
        got.append(read_all(p.accepted[0]))
    assert got == [b"early"]


def test_write_replies_first_on_a_peer_stream() -> None:
    """spdystream drops DATA on its stream until our SYN_REPLY: write() sends it first."""
    with raw_peer(on_stream=lambda s: s.write(b"out")) as (peer, _session, _runner):
        go = GoDeflater()
        peer.sendall(syn_stream(1, go.block([("streamtype", "stdout")])))
        assert read_frames(peer, 2, HeaderInflater()) == [SynReply(1, {}), DataFrame(1, b"out")]


def test_data_with_fin_and_data_after_fin() -> None:
    """spdystream's WriteData(data, true) puts data and FIN in one frame; DATA after
    the FIN is a protocol error for that stream only (RST STREAM_ALREADY_CLOSED)."""
    accepted: list[Stream] = []
    with raw_peer(on_stream=lambda s: (s.reply(), accepted.append(s))) as (peer, _session, _runner):
        inflater = HeaderInflater()
        peer.sendall(syn_stream(1, GoDeflater().block([])) + data(1, b"last words", flags=1))
        assert read_frames(peer, 1, inflater) == [SynReply(1, {})]
        eventually(lambda: bool(accepted))
        assert read_all(accepted[0]) == b"last words"
        assert accepted[0].reset_status is None
        peer.sendall(data(1, b"more"))
        assert read_frames(peer, 1, inflater) == [RstStream(1, spdy.STREAM_ALREADY_CLOSED)]
        peer.sendall(bytes.fromhex("80030006 00000004 00000001"))  # the session goes on
        assert read_frames(peer, 1, inflater) == [Ping(1)]


def test_big_data_frames_as_spdystream_may_send_them() -> None:
    """One Write is one DATA frame, up to 2^24-1 bytes, whatever our window or budget."""
    payload = os.urandom(spdy.MAX_DATA_LENGTH)
    accepted: list[Stream] = []
    with raw_peer(on_stream=accepted.append, max_buffered=1 << 20) as (peer, _session, _runner):
        wire = syn_stream(1, GoDeflater().block([])) + data(1, b"small") + data(1, payload) + data(1, b"", 1)
        sender = threading.Thread(target=lambda: peer.sendall(wire))
        sender.start()
        eventually(lambda: bool(accepted))
        assert read_all(accepted[0]) == b"small" + payload
        sender.join(5)


def test_reset_wakes_and_closes_both_sides() -> None:
    with session_pair(lambda s: s.reply()) as p:
        stream = p.client.open_stream({})
        stream.wait_reply(5)
        theirs = p.accepted[0]
        results: list[bytes] = []
        reader = threading.Thread(target=lambda: results.append(theirs.read(timeout=5)))
        reader.start()
        time.sleep(0.05)
        stream.reset()
        reader.join(5)
        assert results == [b""]
        assert theirs.reset_status == spdy.CANCEL
        with pytest.raises(StreamClosed):
            theirs.write(b"x")
        with pytest.raises(StreamClosed):
            stream.write(b"x")
        stream.reset()  # idempotent
        stream.close()  # a no-op on a reset stream


def test_read_timeout_and_half_close() -> None:
    with session_pair(lambda s: s.reply()) as p:
        stream = p.client.open_stream({})
        stream.wait_reply(5)
        theirs = p.accepted[0]
        with pytest.raises(TimeoutError):
            theirs.read(timeout=0.05)
        stream.close()
        assert theirs.read(timeout=5) == b""
        # Half-closed: the other direction still works.
        theirs.write(b"after")
        theirs.close()
        assert read_all(stream) == b"after"
        with pytest.raises(StreamClosed):
            stream.write(b"x")


def test_ping_both_ways() -> None:
    with session_pair() as p:
        assert p.client.ping(5) >= 0
        assert p.server.ping(5) >= 0
        assert p.client.ping(5) >= 0


def test_goaway_ends_the_peers_run_and_wakes_everyone() -> None:
    with session_pair(lambda s: s.reply()) as p:
        stream = p.client.open_stream({})
        stream.wait_reply(5)
        theirs = p.accepted[0]
        results: list[bytes] = []
        reader = threading.Thread(target=lambda: results.append(theirs.read()))
        reader.start()
        p.client.close()
        p.runners[0].join()
        assert p.server.closed.is_set()
        reader.join(5)
        assert results == [b""]
        with pytest.raises(StreamClosed):
            p.server.open_stream({})
        p.client.close()  # idempotent


def test_goaway_from_peer_is_sent_as_spdystream_expects() -> None:
    with raw_peer() as (peer, session, runner):
        session.close()
        runner.join()
        assert frames_until_eof(peer) == [GoAway(0, spdy.GOAWAY_OK)]


def test_flow_control_writer_waits_for_the_readers_window_updates() -> None:
    payload = os.urandom(300_000)
    with session_pair(lambda s: s.reply(), client_kw={"flow_control": True}) as p:
        stream = p.client.open_stream({})
        stream.wait_reply(5)
        writer = threading.Thread(target=lambda: write_and_close(stream, payload))
        writer.start()
        theirs = p.accepted[0]
        eventually(lambda: theirs._buffered == spdy.INITIAL_WINDOW)
        time.sleep(0.2)
        assert writer.is_alive()
        assert theirs._buffered == spdy.INITIAL_WINDOW
        assert read_all(theirs) == payload
        writer.join(5)
        assert not writer.is_alive()


def test_without_flow_control_writes_ignore_windows_and_the_reader_pushes_back() -> None:
    """As with spdystream (which never sends WINDOW_UPDATE): writes do not wait for
    windows; the receiver stops reading the socket at max_buffered unread bytes."""
    payload = os.urandom(3 * 1024 * 1024)
    budget = 256 * 1024
    with session_pair(lambda s: s.reply(), server_kw={"max_buffered": budget}) as p:
        stream = p.client.open_stream({})
        stream.wait_reply(5)
        stream.write(b"x" * (4 * spdy.INITIAL_WINDOW))  # far beyond the window, not read yet
        writer = threading.Thread(target=lambda: write_and_close(stream, payload))
        writer.start()
        theirs = p.accepted[0]
        eventually(lambda: theirs._buffered > budget - spdy.MAX_SEND_CHUNK)
        time.sleep(0.2)
        assert writer.is_alive()  # held by TCP back-pressure
        assert theirs._buffered <= budget
        assert read_all(theirs) == b"x" * (4 * spdy.INITIAL_WINDOW) + payload
        writer.join(5)
        assert not writer.is_alive()


def test_unread_data_of_a_finished_stream_does_not_hold_the_session_back() -> None:
    budget = 64 * 1024

    def handler(stream: Stream) -> None:
        stream.reply(fin=stream.headers["kind"] == "ignored")

    with session_pair(handler, server_kw={"max_buffered": budget}) as p:
        ignored = p.client.open_stream({"kind": "ignored"})
        ignored.wait_reply(5)
        write_and_close(ignored, b"u" * (budget - 1000))  # both sides finished, never read
        eventually(lambda: len(p.accepted) == 1 and p.accepted[0]._remote_fin)
        payload = os.urandom(5 * budget)
        stream = p.client.open_stream({"kind": "read"})
        writer = threading.Thread(target=lambda: write_and_close(stream, payload))
        writer.start()
        eventually(lambda: len(p.accepted) == 2)
        assert read_all(p.accepted[1], timeout=5) == payload
        writer.join(5)
        # Still readable by whoever holds it.
        assert read_all(p.accepted[0]) == b"u" * (budget - 1000)


def test_large_transfers_both_directions() -> None:
    payload = os.urandom(6 * 1024 * 1024)
    kws: list[dict[str, Any]] = [{}, {"flow_control": True}]
    for kw in kws:
        with session_pair(echo, server_kw=kw, client_kw=kw) as p:
            stream = p.client.open_stream({})
            writer = threading.Thread(target=lambda s=stream: write_and_close(s, payload))
            writer.start()
            assert read_all(stream) == payload
            writer.join(5)


def test_many_concurrent_streams() -> None:
    count = 60
    payloads = [os.urandom(100_000 + i) for i in range(count)]
    results: dict[int, bytes] = {}
    with session_pair(echo, client_kw={"flow_control": True}) as p:

        def one(i: int) -> None:
            stream = p.client.open_stream({"requestid": str(i)})
            writer = threading.Thread(target=lambda: write_and_close(stream, payloads[i]))
            writer.start()
            results[i] = read_all(stream)
            writer.join(5)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == list(range(count))
        assert all(results[i] == payloads[i] for i in range(count))
        assert len(p.accepted) == count
        assert [s.id for s in sorted(p.accepted, key=lambda s: s.id)] == list(range(1, 2 * count, 2))


def test_close_wakes_a_writer_blocked_on_a_peer_that_does_not_read() -> None:
    with raw_peer(on_stream=lambda s: None) as (peer, session, runner):
        go = GoDeflater()
        peer.sendall(syn_stream(1, go.block([])))
        eventually(lambda: bool(session._streams))
        stream = session._streams[1]
        errors: list[BaseException] = []

        def write() -> None:
            try:
                stream.write(b"x" * 50_000_000)
            except StreamClosed as e:
                errors.append(e)

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.2)
        assert writer.is_alive()
        session.close()
        writer.join(5)
        assert not writer.is_alive()
        assert len(errors) == 1
        runner.join()


# ---- hostile peers -----------------------------------------------------------------------------


def ends_with_goaway(peer: socket.socket, status: int = spdy.GOAWAY_PROTOCOL_ERROR) -> None:
    got = frames_until_eof(peer)
    assert got and isinstance(got[-1], GoAway) and got[-1].status == status, got


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(control(6, 0, b"\x00\x00\x00\x01", version=2), id="version-2"),
        pytest.param(control(6, 0, b"\x00\x00\x00\x01", version=0x7FFF), id="version-32767"),
        pytest.param(struct.pack(">HHI", 0x8003, 1, 0xFFFFFF), id="oversized-control"),
        pytest.param(control(2, 0, bytes.fromhex("00000001") + b"\xff" * 100), id="bad-zlib"),
        pytest.param(data(0, b"hi"), id="data-stream-0"),
        pytest.param(
            syn_stream(2, GoDeflater().block([])),
            id="even-id-from-client",
        ),
    ],
)
def test_protocol_errors_end_the_session_with_goaway(wire: bytes) -> None:
    with raw_peer() as (peer, _session, runner):
        peer.sendall(wire)
        runner.join()
        ends_with_goaway(peer)


def test_header_block_bomb() -> None:
    bomb = zlib.compressobj(zdict=spdy.DICTIONARY)
    block = bomb.compress(header_block([("streamtype", "a" * 20_000_000)])) + bomb.flush(zlib.Z_SYNC_FLUSH)
    with raw_peer(on_stream=lambda s: s.reply()) as (peer, _session, runner):
        peer.sendall(syn_stream(1, block))
        runner.join()
        ends_with_goaway(peer)


def test_stream_ids_must_increase() -> None:
    go = GoDeflater()
    with raw_peer(on_stream=lambda s: s.reply()) as (peer, _session, runner):
        peer.sendall(syn_stream(5, go.block([])))
        peer.sendall(syn_stream(3, go.block([])))
        runner.join()
        got = frames_until_eof(peer)
        assert got == [SynReply(5, {}), GoAway(5, spdy.GOAWAY_PROTOCOL_ERROR)]


def test_too_many_streams_are_refused_and_the_session_stays_bounded() -> None:
    go = GoDeflater()
    inflater = HeaderInflater()
    with raw_peer(on_stream=lambda s: None, max_streams=4) as (peer, session, runner):
        for sid in range(1, 20, 2):
            peer.sendall(syn_stream(sid, go.block([("streamtype", "data")])))
        peer.sendall(bytes.fromhex("80030006 00000004 00000001"))
        got = read_frames(peer, 7, inflater)
        assert got == [RstStream(sid, spdy.REFUSED_STREAM) for sid in range(9, 20, 2)] + [Ping(1)]
        assert len(session._streams) == 4
        # One stream ends: there is room again.
        peer.sendall(bytes.fromhex("80030003 00000008 00000001 00000005"))
        peer.sendall(syn_stream(21, go.block([])))
        peer.sendall(bytes.fromhex("80030006 00000004 00000003"))
        assert read_frames(peer, 1, inflater) == [Ping(3)]
        assert sorted(session._streams) == [3, 5, 7, 21]
        peer.shutdown(socket.SHUT_WR)
        runner.join()


def test_unknown_control_frames_are_skipped() -> None:
    with raw_peer() as (peer, _session, _runner):
        peer.sendall(control(10, 0, b"credential") + control(0xFFFF, 0xFF, b""))
        peer.sendall(bytes.fromhex("80030006 00000004 00000001"))
        assert read_frames(peer, 1, HeaderInflater()) == [Ping(1)]


def test_handler_exception_resets_the_stream_only() -> None:
    def boom(stream: Stream) -> None:
        raise RuntimeError("handler bug")

    with session_pair(boom) as p:
        stream = p.client.open_stream({})
        with pytest.raises(StreamClosed):
            stream.wait_reply(5)
        assert stream.reset_status == spdy.INTERNAL_ERROR
        assert p.client.ping(5) >= 0


@hsettings(max_examples=examples(40))
@given(st.binary(min_size=1, max_size=2000))
def test_garbage_ends_the_session_quietly(garbage: bytes) -> None:
    with raw_peer(on_stream=lambda s: s.reply()) as (peer, _session, runner):
        try:
            peer.sendall(garbage)
            peer.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the session may have ended already
        runner.join()


@hsettings(max_examples=examples(40))
@given(st.lists(frames, min_size=1, max_size=10))
def test_random_valid_frames_never_escape_the_reader(sequence: list[spdy.Frame]) -> None:
    deflater = HeaderDeflater()
    wire = b"".join(spdy.encode_frame(f, deflater) for f in sequence)
    with raw_peer(on_stream=lambda s: s.reply()) as (peer, _session, runner):
        try:
            peer.sendall(wire)
            peer.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        runner.join()


# ---- frames recorded from a real client ------------------------------------------------------

# What crictl v1.32.0 (client-go's SPDY executor over moby/spdystream) wrote after its
# upgrade for `printf 'hello\n' | crictl exec -i CTR sh -c 'cat; ...'` against pyshim,
# captured with strace on 2026-12-05: four SYN_STREAMs (error, stdin, stdout, stderr)
# whose header blocks share one zlib context, stdin's data, then stdin's FIN.
CRICTL_EXEC = bytes.fromhex(
    "80030001000000290000000100000000000078f9e3c6a7c26260606004a7b392a2d4c45c6851c29a0a0a"
    "6800000000ffff800300010000001700000003000000000000c22e555c92929907000000ffff80030001"
    "0000001900000005000000000000c22ac5565c92925f5a02000000ffff80030001000000150000000700"
    "0000000000c229975a5404000000ffff000000030000000668656c6c6f0a0000000301000000"
)


def test_frames_recorded_from_crictl_decode() -> None:
    frames = spdy.decode_frames(CRICTL_EXEC, HeaderInflater())
    assert [(f.stream_id, f.headers) for f in frames[:4] if isinstance(f, SynStream)] == [
        (1, {"streamtype": "error"}),
        (3, {"streamtype": "stdin"}),
        (5, {"streamtype": "stdout"}),
        (7, {"streamtype": "stderr"}),
    ]
    assert frames[4:] == [DataFrame(3, b"hello\n"), DataFrame(3, b"", fin=True)]


def test_a_server_session_takes_crictls_recorded_exec() -> None:
    ours, theirs = socket.socketpair()
    arrived: list[Stream] = []

    def accept(stream: Stream) -> None:
        stream.reply()
        arrived.append(stream)

    # The first bytes come as h11's leftovers after the upgrade, the rest from the socket.
    session = Session(ours, server=True, initial=CRICTL_EXEC[:50], on_stream=accept)
    reader = threading.Thread(target=session.run, daemon=True)
    reader.start()
    try:
        theirs.sendall(CRICTL_EXEC[50:])
        stdin = _wait_for(lambda: next((s for s in arrived if s.headers["streamtype"] == "stdin"), None))
        assert stdin.read(timeout=5) == b"hello\n"
        assert stdin.read(timeout=5) == b""
        assert sorted(s.headers["streamtype"] for s in arrived) == ["error", "stderr", "stdin", "stdout"]
        # Our replies, as the client decodes them: one SYN_REPLY per stream, in order.
        theirs.settimeout(5)
        replies: list[spdy.Frame] = []
        wire = b""
        while len(replies) < 4:
            wire += theirs.recv(65536)
            replies = spdy.decode_frames(wire, HeaderInflater())  # afresh: one context per pass
        assert [(type(f), f.stream_id) for f in replies[:4]] == [(SynReply, i) for i in (1, 3, 5, 7)]
    finally:
        session.close()
        reader.join(5)
        theirs.close()
        ours.close()


def _wait_for(find: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found is not None:
            return found
        time.sleep(0.01)
    raise AssertionError("not found in time")
