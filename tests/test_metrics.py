"""--metrics-address: a real daemon serving Prometheus metrics, scraped over HTTP
and parsed with prometheus_client's own parser; and no listener without the flag."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Daemon, run_pod
from imagetools import Registry, free_port, layer_tar, oci_layout, push, start_registry
from prometheus_client.parser import text_string_to_metric_families

from shim._proto import api_pb2

pytestmark = pytest.mark.root

RUNTIME = "RuntimeService"
IMAGES = "ImageService"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ---- helpers ---------------------------------------------------------------------------


def scrape(address: str, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


def samples(address: str) -> Samples:
    """Every sample of a scrape, by (name, labels), parsed by prometheus_client itself."""
    found: Samples = {}
    for family in text_string_to_metric_families(scrape(address)):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series not (yet) exported, as Prometheus would treat a count."""
    return found.get((name, frozenset(labels.items())), 0.0)


def calls(found: Samples, service: str, method: str, code: str) -> float:
    return value(found, "pyshim_cri_requests_total", service=service, method=method, code=code)


def timed(found: Samples, service: str, method: str) -> float:
    return value(found, "pyshim_cri_request_duration_seconds_count", service=service, method=method)


def tcp_listeners(pid: int) -> set[int]:
    """Ports of the TCP sockets `pid` listens on (IPv4 and IPv6), from its open fds and
    the kernel's socket tables: other processes' listeners (a registry) do not count."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if str(target).startswith("socket:["):
            inodes.add(str(target)[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: TCP_LISTEN
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def metrics_daemon(daemon_factory: type[Daemon], address: str) -> Daemon:
    return daemon_factory(["--metrics-address", address])  # type: ignore[call-arg]


def pid_of(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return daemon.proc.pid


def refused(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# ---- off by default, bad addresses ------------------------------------------------------


def streaming_port(daemon: Daemon) -> int:
    """The streaming server's port (always listening: Exec, Attach, PortForward), from
    the daemon's log: a call to ask for it would show in the counters."""
    found = re.search(r"event=stream_serving url=\S+:(\d+)", daemon.log.read_text())
    assert found, "the daemon logged no streaming server"
    return int(found.group(1))


def test_no_listener_without_the_flag(daemon: Daemon) -> None:
    assert tcp_listeners(pid_of(daemon)) == {streaming_port(daemon)}


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("nonsense", "expected HOST:PORT"),
        ("::1:9090", "in brackets"),
        ("127.0.0.1:70000", "expected HOST:PORT"),
        ("192.0.2.1:{port}", "cannot listen on"),  # not an address of this host
        ("127.0.0.1:{busy}", "Address already in use"),
    ],
)
def test_bad_address_exits_1_with_one_line(daemon_factory: type[Daemon], address: str, expected: str) -> None:
    d = daemon_factory(start=False)  # type: ignore[call-arg]
    with socket.create_server(("127.0.0.1", 0)) as busy:
        flag = address.format(port=free_port(), busy=busy.getsockname()[1])
        done = subprocess.run(
            [*d.argv(), "--metrics-address", flag, "--log-level", "error"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "event=cannot_start" in lines[0] and expected in lines[0]


# ---- what a scrape shows ----------------------------------------------------------------


def test_cri_calls_pods_and_process(daemon_factory: type[Daemon]) -> None:
    address = f"127.0.0.1:{free_port()}"
    d = metrics_daemon(daemon_factory, address)
    assert tcp_listeners(pid_of(d)) == {int(address.rsplit(":", 1)[1]), streaming_port(d)}
    before = samples(address)
    assert value(before, "pyshim_pods", state="ready") == 0
    assert value(before, "pyshim_pods", state="notready") == 0
    assert value(before, "pyshim_containers", state="running") == 0

    for _ in range(2):
        d.runtime.Version(api_pb2.VersionRequest(), timeout=10)
    pod = run_pod(d)
    running = samples(address)
    assert value(running, "pyshim_pods", state="ready") == 1
    assert value(running, "pyshim_pods", state="notready") == 0

    d.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=30)
    stopped = samples(address)
    assert value(stopped, "pyshim_pods", state="ready") == 0
    assert value(stopped, "pyshim_pods", state="notready") == 1
    d.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        d.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=""), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    found = samples(address)
    assert calls(found, RUNTIME, "Version", "OK") == 2
    assert calls(found, RUNTIME, "RunPodSandbox", "OK") == 1
    assert calls(found, RUNTIME, "StopPodSandbox", "OK") == 1
    assert calls(found, RUNTIME, "StopPodSandbox", "INVALID_ARGUMENT") == 1
    assert calls(found, RUNTIME, "RemovePodSandbox", "OK") == 1
    # Only what was called is exported: no series for a method or a code never seen.
    codes = {
        (dict(labels)["method"], dict(labels)["code"])
        for name, labels in found
        if name == "pyshim_cri_requests_total"
    }
    assert codes == {
        ("Version", "OK"),
        ("RunPodSandbox", "OK"),
        ("StopPodSandbox", "OK"),
        ("StopPodSandbox", "INVALID_ARGUMENT"),
        ("RemovePodSandbox", "OK"),
    }
    # Every answered call is timed, failed ones included, in buckets that add up.
    assert timed(found, RUNTIME, "Version") == 2
    assert timed(found, RUNTIME, "StopPodSandbox") == 2
    run = {"service": RUNTIME, "method": "RunPodSandbox"}
    assert value(found, "pyshim_cri_request_duration_seconds_bucket", **run, le="+Inf") == 1
    assert 0 < value(found, "pyshim_cri_request_duration_seconds_sum", **run) < 30
    assert value(found, "pyshim_pods", state="notready") == 0

    # The pod's network, on the built-in bridge: set up once, torn down once.
    assert value(found, "pyshim_network_setup_duration_seconds_count", backend="bridge") == 1
    assert value(found, "pyshim_network_teardown_duration_seconds_count", backend="bridge") == 1
    assert value(found, "pyshim_network_setup_duration_seconds_count", backend="cni") == 0
    assert value(found, "pyshim_network_failures_total", operation="setup", backend="bridge") == 0

    # The daemon's own process, and the interpreter's.
    assert value(found, "process_resident_memory_bytes") > 10 * 1024 * 1024
    assert value(found, "process_cpu_seconds_total") > 0
    assert value(found, "process_open_fds") > 0
    assert any(name == "python_info" for name, _ in found)
    assert any(name == "python_gc_collections_total" for name, _ in found)

    # Streaming sessions are declared for the streaming server; none yet.
    assert "pyshim_stream_sessions" in scrape(address)

    # The listener goes with the daemon.
    assert d.terminate() == 0
    assert refused(address)


