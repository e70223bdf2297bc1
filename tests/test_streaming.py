"""Exec, Attach and PortForward through the streaming server, with clients that
speak the real protocols (SPDY/3.1 and WebSocket, tests/streamclient.py), against
real containers and pods."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import Daemon, pod_config
from containertools import container_config, run, status, wait_state
from streamclient import (
    HTTPError,
    http_request,
    spdy_connect,
    spdy_exec,
    spdy_forward,
    tunnel_connect,
    wait_until,
    ws_connect,
    ws_exec,
    ws_forward,
)

from shim._proto import api_pb2

pytestmark = pytest.mark.root


@pytest.fixture(params=["crun", "runc"])
def handler(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _pod(daemon: Daemon, runtime_handler: str = "", **kwargs: object) -> str:
    config = pod_config(**kwargs)  # type: ignore[arg-type]
    config.log_directory = str(daemon.base / "logs" / config.metadata.name)
    request = api_pb2.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
    return str(daemon.runtime.RunPodSandbox(request, timeout=30).pod_sandbox_id)


@pytest.fixture
def container(cdaemon: Daemon) -> str:
    return run(cdaemon, _pod(cdaemon), container_config("shell"))


def exec_url(daemon: Daemon, container_id: str, *cmd: str, stdin: bool = False, tty: bool = False) -> str:
    request = api_pb2.ExecRequest(
        container_id=container_id, cmd=list(cmd), stdin=stdin, stdout=True, stderr=not tty, tty=tty
    )
    return str(daemon.runtime.Exec(request, timeout=10).url)


SCRIPT = ("sh", "-c", "echo out; echo err >&2; exit 3")


# ---- exec ------------------------------------------------------------------------------


def test_exec_answers_a_url_on_the_loopback_streaming_server(cdaemon: Daemon, container: str) -> None:
    url = exec_url(cdaemon, container, "true")
    assert url.startswith("http://127.0.0.1:")
    assert "/exec/" in url and len(url.rsplit("/", 1)[1]) >= 40


@pytest.mark.parametrize("protocol", ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io"])
def test_exec_over_spdy_streams_output_and_exit_code(cdaemon: Daemon, container: str, protocol: str) -> None:
    result = spdy_exec(exec_url(cdaemon, container, *SCRIPT), protocols=[protocol])
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    if protocol == "v4.channel.k8s.io":
        assert result.status["reason"] == "NonZeroExitCode"
        assert result.exit_code == 3
    else:
        assert b"exit code 3" in result.error


@pytest.mark.parametrize(
    "protocol", ["v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io", "base64.channel.k8s.io"]
)
def test_exec_over_websocket_streams_output_and_exit_code(
    cdaemon: Daemon, container: str, protocol: str
) -> None:
    result = ws_exec(exec_url(cdaemon, container, *SCRIPT), protocol=protocol)
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    if protocol.startswith(("v4", "v5")):
        assert result.exit_code == 3
    else:
        assert b"exit code 3" in result.error


def test_exec_success_is_a_success_status(cdaemon: Daemon, container: str) -> None:
    result = spdy_exec(exec_url(cdaemon, container, "echo", "hi"))
    assert result.stdout == b"hi\n"
    assert result.status == {"metadata": {}, "status": "Success"}


def test_exec_stdin_reaches_the_command_and_its_end_is_eof(cdaemon: Daemon, container: str) -> None:
    payload = secrets.token_bytes(300_000)
    result = spdy_exec(
        exec_url(cdaemon, container, "sh", "-c", "cat; echo end >&2", stdin=True), stdin=payload
    )
    assert result.stdout == payload
    assert result.stderr == b"end\n"
    ws = ws_exec(exec_url(cdaemon, container, "wc", "-c", stdin=True), stdin=b"12345")
    assert ws.stdout.split() == [b"5"]


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_exec_with_a_terminal_honours_resize(cdaemon: Daemon, handler: str, transport: str) -> None:
    container = run(cdaemon, _pod(cdaemon, runtime_handler=handler), container_config("shell"))
    # Polls until the size arrives: resize travels on a stream of its own.
    script = (
        'for i in $(seq 100); do s=$(stty size); [ "$s" = "33 77" ] && break; sleep 0.05; done; '
        "echo size=$s; tty; exit 4"
    )
    url = exec_url(cdaemon, container, "sh", "-c", script, tty=True)
    if transport == "spdy":
        result = spdy_exec(url, tty=True, sizes=[(77, 33)])
    else:
        result = ws_exec(url, sizes=[(77, 33)])
    assert b"size=33 77" in result.stdout
    assert b"/dev/pts/" in result.stdout
    assert result.exit_code == 4


def test_exec_of_a_missing_program_fails_with_its_exit_code(cdaemon: Daemon, container: str) -> None:
    result = spdy_exec(exec_url(cdaemon, container, "/no/such/program"))
    assert result.exit_code != 0


def test_exec_calls_are_checked(cdaemon: Daemon, container: str) -> None:
    def code(**fields: object) -> grpc.StatusCode:
        request = api_pb2.ExecRequest(
            **{"container_id": container, "cmd": ["true"], "stdout": True, **fields}
        )
        with pytest.raises(grpc.RpcError) as err:
            cdaemon.runtime.Exec(request, timeout=10)
        return err.value.code()  # type: ignore[no-any-return]

    assert code(cmd=[]) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(tty=True, stderr=True) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(stdout=False) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(container_id="ab" * 32) == grpc.StatusCode.NOT_FOUND
    assert code(container_id="x/../y") == grpc.StatusCode.INVALID_ARGUMENT


def test_a_token_works_once(cdaemon: Daemon, container: str) -> None:
    url = exec_url(cdaemon, container, "true")
    assert spdy_exec(url).exit_code == 0
    with pytest.raises(HTTPError) as used:
        spdy_exec(url)
    assert used.value.status == 404
    base, _, _ = url.rpartition("/")
    with pytest.raises(HTTPError) as unknown:
        spdy_exec(f"{base}/{secrets.token_urlsafe(32)}")
    assert unknown.value.status == 404
    with pytest.raises(HTTPError) as wrong_kind:
        ws_exec(url.replace("/exec/", "/attach/"))
    assert wrong_kind.value.status == 404


def test_requests_without_an_upgrade_or_a_known_path_are_refused(cdaemon: Daemon, container: str) -> None:
    url = exec_url(cdaemon, container, "true")
    assert http_request(url)[0] == 400
    root = url.split("/exec/")[0]
    assert http_request(root + "/")[0] == 404
    assert http_request(root + "/exec/")[0] == 404
    status, headers, _ = http_request(
        exec_url(cdaemon, container, "true"),
        "POST",
        {"Connection": "Upgrade", "Upgrade": "SPDY/3.1", "X-Stream-Protocol-Version": "v9.nothing"},
    )
    assert status == 403
    assert "v4.channel.k8s.io" in headers["x-accepted-stream-protocol-versions"]


def test_a_client_that_goes_away_leaves_no_process(cdaemon: Daemon, container: str) -> None:
    # A sleep whose length no other process on the node has.
    seconds = str(100_000 + secrets.randbelow(800_000))
    for connect in ("spdy", "websocket"):
        url = exec_url(cdaemon, container, "sleep", seconds)
        client = (
            spdy_connect(url, ["v4.channel.k8s.io"])
            if connect == "spdy"
            else ws_connect(url, ["v4.channel.k8s.io"])
        )
        if connect == "spdy":
            client.session.open_stream({"streamtype": "error"}, fin=True)  # type: ignore[union-attr]
            client.session.open_stream({"streamtype": "stdout"}, fin=True)  # type: ignore[union-attr]
            client.session.open_stream({"streamtype": "stderr"}, fin=True)  # type: ignore[union-attr]
        assert wait_until(lambda: _pids_named(seconds)), "the command never started"
        client.sock.shutdown(socket.SHUT_RDWR)
        client.close()
        assert wait_until(lambda: not _pids_named(seconds)), "the command outlived its client"


def _fds_and_threads(daemon: Daemon) -> tuple[int, int]:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def test_sessions_leave_no_fd_or_thread_behind(
    cdaemon: Daemon, container: str, echo_pod: tuple[str, int]
) -> None:
    sandbox_id, port = echo_pod
    spdy_exec(exec_url(cdaemon, container, "true"))  # the first session's one-time costs
    baseline = _fds_and_threads(cdaemon)
    for _ in range(3):
        # Ended normally, over each transport, with a terminal and stdin.
        spdy_exec(exec_url(cdaemon, container, "cat", stdin=True), stdin=b"x")
        ws_exec(exec_url(cdaemon, container, "cat", stdin=True), stdin=b"x")
        spdy_exec(exec_url(cdaemon, container, "sh", "-c", "exit 2", tty=True), tty=True, sizes=[(80, 24)])
        # Cut off mid-session.
        for connect in (spdy_connect, ws_connect):
            url = exec_url(cdaemon, container, "sleep", "600")
            client = connect(url, ["v4.channel.k8s.io"])
            if connect is spdy_connect:
                for kind in ("error", "stdout", "stderr"):
                    client.session.open_stream({"streamtype": kind}, fin=True)  # type: ignore[union-attr]
            time.sleep(0.2)
            client.sock.shutdown(socket.SHUT_RDWR)
            client.close()
        forward = spdy_connect(forward_url(cdaemon, sandbox_id), ["portforward.k8s.io"], method="GET")
        assert spdy_forward(forward, 0, port, b"x") == (b"x", b"")
        forward.sock.shutdown(socket.SHUT_RDWR)
        forward.close()
    assert wait_until(lambda: _fds_and_threads(cdaemon) <= baseline), (
        f"fds and threads {_fds_and_threads(cdaemon)}, {baseline} before"
    )


def _pids_named(seconds: str) -> list[int]:
    """Processes running `sleep SECONDS`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().endswith(f"sleep\0{seconds}\0".encode()):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def test_fifty_concurrent_exec_sessions(cdaemon: Daemon, container: str) -> None:
    urls = [exec_url(cdaemon, container, "sh", "-c", f"sleep 0.5; echo {i}") for i in range(50)]
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda u: spdy_exec(u) if hash(u) % 2 else ws_exec(u), urls))
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(50)]
    assert all(r.exit_code == 0 for r in results)


