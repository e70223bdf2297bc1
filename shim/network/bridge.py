"""The built-in pod network: a Linux bridge on the host, one veth pair per pod
(the pod end is `eth0` in the pod's namespace), an address from the IPAM and a
default route via the bridge, plus masquerading of the pod subnet in pyshim's own
nftables table. No configuration needed.

Teardown is the kernel's: when the pod's network namespace goes (pause gone and
pin removed), its veth pair goes with it, without the ~24 ms an explicit delete
costs. The start-up sweep deletes veths whose sandbox no longer exists.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from shim.errors import FailedPrecondition, Internal, NetlinkRefused, ResourceExhausted
from shim.network import PodNetwork, PortMapping, netlink
from shim.network.ipam import Ipam
from shim.store import Metadata

log = logging.getLogger(__name__)

VETH_PREFIX = "psh"  # + 12 hex of the sandbox id: 15 characters, the kernel's limit
POD_IFINDEX = 2  # eth0's index in the pod's namespace (lo is 1), chosen at creation
# A Linux bridge numbers its ports 1-1023 (BR_MAX_PORTS is 1024, port 0 is reserved).
MAX_BRIDGE_PORTS = 1023


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    name: str
    subnet: ipaddress.IPv4Network
    nft_table: str
    ip_forward: bool
    masquerade: bool
    # Optional second range: each pod also gets an address from it (additional_ips).
    subnet6: ipaddress.IPv6Network | None = None


def veth_name(sandbox_id: str) -> str:
    return f"{VETH_PREFIX}{sandbox_id[:12]}"


class BridgeNetwork:
    KIND = "bridge"

    def __init__(self, config: BridgeConfig, state_dir: Path) -> None:
        self.config = config
        self.gateway: ipaddress.IPv4Address = next(config.subnet.hosts())
        self.ipam = Ipam(state_dir, config.subnet, self.gateway)
        self.gateway6: ipaddress.IPv6Address | None = None
        self.ipam6: Ipam | None = None
        if config.subnet6 is not None:
            self.gateway6 = next(config.subnet6.hosts())
            self.ipam6 = Ipam(state_dir.with_name(state_dir.name + "6"), config.subnet6, self.gateway6)
        self._ipr = IPRoute()  # node set-up and sweeps: rare, so the comfortable API
        self._ipr_lock = threading.Lock()
        self._host = netlink.open_socket()  # the per-pod hot path: raw requests
        self._host_lock = threading.Lock()  # one request in flight: replies need no matching
        self.bridge_index = self._ensure_bridge()
        self._ensure_nftables()

    # ---- node set-up (at start, idempotent) ----------------------------------------

    def _ensure_bridge(self) -> int:
        name = self.config.name
        found = self._ipr.link_lookup(ifname=name)
        if not found:
            self._ipr.link("add", ifname=name, kind="bridge")
            found = self._ipr.link_lookup(ifname=name)
            log.info("event=bridge_created bridge=%s", name)
        index = int(found[0])
        kind = self._ipr.get_links(index)[0].get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        if kind != "bridge":
            raise FailedPrecondition(
                f"--bridge-name {name}: that interface exists and is not a bridge ({kind})"
            )
        gateway = f"{self.gateway}"
        have = {a.get_attr("IFA_ADDRESS") for a in self._ipr.get_addr(index=index, family=socket.AF_INET)}
        if gateway not in have:
            self._ipr.addr("add", index=index, address=gateway, prefixlen=self.config.subnet.prefixlen)
        if self.gateway6 is not None and self.config.subnet6 is not None:
            have6 = {
                a.get_attr("IFA_ADDRESS") for a in self._ipr.get_addr(index=index, family=socket.AF_INET6)
            }
            if str(self.gateway6) not in have6:
                self._ipr.addr(
                    "add",
                    index=index,
                    address=str(self.gateway6),
                    prefixlen=self.config.subnet6.prefixlen,
                    flags=0x02,  # IFA_F_NODAD: usable at once
                )
        self._ipr.link("set", index=index, state="up")
        # Host-port DNAT from 127.0.0.1 to a pod leaves through the bridge: allow that there only.
        Path(f"/proc/sys/net/ipv4/conf/{name}/route_localnet").write_text("1")
        if self.config.ip_forward:
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        return index

    def _ensure_nftables(self) -> None:
        """pyshim's own table: masquerade for the pod subnet, host-port DNAT through maps.

        Made with `add` (a no-op where a piece exists) and chains flushed and refilled,
        all in one transaction: no window without rules, no duplicate rules, and the
        maps of host ports survive a daemon restart.
        """
        table, subnet, bridge = self.config.nft_table, self.config.subnet, self.config.name
        lines = [f"add table ip {table}"]
        target = "ipv4_addr . inet_service"  # a pod address and port
        for proto in _PROTOCOLS:
            lines.append(f"add map ip {table} {_map(proto, False)} {{ type inet_service : {target}; }}")
            lines.append(
                f"add map ip {table} {_map(proto, True)} {{ type ipv4_addr . inet_service : {target}; }}"
            )
        chains = {
            # route_localnet (below) must not let pods reach the node's 127.0.0.1 services.
            "guard": (
                "type filter hook prerouting priority raw; policy accept;",
                [f'iifname "{bridge}" ip daddr 127.0.0.0/8 drop'],
            ),
            "hostports": (
                "",
                [
                    rule
                    for proto in _PROTOCOLS
                    for rule in (
                        f"dnat ip to ip daddr . {proto} dport map @{_map(proto, True)}",
                        f"dnat ip to {proto} dport map @{_map(proto, False)}",
                    )
                ],
            ),
            "prerouting": (
                "type nat hook prerouting priority dstnat; policy accept;",
                ["fib daddr type local jump hostports"],
            ),
            "output": (
                "type nat hook output priority -100; policy accept;",
                ["fib daddr type local jump hostports"],
            ),
            "postrouting": (
                "type nat hook postrouting priority srcnat; policy accept;",
                [
                    *(
                        [f"ip saddr {subnet} ip daddr != {subnet} masquerade"]
                        if self.config.masquerade
                        else []
                    ),
                    # Host-port traffic from 127.0.0.1 to a pod must not arrive with a loopback source.
                    f'ip saddr 127.0.0.0/8 oifname "{bridge}" masquerade',
                    # A pod reaching a host port that leads back into the pod subnet (hairpin).
                    f"ct status dnat ip saddr {subnet} ip daddr {subnet} masquerade",
                ],
            ),
            "forward": (
                "type filter hook forward priority filter; policy accept;",
                [
                    f'iifname "{bridge}" accept',
                    f'oifname "{bridge}" ct state established,related accept',
                ],
            ),
        }
        for name, (hook, rules) in chains.items():
            lines.append(
                f"add chain ip {table} {name} {{ {hook} }}" if hook else f"add chain ip {table} {name}"
            )
            lines.append(f"flush chain ip {table} {name}")
            lines += [f"add rule ip {table} {name} {rule}" for rule in rules]
        nft("\n".join(lines) + "\n")

    def _port_elements(self, network: PodNetwork) -> list[tuple[str, str]]:
        """(map, element) pairs for a pod's host ports; values come validated."""
        return [
            (
                _map(m.protocol, bool(m.host_ip)),
                f"{m.host_ip} . {m.host_port}" if m.host_ip else str(m.host_port),
            )
            for m in network.port_mappings
        ]

    def _add_ports(self, network: PodNetwork) -> None:
        if not network.port_mappings:
            return
        table = self.config.nft_table
        lines = [
            f"add element ip {table} {name} {{ {key} : {network.ip} . {m.container_port} }}"
            for (name, key), m in zip(self._port_elements(network), network.port_mappings, strict=True)
        ]
        try:
            nft("\n".join(lines) + "\n")
        except Internal as exc:
            if "File exists" in str(exc):
                taken = ", ".join(f"{m.host_port}/{m.protocol}" for m in network.port_mappings)
                raise FailedPrecondition(f"a host port of {taken} is already mapped to another pod") from None
            raise

    def _remove_ports(self, network: PodNetwork) -> None:
        """Idempotent: an element already gone is fine."""
        table = self.config.nft_table
        for name, key in self._port_elements(network):
            try:
                nft(f"delete element ip {table} {name} {{ {key} }}\n")
            except Internal as exc:
                if "No such file or directory" not in str(exc):
                    raise

    def sync_ports(self, live: list[PodNetwork]) -> None:
        """At start: the maps hold exactly the host ports of live pods (one transaction)."""
        table = self.config.nft_table
        lines = [f"flush map ip {table} {_map(p, ip)}" for p in _PROTOCOLS for ip in (False, True)]
        for network in live:
            for (name, key), m in zip(self._port_elements(network), network.port_mappings, strict=True):
                lines.append(f"add element ip {table} {name} {{ {key} : {network.ip} . {m.container_port} }}")
        nft("\n".join(lines) + "\n")

    # ---- per pod ------------------------------------------------------------------------

    def status(self) -> tuple[bool, str, str]:
        return True, "", ""

    def kind(self) -> str:
        return self.KIND

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "bridge",
            "bridge": self.config.name,
            "podSubnet": str(self.config.subnet),
            "podSubnet6": str(self.config.subnet6) if self.config.subnet6 else None,
            "gateway": str(self.gateway),
            "nftTable": self.config.nft_table,
            "addressesInUse": len(self.ipam.allocated()),
            "bridgePorts": self.ports(),
            # What kubelet's scheduler cannot see: how many more pods this network takes.
            "podsAvailable": self.pods_available(),
        }

    def ports(self) -> int:
        """Ports on the bridge now (pods' veths and anything else attached)."""
        with self._ipr_lock:
            return len(self._ipr.get_links(master=self.bridge_index))

    def pods_available(self) -> int:
        free = self.ipam.free()
        if self.ipam6 is not None:
            free = min(free, self.ipam6.free())
        return max(0, min(free, MAX_BRIDGE_PORTS - self.ports()))

    def _full(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"bridge {self.config.name} is full: a Linux bridge takes at most {MAX_BRIDGE_PORTS} ports. "
            "Remove pods, or use a CNI network for more pods on this node"
        )

    def setup(
        self,
        sandbox_id: str,
        netns_path: str,
        pod_netlink: socket.socket,
        ports: tuple[PortMapping, ...],
        metadata: Metadata,
    ) -> PodNetwork:
        """Address, veth, route. Raises after undoing its own part (the IP is kept
        allocated until teardown, which the caller always runs on failure)."""
        address = self.ipam.allocate(sandbox_id)
        host_if = veth_name(sandbox_id)
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with self._host_lock:
                netlink.add_veth(self._host, host_if, self.bridge_index, "eth0", POD_IFINDEX, fd)
        except NetlinkRefused as exc:
            # Checked here, not before: counting ports costs more than the rare refusal.
            if exc.errno == errno.EXFULL:
                raise self._full() from None
            raise
        finally:
            os.close(fd)
        interface = ipaddress.IPv4Interface(f"{address}/{self.config.subnet.prefixlen}")
        addresses: list[
            tuple[
                ipaddress.IPv4Interface | ipaddress.IPv6Interface,
                ipaddress.IPv4Address | ipaddress.IPv6Address,
            ]
        ] = [(interface, self.gateway)]
        extra: tuple[str, ...] = ()
        if self.ipam6 is not None and self.gateway6 is not None and self.config.subnet6 is not None:
            address6 = self.ipam6.allocate(sandbox_id)
            addresses.append(
                (ipaddress.IPv6Interface(f"{address6}/{self.config.subnet6.prefixlen}"), self.gateway6)
            )
            extra = (str(address6),)
        # Asked for index 2, but the kernel may give another (e.g. tunl0 can hold 2 in
        # every new namespace): ask the pod's namespace which one eth0 got.
        index = netlink.link_index(pod_netlink, "eth0")
        netlink.configure_interface(pod_netlink, index, addresses)
        network = PodNetwork(
            ip=str(address), additional_ips=extra, host_interface=host_if, port_mappings=ports
        )
        self._add_ports(network)
        return network

    def teardown(
        self, sandbox_id: str, pod: PodNetwork | None, netns_path: str, metadata: Metadata | None
    ) -> None:
        """Remove the pod's host ports, give its address back. Its veth goes with the
        pod's network namespace. Idempotent."""
        if pod is not None:
            self._remove_ports(pod)
        self.ipam.release(sandbox_id)
        if self.ipam6 is not None:
            self.ipam6.release(sandbox_id)

    def check(self, sandbox_id: str, pod: PodNetwork, netns_path: str, metadata: Metadata) -> None:
        """The address is recorded in the IPAM; the rest is the kernel's (nothing to ask)."""

    def reconcile(self, live: dict[str, PodNetwork]) -> None:
        """At start: the records' addresses are claimed (whatever the IPAM files say),
        other addresses freed, veths of sandboxes that no longer exist deleted."""
        # A pod whose set-up failed midway and could not be undone has no address recorded.
        self.ipam.reconcile({sandbox_id: pod.ip for sandbox_id, pod in live.items() if pod.ip})
        if self.ipam6 is not None:
            self.ipam6.reconcile({i: pod.additional_ips[0] for i, pod in live.items() if pod.additional_ips})
        live_names = {veth_name(i) for i in live}
        with self._ipr_lock:
            for link in self._ipr.get_links():
                name = link.get_attr("IFLA_IFNAME") or ""
                master = link.get_attr("IFLA_MASTER")
                if name.startswith(VETH_PREFIX) and master == self.bridge_index and name not in live_names:
                    with contextlib.suppress(NetlinkError):
                        self._ipr.link("del", index=link["index"])
                    log.warning("event=veth_swept interface=%s", name)

    def retire(self) -> None:
        """This network's subnet is given up (no pod holds an address in it): its gateway
        address leaves the bridge; the bridge and the table stay for the next subnet."""
        with self._ipr_lock, contextlib.suppress(NetlinkError):
            self._ipr.addr(
                "del",
                index=self.bridge_index,
                address=str(self.gateway),
                prefixlen=self.config.subnet.prefixlen,
            )
        self.close()

    def close(self) -> None:
        self._ipr.close()
        self._host.close()


_PROTOCOLS = ("tcp", "udp", "sctp")


def _map(protocol: str, with_ip: bool) -> str:
    return f"hostports_ip_{protocol}" if with_ip else f"hostports_{protocol}"


def nft(ruleset: str) -> None:
    done = subprocess.run(["nft", "-f", "-"], input=ruleset, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise Internal(f"nft: {done.stderr.strip()}")
