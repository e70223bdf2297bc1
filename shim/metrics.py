"""Prometheus metrics: the metric objects, and the HTTP listener that serves them.

Every metric lives in REGISTRY, a registry of pyshim's own rather than
prometheus_client's global one: what a test process or an embedding program
registers elsewhere never shows up here, and nothing here clashes with it. The
process, platform and garbage-collector collectors are registered in it too, under
their standard names (process_*, python_*) so that stock dashboards find them.

The metric objects always exist and are always updated, whether or not
--metrics-address is set. The rpc wrapper's share is about 1.1 us per call
(1.5 us for a failed one), against some 600 us for the quickest CRI round trip
(Version) through gRPC: a switch would save next to nothing, and would make each
instrumented place depend on whether a listener was started. With no listener
nothing is ever collected, encoded or sent.

Streaming sessions (Exec, Attach, PortForward) are counted by
STREAM_SESSIONS, incremented by the streaming server when a session ends.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import http.server
import ipaddress
import logging
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from shim.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from shim.containers.lifecycle import ContainerManager
    from shim.sandbox import SandboxManager

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

REGISTRY = CollectorRegistry(auto_describe=True)
# Instances of our own: the library's module-level ones belong to its global registry.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# From sub-millisecond (Version, a cached list) to the minutes a pull or a slow stop may take.
CALL_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)
PULL_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
NETWORK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

CRI_REQUESTS = Counter(
    "pyshim_cri_requests",
    "CRI calls answered, by service, method and gRPC status code.",
    ["service", "method", "code"],
    registry=REGISTRY,
)
CRI_REQUEST_DURATION = Histogram(
    "pyshim_cri_request_duration_seconds",
    "Time pyshim took to answer a CRI call (decoded request to reply), by service and method.",
    ["service", "method"],
    buckets=CALL_BUCKETS,
    registry=REGISTRY,
)
IMAGE_PULLS = Counter(
    "pyshim_image_pulls",
    "Image pulls, by result (success or failure).",
    ["result"],
    registry=REGISTRY,
)
IMAGE_PULL_BYTES = Counter(
    "pyshim_image_pull_bytes",
    "Bytes received from registries while pulling (manifests and blobs, pulls that failed included).",
    registry=REGISTRY,
)
IMAGE_PULL_DURATION = Histogram(
    "pyshim_image_pull_duration_seconds",
    "Time a successful image pull took, resolving the reference included.",
    buckets=PULL_BUCKETS,
    registry=REGISTRY,
)
NETWORK_SETUP_DURATION = Histogram(
    "pyshim_network_setup_duration_seconds",
    "Time a successful pod network setup took, by backend (bridge or cni).",
    ["backend"],
    buckets=NETWORK_BUCKETS,
    registry=REGISTRY,
)
NETWORK_TEARDOWN_DURATION = Histogram(
    "pyshim_network_teardown_duration_seconds",
    "Time a successful pod network teardown took, by backend (bridge or cni).",
    ["backend"],
    buckets=NETWORK_BUCKETS,
    registry=REGISTRY,
)
NETWORK_FAILURES = Counter(
    "pyshim_network_failures",
    "Pod network setups and teardowns that failed, by operation and backend.",
    ["operation", "backend"],
    registry=REGISTRY,
)
STREAM_SESSIONS = Counter(
    "pyshim_stream_sessions",
    "Streaming sessions that ended, by kind (exec, attach, portforward) and protocol.",
    ["kind", "protocol"],
    registry=REGISTRY,
)

# Series whose label values are known up front start at zero, so that a rate over
# them exists before the first event (Prometheus cannot tell "none yet" from "unknown").
_PULL_SUCCEEDED = IMAGE_PULLS.labels("success")
_PULL_FAILED = IMAGE_PULLS.labels("failure")
BACKENDS = ("bridge", "cni")
_NETWORK_DURATION = {"setup": NETWORK_SETUP_DURATION, "teardown": NETWORK_TEARDOWN_DURATION}
for _backend in BACKENDS:
    for _operation, _histogram in _NETWORK_DURATION.items():
        _histogram.labels(_backend)
        NETWORK_FAILURES.labels(_operation, _backend)


# ---- what the instrumented code calls ------------------------------------------------------


class CallMetrics:
    """The CRI series of one method. Children are looked up once and kept: on the
    per-call path, labels() (a lock and a dict lookup with label checks) would cost
    as much as the update itself. A method's series appear at its first call, so
    the ~40 methods kubelet never calls do not each export an empty histogram."""

    __slots__ = ("_counts", "_method", "_observe", "_service")

    def __init__(self, service: str, method: str) -> None:
        self._service = service
        self._method = method
        self._observe: Callable[[float], None] | None = None
        self._counts: dict[str, Callable[[], None]] = {}

    def done(self, code: str, seconds: float) -> None:
        observe = self._observe
        if observe is None:
            observe = self._observe = CRI_REQUEST_DURATION.labels(self._service, self._method).observe
        observe(seconds)
        inc = self._counts.get(code)
        if inc is None:
            inc = self._counts.setdefault(code, CRI_REQUESTS.labels(self._service, self._method, code).inc)
        inc()


def image_pull(pull: Callable[P, R]) -> Callable[P, R]:
    """Counts a pull as a success or a failure, and times the successful ones."""

    @functools.wraps(pull)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        start = time.perf_counter()
        try:
            result = pull(*args, **kwargs)
        except BaseException:
            _PULL_FAILED.inc()
            raise
        IMAGE_PULL_DURATION.observe(time.perf_counter() - start)
        _PULL_SUCCEEDED.inc()
        return result

    return wrapper


@contextlib.contextmanager
def network(operation: str, backend: str) -> Iterator[None]:
    """Times a successful network setup or teardown; counts a failed one."""
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        NETWORK_FAILURES.labels(operation, backend).inc()
        raise
    _NETWORK_DURATION[operation].labels(backend).observe(time.perf_counter() - start)


# ---- pods and containers, counted when scraped -------------------------------------------


class _StateCollector:
    """pyshim_pods and pyshim_containers by state, counted at scrape time from the
    managers' own lists: nothing to keep in step with every state change, and a
    scrape costs one pass over records held in memory."""

    def __init__(self, sandboxes: SandboxManager, containers: ContainerManager) -> None:
        self._sandboxes = sandboxes
        self._containers = containers

    def describe(self) -> Iterable[Metric]:
        # Given, so that registering does not call collect() (and the managers) to learn the names.
        return [self._pods({}), self._containers_family({})]

    def collect(self) -> Iterable[Metric]:
        from shim.containers.lifecycle import ListFilter as ContainerFilter
        from shim.sandbox import ListFilter

        pods = collections.Counter(r.state.value for r in self._sandboxes.list(ListFilter()))
        containers = collections.Counter(r.state.value for r in self._containers.select(ContainerFilter()))
        return [self._pods(pods), self._containers_family(containers)]

    @staticmethod
    def _pods(counts: dict[str, int]) -> GaugeMetricFamily:
        from shim.sandbox_record import SandboxState

        family = GaugeMetricFamily("pyshim_pods", "Pod sandboxes pyshim knows, by state.", labels=["state"])
        for state in SandboxState:
            family.add_metric([state.value], counts.get(state.value, 0))
        return family

    @staticmethod
    def _containers_family(counts: dict[str, int]) -> GaugeMetricFamily:
        from shim.containers.record import ContainerState

        family = GaugeMetricFamily(
            "pyshim_containers", "Containers pyshim knows, by state.", labels=["state"]
        )
        for state in ContainerState:
            family.add_metric([state.value], counts.get(state.value, 0))
        return family


# ---- the listener ------------------------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT, or :PORT for every IPv4 address. Port 0: any free port."""
    usage = f"--metrics-address {text[:100]!r}: expected HOST:PORT, e.g. 127.0.0.1:9090 or [::1]:9090"
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(usage)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidArgument(f"{usage} ({host!r} is not an IPv6 address)") from None
    elif ":" in host:
        raise InvalidArgument(f"{usage} (an IPv6 address goes in brackets)")
    return host or "0.0.0.0", int(port)


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "pyshim-metrics"
    # A client that connects and sends nothing holds a thread no longer than this.
    timeout = 10

    def do_GET(self) -> None:
        if urllib.parse.urlsplit(self.path).path != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        encode, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            body = encode(REGISTRY)
        except Exception:  # a collector failed: the scrape fails, the daemon goes on
            log.exception("event=metrics_scrape_failed")
            self.send_error(500, "collecting metrics failed (details in pyshim's log)")
            return
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Every scrape would be a line at INFO: scrapes are routine; only debug tells them.
        log.debug("event=metrics_http client=%s %s", self.address_string(), format % args)


