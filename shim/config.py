"""The daemon's configuration: one frozen Config.

Each field is declared once, here, with its default and its help (`about`); the
flags of `pyshim serve` and the keys of the config file are both derived from these
declarations (shim/configfile.py), so neither can lose track of the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
# Read when present and no --config names another (containerd's and CRI-O's habit).
DEFAULT_CONFIG_FILE = Path("/etc/pyshim/config.toml")


@dataclass(frozen=True, slots=True)
class Setting:
    """How a Config field is offered to operators; the name, type and default are the field's own."""

    help: str
    # The file's key; "" is the field's name. The flag is the key with dashes (--run-root).
    key: str = ""
    # The flag when it is not the key's: a repeatable flag takes one item (--cni-bin-dir).
    flag: str = ""
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    # Inclusive bounds of a number.
    low: float | None = None
    high: float | None = None
    # What the help and the docs say for a default of None or an empty list.
    unset: str = ""
    # A str with rules of its own: "cgroup" (an absolute cgroupfs path).
    kind: str = ""


def about(help: str, **how: Any) -> dict[str, Setting]:
    """The metadata of a Config field that is also a flag and a config file key (see Setting)."""
    return {"setting": Setting(help, **how)}


@dataclass(frozen=True, slots=True)
class Config:
    socket: Path = field(
        default=DEFAULT_SOCKET, metadata=about("unix socket to serve CRI on (created 0660)", metavar="PATH")
    )
    root: Path = field(
        default=DEFAULT_ROOT, metadata=about("persistent state: sandbox records, images", metavar="DIR")
    )
    run_root: Path = field(
        default=DEFAULT_RUN_ROOT,
        metadata=about("runtime state: namespace pins; gone after a reboot", metavar="DIR"),
    )
    # Pinned network namespaces go here so that `ip netns` and CNI tools see them.
    netns_dir: Path = field(
        default=DEFAULT_NETNS_DIR,
        metadata=about("where pod network namespaces are pinned (the dir `ip netns` reads)", metavar="DIR"),
    )
    pause_path: Path | None = field(
        default=None,
        metadata=about(
            "pause executable", key="pause", metavar="PATH", unset="the one built into the package"
        ),
    )
    runtime_handlers: tuple[tuple[str, str], ...] = field(
        default=DEFAULT_RUNTIME_HANDLERS,
        metadata=about(
            "a runtime handler (RuntimeClass handler name) and its OCI runtime (runc, crun or a path; "
            "default: NAME), repeatable; the first is what an empty handler selects",
            flag="--runtime-handler",
            metavar="NAME[=PROGRAM]",
        ),
    )
    conmon: str = field(default="conmon", metadata=about("the container monitor", metavar="PROGRAM"))
    # Pods that name no cgroup_parent get <cgroup_root>/<sandbox id>.
    cgroup_root: str = field(
        default=DEFAULT_CGROUP_ROOT,
        metadata=about(
            "cgroup under which pods that name no cgroup_parent get one (PATH/<sandbox id>)",
            metavar="PATH",
            kind="cgroup",
        ),
    )
    # Seconds conmon may take to report that the runtime created a container.
    create_timeout: float = field(
        default=60.0,
        metadata=about("seconds conmon may take to report a container created", metavar="S", low=0),
    )
    # Seconds a pause gets between SIGTERM and SIGKILL on StopPodSandbox.
    pause_stop_timeout: float = field(
        default=2.0, metadata=about("seconds between SIGTERM and SIGKILL of a pause", metavar="S", low=0)
    )
    # Seconds RunPodSandbox waits for a pause to report readiness.
    pause_start_timeout: float = field(
        default=10.0, metadata=about("seconds to wait for a pause to be ready", metavar="S", low=0)
    )
    # As kubelet's infrastructure containers: nearly the last the OOM killer picks.
    pause_oom_score_adj: int = field(
        default=-998, metadata=about("oom_score_adj of every pause", metavar="N", low=-1000, high=1000)
    )
    grpc_workers: int = field(default=32, metadata=about("threads serving requests", metavar="N", low=1))
    # GetContainerEvents: each stream holds one of the grpc_workers for its life, so
    # keep the subscribers well below them.
    event_subscribers: int = field(
        default=8,
        metadata=about("GetContainerEvents streams served at once", metavar="N", low=1, high=1000),
    )
    event_queue: int = field(
        default=1000,
        metadata=about(
            "events queued for a GetContainerEvents stream before one that does not keep up is dropped",
            metavar="N",
            low=1,
            high=1_000_000,
        ),
    )
    # Built-in pod network.
    bridge_name: str = field(
        default=DEFAULT_BRIDGE, metadata=about("host bridge of the built-in pod network", metavar="NAME")
    )
    pod_subnet: str = field(
        default="",
        metadata=about(
            "IPv4 subnet pods get addresses from",
            metavar="CIDR",
            unset=f"the pod CIDR kubelet sends (UpdateRuntimeConfig), else {DEFAULT_POD_SUBNET}",
        ),
    )
    pod_subnet6: str = field(
        default="",
        metadata=about(
            "optional IPv6 subnet: pods also get an address from it (additional_ips)",
            metavar="CIDR",
            unset="IPv4 only",
        ),
    )
    nft_table: str = field(
        default=DEFAULT_NFT_TABLE, metadata=about("pyshim's own nftables table (ip family)", metavar="NAME")
    )
    # Outbound traffic from pods needs forwarding on; tests that stay inside the node turn this off.
    ip_forward: bool = field(
        default=True, metadata=about("turn net.ipv4.ip_forward on (--no-ip-forward: leave it as it is)")
    )
    masquerade: bool = field(
        default=True, metadata=about("SNAT for traffic leaving the pod subnet (--no-masquerade: none)")
    )
    # CNI mode, chosen when this dir holds a network configuration.
    cni_conf_dir: Path = field(
        default=DEFAULT_CNI_CONF_DIR,
        metadata=about(
            "CNI network configurations; if one is there, CNI replaces the built-in network", metavar="DIR"
        ),
    )
    cni_bin_dirs: tuple[Path, ...] = field(
        default=DEFAULT_CNI_BIN_DIRS,
        metadata=about("where CNI plugins are looked for, repeatable", flag="--cni-bin-dir", metavar="DIR"),
    )
    # Registries reached over plain HTTP (loopback ones always are).
    insecure_registries: tuple[str, ...] = field(
        default=(),
        metadata=about(
            "a registry to reach over plain HTTP, repeatable (loopback registries always are)",
            flag="--insecure-registry",
            metavar="HOST[:PORT]",
            unset="loopback only",
        ),
    )
    # containerd-style <dir>/<registry host>/hosts.toml: mirrors, TLS, credentials.
    registry_config_dir: Path = field(
        default=DEFAULT_REGISTRY_CONFIG_DIR,
        metadata=about(
            "per-registry mirrors, TLS and credentials: DIR/<host>/hosts.toml, as containerd's certs.d",
            metavar="DIR",
        ),
    )
    # Named steps at which calls fail on purpose (failure-injection tests): STEP raises,
    # crash:STEP kills the daemon, undo:STEP makes that undo step of a rollback fail.
    fail_at: tuple[str, ...] = field(
        default=(),
        metadata=about(
            "for tests, repeatable: make every call fail at STEP (RunPodSandbox: mkdir, cgroup, spawn, "
            "pin, shm, network, save, commit; CreateContainer: container-mkdir, -rootfs, -spec, -create, "
            "-save; StartContainer: container-start), with crash:STEP kill the daemon there, with undo:NAME "
            "make that undo step fail",
            metavar="STEP",
            unset="none",
        ),
    )
    log_level: str = field(
        default="info",
        metadata=about(
            "how much the log says", metavar="LEVEL", choices=("debug", "info", "warning", "error")
        ),
    )
    # Streaming server (Exec, Attach, PortForward URLs): address, port (0: ephemeral),
    # and optional TLS.
    stream_address: str = field(
        default="127.0.0.1",
        metadata=about(
            "address of the streaming server that Exec, Attach and PortForward URLs point to",
            metavar="ADDRESS",
        ),
    )
    stream_port: int = field(
        default=0, metadata=about("its port; 0: an ephemeral one", metavar="PORT", low=0, high=65535)
    )
    stream_tls_cert: Path | None = field(
        default=None,
        metadata=about("serve streams over TLS: certificate", metavar="FILE", unset="plain HTTP"),
    )
    stream_tls_key: Path | None = field(
        default=None,
        metadata=about("serve streams over TLS: private key", metavar="FILE", unset="plain HTTP"),
    )
    # Prometheus metrics (HOST:PORT); empty: off.
    metrics_address: str = field(
        default="",
        metadata=about(
            "serve Prometheus metrics on http://HOST:PORT/metrics", metavar="HOST:PORT", unset="no metrics"
        ),
    )

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
