"""Checks on what a RunPodSandbox request asks for, before anything is made.

Every limit here bounds memory or disk a single request can claim, or keeps a
request string from ever reaching the kernel or a path unchecked.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from shim._proto import api_pb2
from shim.cgroups import Limits
from shim.errors import InvalidArgument, Unimplemented
from shim.network import PortMapping
from shim.network.files import DnsConfig
from shim.sandbox_record import NamespaceMode, NamespaceModes
from shim.store import Metadata

MAX_NAME = 253  # a DNS-1123 subdomain, like a pod name
MAX_NAMESPACE = 253
MAX_UID = 128
MAX_HOSTNAME = 63
MAX_LOG_DIRECTORY = 4096
MAX_LABELS = 256
MAX_LABEL_KEY = 317  # prefix (253) + "/" + name (63)
MAX_LABEL_VALUE = 4096
MAX_ANNOTATIONS_BYTES = 256 * 1024  # Kubernetes' own limit on a pod's annotations
MAX_SYSCTLS = 64
MAX_ID = 64
MAX_DNS_SERVERS = 3  # what a resolver reads
MAX_DNS_SEARCHES = 32
MAX_DNS_OPTIONS = 16
MAX_PORT_MAPPINGS = 128
_PROTOCOLS = {0: "tcp", 1: "udp", 2: "sctp"}
_DNS_WORD = re.compile(r"[A-Za-z0-9_.:-]{1,253}")
# The config is kept whole in the record (verbose status): bound what one pod may store.
MAX_CONFIG_BYTES = 2 * 1024 * 1024

# Every pattern is used with fullmatch: `re.match` with `$` would accept a trailing "\n".
# Letters, digits, '.', '-': what Kubernetes names use, plus the capitals critest
# sends. No '_': it separates the parts of the reservation name, which must not be
# ambiguous. No '/', no space, no control character.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")
_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*")
_ID_PREFIX = re.compile(r"[0-9a-f]{1,64}")
_CGROUP_NAME = re.compile(r"[A-Za-z0-9_.:@=+-]{1,255}")
MAX_CGROUP_PATH = 1024
_CPUSET = re.compile(r"[0-9]{1,5}(-[0-9]{1,5})?(,[0-9]{1,5}(-[0-9]{1,5})?)*")
_PAGE_SIZE = re.compile(r"[1-9][0-9]{0,5}(KB|MB|GB|TB|PB)")
_UNIFIED_KEY = re.compile(r"[a-z][a-z0-9_]*\.[a-z0-9_.]+")
MAX_HUGEPAGE_LIMITS = 16
MAX_UNIFIED = 64
_SYSCTL = re.compile(r"[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+")
# Namespaced sysctls (the pod's net, ipc namespaces); anything else would change the node.
_NAMESPACED_SYSCTLS = re.compile(r"net\..+|kernel\.shm.+|kernel\.msg.+|kernel\.sem|fs\.mqueue\..+")


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """A validated RunPodSandbox request."""

    metadata: Metadata
    modes: NamespaceModes
    runtime_handler: str
    hostname: str
    log_directory: str
    labels: dict[str, str]
    annotations: dict[str, str]
    sysctls: dict[str, str] = field(default_factory=dict)
    dns: DnsConfig = field(default_factory=DnsConfig)
    port_mappings: tuple[PortMapping, ...] = ()
    # cgroupfs path of the pod's cgroup ("" lets pyshim choose), and the limits it gets if
    # pyshim has to create it (the pod's resources plus its overhead).
    cgroup_parent: str = ""
    limits: Limits = field(default_factory=Limits)
    config: bytes = b""

    @property
    def namespaces(self) -> frozenset[str]:
        """The namespaces the pause must create for this pod."""
        kinds = set()
        if self.modes.network != NamespaceMode.NODE:
            kinds |= {"net", "uts"}  # a host-network pod keeps the node's hostname too
        if self.modes.ipc != NamespaceMode.NODE:
            kinds.add("ipc")
        if self.modes.pid == NamespaceMode.POD:
            kinds.add("pid")
        return frozenset(kinds)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)


def sandbox_spec(request: api_pb2.RunPodSandboxRequest, handlers: tuple[str, ...]) -> SandboxSpec:
    _check(request.HasField("config"), "config is required")
    config = request.config
    metadata = _metadata(config)
    handler = request.runtime_handler or handlers[0]
    _check(
        handler in handlers,
        f"unknown runtime handler {request.runtime_handler[:80]!r} (known: {', '.join(handlers)})",
    )
    modes = _modes(config)
    hostname = config.hostname
    if hostname:
        _check(
            len(hostname) <= MAX_HOSTNAME and bool(_HOSTNAME.fullmatch(hostname)),
            f"hostname {hostname[:80]!r} is not a valid host name (letters, digits, '-', '.', "
            f"at most {MAX_HOSTNAME})",
        )
    log_dir = config.log_directory
    if log_dir:
        _check(
            log_dir.startswith("/")
            and len(log_dir) <= MAX_LOG_DIRECTORY
            and log_dir.isprintable()
            and ".." not in log_dir.split("/"),
            f"log_directory {log_dir[:80]!r} must be an absolute path without '..' or control characters",
        )
    _check_labels(config.labels, "label")
    annotations_size = sum(len(k.encode()) + len(v.encode()) for k, v in config.annotations.items())
    _check(
        annotations_size <= MAX_ANNOTATIONS_BYTES,
        f"annotations take {annotations_size} bytes, the limit is {MAX_ANNOTATIONS_BYTES}",
    )
    _check_security(config)
    sysctls = _sysctls(config, modes)
    size = config.ByteSize()
    _check(size <= MAX_CONFIG_BYTES, f"config is {size} bytes, the limit is {MAX_CONFIG_BYTES}")
    return SandboxSpec(
        metadata=metadata,
        modes=modes,
        runtime_handler=handler,
        hostname=hostname if modes.network != NamespaceMode.NODE else "",
        log_directory=log_dir,
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        sysctls=sysctls,
        dns=_dns(config),
        port_mappings=_port_mappings(config),
        cgroup_parent=cgroup_path(config.linux.cgroup_parent, "linux.cgroup_parent"),
        limits=_pod_limits(config.linux),
        config=config.SerializeToString(deterministic=True),
    )


def _metadata(config: api_pb2.PodSandboxConfig) -> Metadata:
    _check(config.HasField("metadata"), "config.metadata is required (name, namespace, uid)")
    md = config.metadata
    for field_name, value in (("name", md.name), ("namespace", md.namespace), ("uid", md.uid)):
        _check(bool(value), f"config.metadata.{field_name} is required")
    _check(
        len(md.name) <= MAX_NAME and bool(_NAME.fullmatch(md.name)),
        f"config.metadata.name {md.name[:80]!r} must be letters, digits, '-', '.' (at most {MAX_NAME})",
    )
    _check(
        len(md.namespace) <= MAX_NAMESPACE and bool(_NAME.fullmatch(md.namespace)),
        f"config.metadata.namespace {md.namespace[:80]!r} must be letters, digits, '-', '.' "
        f"(at most {MAX_NAMESPACE})",
    )
    _check(
        len(md.uid) <= MAX_UID and bool(_UID.fullmatch(md.uid)),
        f"config.metadata.uid {md.uid[:80]!r} must be letters, digits, '.', '_', '-' (at most {MAX_UID})",
    )
    return Metadata(name=md.name, uid=md.uid, namespace=md.namespace, attempt=md.attempt)


def _check_labels(labels: Mapping[str, str], what: str) -> None:
    _check(len(labels) <= MAX_LABELS, f"{len(labels)} {what}s, the limit is {MAX_LABELS}")
    for key, value in labels.items():
        _check(0 < len(key) <= MAX_LABEL_KEY, f"{what} key {key[:80]!r} must be 1-{MAX_LABEL_KEY} bytes")
        size = len(value.encode())
        _check(
            size <= MAX_LABEL_VALUE,
            f"{what} {key[:80]!r}: value is {size} bytes, the limit is {MAX_LABEL_VALUE}",
        )


def _modes(config: api_pb2.PodSandboxConfig) -> NamespaceModes:
    opts = config.linux.security_context.namespace_options
    network, pid, ipc = _mode(opts.network, "network"), _mode(opts.pid, "pid"), _mode(opts.ipc, "ipc")
    _check(
        network in (NamespaceMode.POD, NamespaceMode.NODE),
        f"network namespace mode {network.name} is not POD or NODE",
    )
    _check(
        ipc in (NamespaceMode.POD, NamespaceMode.NODE), f"ipc namespace mode {ipc.name} is not POD or NODE"
    )
    _check(pid != NamespaceMode.TARGET, "pid namespace mode TARGET applies to containers, not sandboxes")
    userns = opts.userns_options
    if opts.HasField("userns_options"):
        mode = _mode(userns.mode, "user")
        _check(
            mode in (NamespaceMode.POD, NamespaceMode.NODE),
            f"user namespace mode {mode.name} is not POD or NODE",
        )
        if mode == NamespaceMode.POD and (userns.uids or userns.gids):
            raise Unimplemented("user namespaces with id mappings are not supported by pyshim yet")
    return NamespaceModes(network=network, pid=pid, ipc=ipc, target_id=opts.target_id)


def _mode(value: int, kind: str) -> NamespaceMode:
    try:
        return NamespaceMode(value)
    except ValueError:
        raise InvalidArgument(
            f"{kind} namespace mode {value} is not one of POD, CONTAINER, NODE, TARGET"
        ) from None


def _check_security(config: api_pb2.PodSandboxConfig) -> None:
    sc = config.linux.security_context
    _check(
        not (sc.HasField("run_as_group") and not sc.HasField("run_as_user")),
        "security_context.run_as_group needs run_as_user",
    )


def _sysctls(config: api_pb2.PodSandboxConfig, modes: NamespaceModes) -> dict[str, str]:
    sysctls = dict(config.linux.sysctls)
    _check(len(sysctls) <= MAX_SYSCTLS, f"{len(sysctls)} sysctls, the limit is {MAX_SYSCTLS}")
    for key, value in sysctls.items():
        _check(
            len(key) <= 128 and bool(_SYSCTL.fullmatch(key)) and ".." not in key,
            f"sysctl name {key[:80]!r} is malformed",
        )
        _check(
            bool(_NAMESPACED_SYSCTLS.fullmatch(key)),
            f"sysctl {key} is not namespaced; only net.*, "
            "kernel.shm*, kernel.msg*, kernel.sem and fs.mqueue.* may be set for a pod",
        )
        _check(
            len(value) <= 256 and "\n" not in value and "\0" not in value,
            f"sysctl {key}: value must be one line of at most 256 bytes",
        )
        if key.startswith("net."):
            _check(
                modes.network != NamespaceMode.NODE,
                f"sysctl {key} would change the node: the pod uses the host network",
            )
        else:
            _check(
                modes.ipc != NamespaceMode.NODE,
                f"sysctl {key} would change the node: the pod uses the host IPC namespace",
            )
    return sysctls


def _dns(config: api_pb2.PodSandboxConfig) -> DnsConfig:
    dns = config.dns_config
    _check(
        len(dns.servers) <= MAX_DNS_SERVERS, f"{len(dns.servers)} DNS servers, the limit is {MAX_DNS_SERVERS}"
    )
    _check(
        len(dns.searches) <= MAX_DNS_SEARCHES,
        f"{len(dns.searches)} DNS searches, the limit is {MAX_DNS_SEARCHES}",
    )
    _check(
        len(dns.options) <= MAX_DNS_OPTIONS, f"{len(dns.options)} DNS options, the limit is {MAX_DNS_OPTIONS}"
    )
    for server in dns.servers:
        try:
            parsed = ipaddress.ip_address(server)
        except ValueError:
            raise InvalidArgument(f"DNS server {server[:80]!r} is not an IP address") from None
        # A scope id (fe80::1%eth0) could carry anything, newlines included.
        _check(
            "%" not in server and str(parsed) == server.lower(),
            f"DNS server {server[:80]!r} is not a plain IP address",
        )
    # Each word lands on a line of resolv.conf: nothing that could start another line.
    for word in [*dns.searches, *dns.options]:
        _check(bool(_DNS_WORD.fullmatch(word)), f"DNS search or option {word[:80]!r} is malformed")
    return DnsConfig(servers=tuple(dns.servers), searches=tuple(dns.searches), options=tuple(dns.options))


def _port_mappings(config: api_pb2.PodSandboxConfig) -> tuple[PortMapping, ...]:
    mappings = config.port_mappings
    _check(
        len(mappings) <= MAX_PORT_MAPPINGS, f"{len(mappings)} port mappings, the limit is {MAX_PORT_MAPPINGS}"
    )
    result = []
    seen = set()
    for m in mappings:
        _check(m.protocol in _PROTOCOLS, f"port mapping protocol {m.protocol} is not TCP, UDP or SCTP")
        _check(1 <= m.container_port <= 65535, f"container port {m.container_port} is not 1-65535")
        _check(0 <= m.host_port <= 65535, f"host port {m.host_port} is not 0-65535")
        host_ip = m.host_ip
        if host_ip:
            try:
                parsed = ipaddress.IPv4Address(host_ip)
            except ValueError:
                raise InvalidArgument(f"host_ip {host_ip[:80]!r} is not an IPv4 address") from None
            host_ip = "" if parsed.is_unspecified else str(parsed)  # 0.0.0.0 means any, as ""
        if m.host_port == 0:
            continue  # the CRI's "no host port": nothing to map
        key = (_PROTOCOLS[m.protocol], m.host_port, host_ip)
        _check(key not in seen, f"host port {m.host_port}/{key[0]} is mapped twice")
        seen.add(key)
        result.append(PortMapping(key[0], m.container_port, m.host_port, host_ip))
    return tuple(result)


def id_prefix(value: str, what: str = "pod sandbox id") -> str:
    """An id or id prefix from a request: 1-64 lowercase hex characters."""
    _check(bool(value), f"{what} is required")
    _check(bool(_ID_PREFIX.fullmatch(value)), f"{what} {value[:80]!r} is not 1-64 lowercase hex characters")
    return value


def cgroup_path(value: str, what: str) -> str:
    """A cgroupfs path from a request: absolute, plain names, no '..'; "" stays ""."""
    if not value:
        return ""
    parts = [p for p in value.split("/") if p]
    _check(
        value.startswith("/")
        and len(value) <= MAX_CGROUP_PATH
        and bool(parts)  # the root itself: no pod's cgroup
        and all(_CGROUP_NAME.fullmatch(p) and p not in (".", "..") for p in parts),
        f"{what} {value[:80]!r} must be an absolute cgroupfs path of plain names (e.g. /kubepods/pod<uid>)",
    )
    return "/" + "/".join(parts)


def _pod_limits(linux: api_pb2.LinuxPodSandboxConfig) -> Limits:
    """What kubelet would set on the pod cgroup: the pod's resources plus its overhead."""
    res, extra = linux.resources, linux.overhead
    resources(res, "config.linux.resources")
    resources(extra, "config.linux.overhead")
    period = res.cpu_period or extra.cpu_period
    return Limits(
        cpu_shares=res.cpu_shares + extra.cpu_shares,
        cpu_quota=res.cpu_quota + extra.cpu_quota if res.cpu_quota or extra.cpu_quota else 0,
        cpu_period=period,
        memory_limit=res.memory_limit_in_bytes + extra.memory_limit_in_bytes
        if res.memory_limit_in_bytes
        else 0,
        cpuset_cpus=res.cpuset_cpus,
        cpuset_mems=res.cpuset_mems,
    )