def test_a_flood_of_bad_requests_does_not_harm_a_session(cdaemon: Daemon, container: str) -> None:
    url = exec_url(cdaemon, container, "sh", "-c", "cat", stdin=True)
    host, port = url.split("/")[2].split(":")
    done: list[bytes] = []
    session = threading.Thread(target=lambda: done.append(spdy_exec(url, stdin=b"still here").stdout))
    session.start()

    def garbage(i: int) -> None:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            kind = i % 4
            if kind == 0:
                s.sendall(secrets.token_bytes(4096) + b"\r\n\r\n")
            elif kind == 1:
                s.sendall(b"GET /exec/" + b"A" * 60_000 + b" HTTP/1.1\r\n\r\n")
            elif kind == 2:
                s.sendall(
                    b"GET /exec/nope HTTP/1.1\r\nHost: x\r\nUpgrade: SPDY/3.1\r\nConnection: Upgrade\r\n\r\n"
                )
            else:
                s.sendall(b"GET / HTTP/1.1\r\nX: " + b"y" * 40_000 + b"\r\n\r\n")
            s.settimeout(30)
            with contextlib.suppress(ConnectionResetError):  # refused with our bytes unread
                while s.recv(65536):
                    pass

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(garbage, range(200)))
    session.join(60)
    assert done == [b"still here"]
    assert spdy_exec(exec_url(cdaemon, container, "echo", "ok")).stdout == b"ok\n"