class _HTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True  # a scrape in progress never holds up the daemon's exit

    def __init__(self, family: socket.AddressFamily, address: tuple[str, int]) -> None:
        self.address_family = family
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # Not HTTPServer's: it looks the host's FQDN up, which may wait on DNS at start.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class MetricsServer:
    """Serves GET /metrics from REGISTRY in a thread of its own (one more per scrape)."""

    def __init__(self, address: str, collector: _StateCollector | None = None) -> None:
        host, port = parse_address(address)
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except (socket.gaierror, UnicodeError) as exc:
            raise InvalidArgument(f"--metrics-address {address[:100]!r}: {exc}") from None
        try:
            self._server = _HTTPServer(family, (str(sockaddr[0]), int(sockaddr[1])))
        except OSError as exc:
            raise FailedPrecondition(f"metrics: cannot listen on {address}: {exc.strerror or exc}") from None
        self._collector = collector
        if collector is not None:
            REGISTRY.register(collector)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics", daemon=True
        )
        self._thread.start()
        log.info("event=metrics_serving address=%s", self.address)

    @property
    def address(self) -> str:
        """Where it listens, as HOST:PORT ([HOST]:PORT for IPv6), with the port it got."""
        host, port = self._server.socket.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    def close(self) -> None:
        """Stop listening; a scrape in progress is cut off. Idempotent."""
        if self._collector is not None:
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(self._collector)
            self._collector = None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start(address: str, sandboxes: SandboxManager, containers: ContainerManager) -> MetricsServer:
    """Serve http://ADDRESS/metrics. InvalidArgument for an address that is not one,
    FailedPrecondition for one that cannot be listened on (in use, not this host's)."""
    return MetricsServer(address, _StateCollector(sandboxes, containers))