def test_only_metrics_path_is_served(daemon_factory: type[Daemon]) -> None:
    address = f"127.0.0.1:{free_port()}"
    metrics_daemon(daemon_factory, address)
    for path in ("/", "/other", "/metrics/x", "/favicon.ico"):
        with pytest.raises(urllib.error.HTTPError) as err:
            scrape(address, path)
        err.value.close()
        assert err.value.code == 404, path
    assert "pyshim_pods" in scrape(address, "/metrics?x=1")


def test_ipv6_loopback(daemon_factory: type[Daemon]) -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    address = f"[::1]:{free_port()}"
    d = metrics_daemon(daemon_factory, address)
    d.runtime.Version(api_pb2.VersionRequest(), timeout=10)
    assert calls(samples(address), RUNTIME, "Version", "OK") == 1


# ---- image pulls ------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = start_registry(tmp_path / "registry")
    yield reg
    reg.stop()


def served_size(registry: Registry, repository: str, tag: str) -> int:
    """Bytes a first pull reads: the manifest as the registry serves it, its config and layers."""
    request = urllib.request.Request(
        f"http://{registry.host}/v2/{repository}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    manifest = json.loads(body)
    return len(body) + manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])


def pull(daemon: Daemon, ref: str) -> None:
    daemon.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=60)


def test_image_pulls(daemon_factory: type[Daemon], tmp_path: Path, registry: Registry) -> None:
    layout = tmp_path / "layout"
    oci_layout(layout, "1.0", [layer_tar({"etc/motd": b"metrics\n" * 1000})])
    push(layout, "1.0", registry, "library/metrics")
    address = f"127.0.0.1:{free_port()}"
    d = metrics_daemon(daemon_factory, address)
    before = samples(address)
    assert value(before, "pyshim_image_pulls_total", result="success") == 0
    assert value(before, "pyshim_image_pulls_total", result="failure") == 0

    pull(d, f"{registry.host}/library/metrics:1.0")
    found = samples(address)
    assert value(found, "pyshim_image_pulls_total", result="success") == 1
    assert value(found, "pyshim_image_pull_duration_seconds_count") == 1
    assert value(found, "pyshim_image_pull_bytes_total") == served_size(registry, "library/metrics", "1.0")
    assert calls(found, IMAGES, "PullImage", "OK") == 1

    with pytest.raises(grpc.RpcError) as err:
        pull(d, f"{registry.host}/library/metrics:missing")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    failed = samples(address)
    assert value(failed, "pyshim_image_pulls_total", result="failure") == 1
    assert value(failed, "pyshim_image_pulls_total", result="success") == 1
    assert value(failed, "pyshim_image_pull_duration_seconds_count") == 1  # successful pulls only
    assert calls(failed, IMAGES, "PullImage", "NOT_FOUND") == 1