# ---- attach ----------------------------------------------------------------------------


def test_attach_connects_to_the_containers_stdio(cdaemon: Daemon) -> None:
    config = container_config("echoer", ["sh", "-c", "while read l; do echo got:$l; echo err:$l >&2; done"])
    config.stdin = True
    config.stdin_once = True
    container_id = run(cdaemon, _pod(cdaemon), config)
    request = api_pb2.AttachRequest(container_id=container_id, stdin=True, stdout=True, stderr=True)
    url = cdaemon.runtime.Attach(request, timeout=10).url
    result = spdy_exec(url, stdin=b"one\ntwo\n")
    assert result.stdout == b"got:one\ngot:two\n", result
    assert result.stderr == b"err:one\nerr:two\n"
    # stdin_once: the first attach's end closed the container's stdin, so it ended.
    assert wait_state(cdaemon, container_id, api_pb2.CONTAINER_EXITED).state == api_pb2.CONTAINER_EXITED


def test_stdin_stays_open_across_attaches_without_stdin_once(cdaemon: Daemon) -> None:
    config = container_config("reader", ["sh", "-c", "while read l; do echo got:$l; done; echo eof"])
    config.stdin = True
    container_id = run(cdaemon, _pod(cdaemon), config)
    request = api_pb2.AttachRequest(container_id=container_id, stdin=True, stdout=True)
    for line in (b"one", b"two"):
        # The client's end of stdin ends its attach, not the container's stdin.
        client = spdy_connect(cdaemon.runtime.Attach(request, timeout=10).url, ["v4.channel.k8s.io"])
        try:
            client.session.open_stream({"streamtype": "error"}, fin=True)
            stdin = client.session.open_stream({"streamtype": "stdin"})
            stdout = client.session.open_stream({"streamtype": "stdout"}, fin=True)
            stdin.write(line + b"\n")
            assert stdout.read(timeout=20) == b"got:" + line + b"\n"
            stdin.close()
        finally:
            client.close()
    assert status(cdaemon, container_id).status.state == api_pb2.CONTAINER_RUNNING


