"""The daemon's configuration: flags become one frozen Config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_SOCKET = Path("/run/pyshim/pyshim.sock")
DEFAULT_ROOT = Path("/var/lib/pyshim")
DEFAULT_RUN_ROOT = Path("/run/pyshim")
DEFAULT_NETNS_DIR = Path("/run/netns")
# Runtime handlers (RuntimeClass handler names) and their OCI runtimes; the first is
# what the empty handler (no RuntimeClass) selects.
# crun is the default: faster here (to running ~30 ms against runc's ~41 ms, see
# docs/performance.md), and both pass the suite and critest.
DEFAULT_RUNTIME_HANDLERS = (("crun", "crun"), ("runc", "runc"))
DEFAULT_CGROUP_ROOT = "/pyshim"
DEFAULT_BRIDGE = "pyshim0"
DEFAULT_POD_SUBNET = "10.88.0.0/16"
DEFAULT_NFT_TABLE = "pyshim"
DEFAULT_CNI_CONF_DIR = Path("/etc/cni/net.d")
DEFAULT_REGISTRY_CONFIG_DIR = Path("/etc/pyshim/certs.d")
# Debian installs the plugins in /usr/lib/cni; upstream's convention is /opt/cni/bin.
DEFAULT_CNI_BIN_DIRS = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))


@dataclass(frozen=True, slots=True)
class Config:
    socket: Path = DEFAULT_SOCKET
    root: Path = DEFAULT_ROOT
    run_root: Path = DEFAULT_RUN_ROOT
    # Pinned network namespaces go here so that `ip netns` and CNI tools see them.
    netns_dir: Path = DEFAULT_NETNS_DIR
    pause_path: Path | None = None
    runtime_handlers: tuple[tuple[str, str], ...] = DEFAULT_RUNTIME_HANDLERS
    conmon: str = "conmon"
    # Pods that name no cgroup_parent get <cgroup_root>/<sandbox id>.
    cgroup_root: str = DEFAULT_CGROUP_ROOT
    # Seconds conmon may take to report that the runtime created a container.
    create_timeout: float = 60.0
    # Seconds a pause gets between SIGTERM and SIGKILL on StopPodSandbox.
    pause_stop_timeout: float = 2.0
    # Seconds RunPodSandbox waits for a pause to report readiness.
    pause_start_timeout: float = 10.0
    pause_oom_score_adj: int = -998
    grpc_workers: int = 32
    # GetContainerEvents: streams served at once (each holds one of the grpc_workers for
    # its life, so keep it well below them), and events queued for each before a
    # stream that does not keep up is dropped.
    event_subscribers: int = 8
    event_queue: int = 1000
    # Built-in pod network.
    bridge_name: str = DEFAULT_BRIDGE
    pod_subnet: str = DEFAULT_POD_SUBNET
    pod_subnet6: str = ""  # optional IPv6 range; empty: IPv4 only
    nft_table: str = DEFAULT_NFT_TABLE
    # Outbound traffic from pods needs forwarding on; tests that stay inside the node turn this off.
    ip_forward: bool = True
    masquerade: bool = True
    # CNI mode, chosen when this dir holds a network configuration.
    cni_conf_dir: Path = DEFAULT_CNI_CONF_DIR
    cni_bin_dirs: tuple[Path, ...] = DEFAULT_CNI_BIN_DIRS
    # Registries reached over plain HTTP (loopback ones always are).
    insecure_registries: tuple[str, ...] = ()
    # containerd-style <dir>/<registry host>/hosts.toml: mirrors, TLS, credentials.
    registry_config_dir: Path = DEFAULT_REGISTRY_CONFIG_DIR
    # Named steps at which calls fail on purpose (failure-injection tests): STEP raises,
    # crash:STEP kills the daemon, undo:STEP makes that undo step of a rollback fail.
    fail_at: tuple[str, ...] = ()
    log_level: str = "info"
    # Streaming server (Exec, Attach, PortForward URLs): address, port (0: ephemeral),
    # and optional TLS.
    stream_address: str = "127.0.0.1"
    stream_port: int = 0
    stream_tls_cert: Path | None = None
    stream_tls_key: Path | None = None
    # Prometheus metrics (HOST:PORT); empty: off.
    metrics_address: str = ""

    @property
    def sandboxes_dir(self) -> Path:
        """Persistent sandbox records (one JSON file per sandbox)."""
        return self.root / "sandboxes"

    @property
    def run_sandboxes_dir(self) -> Path:
        """Per-sandbox runtime dirs: namespace pins; their presence marks a Run in flight."""
        return self.run_root / "sandboxes"

    @property
    def ipam_dir(self) -> Path:
        """Pod address allocations: runtime state, gone with a reboot like the pods."""
        return self.run_root / "ipam"

    @property
    def image_dir(self) -> Path:
        return self.root / "images"

    @property
    def containers_dir(self) -> Path:
        """Persistent container records (one JSON file per container)."""
        return self.root / "containers"

    @property
    def run_containers_dir(self) -> Path:
        """Per-container bundles (config.json, conmon's files); their presence marks a Create in flight."""
        return self.run_root / "containers"

    @property
    def handler_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.runtime_handlers)