def resources(res: api_pb2.LinuxContainerResources, where: str) -> None:
    """LinuxContainerResources (a container's, or a pod's resources and overhead): values
    a cgroup takes, so that the kernel never refuses one as the daemon's fault."""
    _check(
        res.cpu_period == 0 or 1000 <= res.cpu_period <= 1_000_000,
        f"{where}.cpu_period {res.cpu_period} is not 0 or 1000-1000000 (microseconds)",
    )
    _check(
        res.cpu_quota in (0, -1) or res.cpu_quota >= 1000,
        f"{where}.cpu_quota {res.cpu_quota} is not 0, -1 or at least 1000 (microseconds)",
    )
    _check(
        res.cpu_shares == 0 or 2 <= res.cpu_shares <= 262144,
        f"{where}.cpu_shares {res.cpu_shares} is not 0 or 2-262144",
    )
    _check(res.memory_limit_in_bytes >= 0, f"{where}.memory_limit_in_bytes must not be negative")
    swap = res.memory_swap_limit_in_bytes
    _check(swap >= -1, f"{where}.memory_swap_limit_in_bytes must be -1 (unlimited), 0 or a size")
    _check(
        swap <= 0 or res.memory_limit_in_bytes == 0 or swap >= res.memory_limit_in_bytes,
        f"{where}.memory_swap_limit_in_bytes (memory plus swap) is below memory_limit_in_bytes",
    )
    _check(-1000 <= res.oom_score_adj <= 1000, f"{where}.oom_score_adj {res.oom_score_adj} is not -1000-1000")
    for field_name, value in (("cpuset_cpus", res.cpuset_cpus), ("cpuset_mems", res.cpuset_mems)):
        _check(
            not value or _cpuset_ok(value), f"{where}.{field_name} {_show(value)} is not a list like 0-3,8"
        )
    _check(
        len(res.hugepage_limits) <= MAX_HUGEPAGE_LIMITS,
        f"{len(res.hugepage_limits)} hugepage limits, the limit is {MAX_HUGEPAGE_LIMITS}",
    )
    sizes = [h.page_size for h in res.hugepage_limits]
    for size in sizes:
        _check(
            bool(_PAGE_SIZE.fullmatch(size)), f"{where}: hugepage size {_show(size)} is not like 2MB or 1GB"
        )
    _check(len(set(sizes)) == len(sizes), f"{where}: a hugepage size is limited twice")
    _check(len(res.unified) <= MAX_UNIFIED, f"{len(res.unified)} unified keys, the limit is {MAX_UNIFIED}")
    for key, value in res.unified.items():
        _check(
            len(key) <= 64 and bool(_UNIFIED_KEY.fullmatch(key)),
            f"{where}.unified: {_show(key)} is not a cgroup file name like memory.high",
        )
        _check(
            len(value) <= 4096 and value.isprintable(),
            f"{where}.unified[{key}]: the value must be one printable line of at most 4096 bytes",
        )


def _cpuset_ok(value: str) -> bool:
    if len(value) > 4096 or not _CPUSET.fullmatch(value):
        return False
    for part in value.split(","):
        low, _, high = part.partition("-")
        if high and int(high) < int(low):
            return False
    return True


def _show(value: str) -> str:
    """A request string in a message: quoted, escaped, cut short."""
    return repr(value[:80])