def test_attach_to_a_container_that_is_not_running_is_refused(cdaemon: Daemon) -> None:
    container_id = run(cdaemon, _pod(cdaemon), container_config("quick", ["true"]))
    wait_state(cdaemon, container_id, api_pb2.CONTAINER_EXITED)
    with pytest.raises(grpc.RpcError) as err:
        cdaemon.runtime.Attach(api_pb2.AttachRequest(container_id=container_id, stdout=True), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# ---- port forward ----------------------------------------------------------------------

ECHO_SERVER = """
import socket, sys, threading
server = socket.socket(socket.AF_INET6 if sys.argv[2] == "6" else socket.AF_INET)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("::1" if sys.argv[2] == "6" else "127.0.0.1", int(sys.argv[1])))
server.listen(64)
print("ready", flush=True)
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""


@pytest.fixture
def echo_pod(daemon: Daemon) -> Iterator[tuple[str, int]]:
    """A pod whose network namespace runs a TCP echo server on localhost:7007."""
    sandbox_id = _pod(daemon)
    pin = Path(daemon.netns_dir) / f"pyshim-{sandbox_id}"
    server = subprocess.Popen(
        ["nsenter", f"--net={pin}", sys.executable, "-c", ECHO_SERVER, "7007", "4"],
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        yield sandbox_id, 7007
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert server.stdout is not None
        server.stdout.close()


def forward_url(daemon: Daemon, sandbox_id: str, ports: list[int] | None = None) -> str:
    request = api_pb2.PortForwardRequest(pod_sandbox_id=sandbox_id, port=ports or [])
    return str(daemon.runtime.PortForward(request, timeout=10).url)


def test_port_forward_over_spdy_reaches_localhost_in_the_pod(
    daemon: Daemon, echo_pod: tuple[str, int]
) -> None:
    sandbox_id, port = echo_pod
    client = spdy_connect(forward_url(daemon, sandbox_id, [port]), ["portforward.k8s.io"], method="GET")
    try:
        payload = secrets.token_bytes(2_000_000)
        assert spdy_forward(client, 0, port, payload) == (payload, b"")
        # More connections on the same session, one of them to a closed port.
        assert spdy_forward(client, 1, port, b"again") == (b"again", b"")
        data, error = spdy_forward(client, 2, 7008, b"x")
        assert data == b""
        assert b"7008" in error
    finally:
        client.close()


def test_twenty_concurrent_forwarded_connections(daemon: Daemon, echo_pod: tuple[str, int]) -> None:
    sandbox_id, port = echo_pod
    client = spdy_connect(forward_url(daemon, sandbox_id), ["portforward.k8s.io"], method="GET")
    try:
        payloads = [secrets.token_bytes(100_000) for _ in range(20)]
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda i: spdy_forward(client, i, port, payloads[i]), range(20)))
        assert [r[0] for r in results] == payloads
    finally:
        client.close()


def test_port_forward_over_websocket(daemon: Daemon, echo_pod: tuple[str, int]) -> None:
    sandbox_id, port = echo_pod
    found = ws_forward(forward_url(daemon, sandbox_id), [port], b"hello")
    assert found[port] == (b"hello", b"")


def test_port_forward_through_the_websocket_tunnel(daemon: Daemon, echo_pod: tuple[str, int]) -> None:
    """crictl --transport websocket and kubectl's WebSocket port-forward tunnel SPDY."""
    sandbox_id, port = echo_pod
    client = tunnel_connect(forward_url(daemon, sandbox_id))
    try:
        assert client.protocol == "SPDY/3.1+portforward.k8s.io"
        payload = secrets.token_bytes(500_000)
        assert spdy_forward(client, 0, port, payload) == (payload, b"")
        assert spdy_forward(client, 1, port, b"again") == (b"again", b"")
    finally:
        client.close()


def test_port_forward_checks_its_request(daemon: Daemon, echo_pod: tuple[str, int]) -> None:
    sandbox_id, port = echo_pod
    for ports, code in (([0], grpc.StatusCode.INVALID_ARGUMENT), ([70000], grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as err:
            forward_url(daemon, sandbox_id, ports)
        assert err.value.code() == code
    with pytest.raises(grpc.RpcError) as missing:
        forward_url(daemon, "cd" * 32)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    # A port not asked for in the call is refused on the stream.
    client = spdy_connect(forward_url(daemon, sandbox_id, [port]), ["portforward.k8s.io"], method="GET")
    try:
        data, error = spdy_forward(client, 0, port + 1, b"x")
        assert data == b"" and b"not asked for" in error
    finally:
        client.close()
