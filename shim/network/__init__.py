"""Pod networking: what a sandbox asks for and what it got.

Backends: the built-in bridge (shim.network.bridge), and none for host-network
pods (they report the node's address).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol

from shim.store import Metadata


@dataclass(frozen=True, slots=True)
class PortMapping:
    protocol: str  # "tcp", "udp" or "sctp"
    container_port: int
    host_port: int
    host_ip: str = ""


@dataclass(frozen=True, slots=True)
class PodNetwork:
    """What RunPodSandbox set up; recorded, reported in PodSandboxStatus, undone on Stop."""

    ip: str
    additional_ips: tuple[str, ...] = ()
    host_interface: str = ""
    port_mappings: tuple[PortMapping, ...] = field(default_factory=tuple)
    # CNI mode: the final ADD result (JSON), handed back to the plugins on DEL.
    cni_result: str = ""
    # Which backend made it ("bridge" or "cni"): the one that must undo it.
    backend: str = "bridge"


class NetworkBackend(Protocol):
    """What the sandbox lifecycle needs from a pod network (built-in bridge or CNI)."""

    def status(self) -> tuple[bool, str, str]:
        """(ready, reason, message) for the NetworkReady condition."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def kind(self) -> str:
        """The backend a Run now would use ("bridge" or "cni"): recorded with each pod."""
        ...

    def setup(
        self,
        sandbox_id: str,
        netns_path: str,
        pod_netlink: socket.socket,
        ports: tuple[PortMapping, ...],
        metadata: Metadata,
    ) -> PodNetwork: ...

    def teardown(
        self, sandbox_id: str, pod: PodNetwork | None, netns_path: str, metadata: Metadata | None
    ) -> None:
        """Idempotent; also after a failed or half-made setup (pod None)."""
        ...

    def check(self, sandbox_id: str, pod: PodNetwork, netns_path: str, metadata: Metadata) -> None:
        """Raise if the pod's network is not as set up (CNI CHECK); used after a restart."""
        ...

    def reconcile(self, live: dict[str, PodNetwork]) -> None:
        """At start, with the network each live sandbox's record holds."""
        ...

    def sync_ports(self, live: list[PodNetwork]) -> None: ...

    def close(self) -> None: ...


@cache
def node_address() -> str:
    """The node's primary IPv4 address: the source of its default route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            # A UDP connect sends nothing; it only asks the kernel for a route and source.
            probe.connect(("192.0.2.1", 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"
