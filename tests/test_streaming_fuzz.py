"""The streaming server under generated hostile input: arbitrary bytes and HTTP
requests at its listener, and arbitrary SPDY and WebSocket traffic after a real
upgrade with a valid token. Each case ends (answered or closed), the daemon
lives, nothing of the case is left (the exec'd command is gone), and a proper
session still works afterwards."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Iterator

import pytest
from conftest import Daemon, examples, pod_config
from containertools import busybox_archive, container_config, import_image, run
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from streamclient import spdy_exec, wait_until

from shim._proto import api_pb2

pytestmark = pytest.mark.root

# Every case must end: the server answers or closes within its request timeout (10 s).
CASE_TIMEOUT = 15


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str]]:
    """One daemon and one running container for all examples (module-scoped: hypothesis
    runs many examples per test)."""
    base = tmp_path_factory.mktemp("fuzzstream")
    daemon = Daemon(base=base).start()
    try:
        import_image(daemon, busybox_archive(base))
        config = pod_config()
        config.log_directory = str(base / "logs")
        pod = daemon.runtime.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(config=config), timeout=30
        ).pod_sandbox_id
        yield daemon, run(daemon, pod, container_config("target"))
    finally:
        daemon.cleanup()


def _url(daemon: Daemon, container_id: str, *cmd: str) -> str:
    request = api_pb2.ExecRequest(
        container_id=container_id, cmd=list(cmd), stdin=True, stdout=True, stderr=True
    )
    return str(daemon.runtime.Exec(request, timeout=10).url)


def _exchange(host: str, port: int, payload: bytes, head: bytes = b"") -> None:
    """Send `head` then `payload`, then read until the server closes (or resets)."""
    with (
        socket.create_connection((host, port), timeout=CASE_TIMEOUT) as sock,
        contextlib.suppress(ConnectionError),
    ):
        sock.sendall(head + payload)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass


def _alive_and_working(daemon: Daemon, container_id: str) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died"
    assert spdy_exec(_url(daemon, container_id, "echo", "ok"), stdin=b"").stdout == b"ok\n"


def _where(url: str) -> tuple[str, int, str]:
    host, port = url.split("/")[2].rsplit(":", 1)
    return host, int(port), "/" + url.split("/", 3)[3]


_http_line = st.binary(max_size=300).filter(lambda b: b"\r\n" not in b)
_requests = st.one_of(
    st.binary(max_size=20_000),
    st.builds(
        lambda method, target, headers: (
            method + b" " + target + b" HTTP/1.1\r\n" + b"".join(headers) + b"\r\n"
        ),
        st.sampled_from([b"GET", b"POST", b"PUT", b"\x00", b"CONNECT"]),
        _http_line,
        st.lists(_http_line.map(lambda b: b + b"\r\n"), max_size=20),
    ),
)


@given(request=_requests)
@hsettings(
    max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_arbitrary_requests_are_answered_or_closed(world: tuple[Daemon, str], request: bytes) -> None:
    daemon, container_id = world
    host, port, _ = _where(_url(daemon, container_id, "true"))
    _exchange(host, port, request)
    assert daemon.proc is not None and daemon.proc.poll() is None


def _seconds() -> str:
    return str(100_000 + secrets.randbelow(800_000))


def _sleeping(seconds: str) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().endswith(f"sleep\0{seconds}\0".encode()):
                    return True
    return False


def _garbage_after_upgrade(world: tuple[Daemon, str], upgrade: str, frames: bytes) -> None:
    """A session on a `sleep` opened with the request head `upgrade` (PATH filled in),
    then `frames`: the session ends, and its command with it."""
    daemon, container_id = world
    seconds = _seconds()
    host, port, path = _where(_url(daemon, container_id, "sleep", seconds))
    _exchange(host, port, frames, upgrade.replace("PATH", path).encode())
    assert wait_until(lambda: not _sleeping(seconds)), "the command outlived its session"
    _alive_and_working(daemon, container_id)


@given(frames=st.binary(max_size=50_000), protocol=st.sampled_from(["v4.channel.k8s.io", "channel.k8s.io"]))
@hsettings(
    max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_garbage_after_a_spdy_upgrade_ends_the_session_and_its_command(
    world: tuple[Daemon, str], frames: bytes, protocol: str
) -> None:
    upgrade = (
        "POST PATH HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        f"X-Stream-Protocol-Version: {protocol}\r\n\r\n"
    )
    _garbage_after_upgrade(world, upgrade, frames)


@given(
    frames=st.binary(max_size=50_000),
    protocol=st.sampled_from(["v5.channel.k8s.io", "base64.channel.k8s.io"]),
)
@hsettings(
    max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_garbage_after_a_websocket_upgrade_ends_the_session(
    world: tuple[Daemon, str], frames: bytes, protocol: str
) -> None:
    upgrade = (
        "GET PATH HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {secrets.token_hex(8)}==\r\n"
        f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
    )
    _garbage_after_upgrade(world, upgrade, frames)
