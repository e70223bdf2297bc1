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
import ipaddress
import logging
import os
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from shim.errors import Internal
from shim.network import PodNetwork, PortMapping, netlink
from shim.network.ipam import Ipam

log = logging.getLogger(__name__)

VETH_PREFIX = "psh"  # + 12 hex of the sandbox id: 15 characters, the kernel's limit


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    name: str
    subnet: ipaddress.IPv4Network
    nft_table: str
    ip_forward: bool
    masquerade: bool


def veth_name(sandbox_id: str) -> str:
    return f"{VETH_PREFIX}{sandbox_id[:12]}"


class BridgeNetwork:
    def __init__(self, config: BridgeConfig, state_dir: Path) -> None:
        self.config = config
        self.gateway = next(config.subnet.hosts())
        self.ipam = Ipam(state_dir, config.subnet, self.gateway)
        self._ipr = IPRoute()
        self._ipr_lock = threading.Lock()  # one host netlink socket, one request at a time
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
        gateway = f"{self.gateway}"
        have = {a.get_attr("IFA_ADDRESS") for a in self._ipr.get_addr(index=index, family=socket.AF_INET)}
        if gateway not in have:
            self._ipr.addr("add", index=index, address=gateway, prefixlen=self.config.subnet.prefixlen)
        self._ipr.link("set", index=index, state="up")
        # Host-port DNAT from 127.0.0.1 to a pod leaves through the bridge: allow that there only.
        Path(f"/proc/sys/net/ipv4/conf/{name}/route_localnet").write_text("1")
        if self.config.ip_forward:
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        return index

    def _ensure_nftables(self) -> None:
        table, subnet, bridge = self.config.nft_table, self.config.subnet, self.config.name
        masquerade = f"ip saddr {subnet} ip daddr != {subnet} masquerade\n" if self.config.masquerade else ""
        # Deleted and re-made in one transaction: no window without rules, no duplicates.
        ruleset = f"""
table ip {table}
delete table ip {table}
table ip {table} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        {masquerade}
        ip saddr 127.0.0.0/8 oifname "{bridge}" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{bridge}" accept
        oifname "{bridge}" ct state established,related accept
    }}
}}
"""
        nft(ruleset)

    # ---- per pod ------------------------------------------------------------------------

    def setup(
        self, sandbox_id: str, netns_path: str, pod_netlink: socket.socket, ports: tuple[PortMapping, ...]
    ) -> PodNetwork:
        """Address, veth, route. Raises after undoing its own part (the IP is kept
        allocated until teardown, which the caller always runs on failure)."""
        address = self.ipam.allocate(sandbox_id)
        host_if = veth_name(sandbox_id)
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with self._ipr_lock:
                self._ipr.link(
                    "add",
                    ifname=host_if,
                    kind="veth",
                    master=self.bridge_index,
                    state="up",
                    peer={"ifname": "eth0", "net_ns_fd": fd},
                )
        except NetlinkError as exc:
            raise Internal(f"creating veth {host_if} for sandbox {sandbox_id}: {exc}") from exc
        finally:
            os.close(fd)
        index = netlink.link_index(pod_netlink, "eth0")
        netlink.add_address(
            pod_netlink, index, ipaddress.IPv4Interface(f"{address}/{self.config.subnet.prefixlen}")
        )
        netlink.link_up(pod_netlink, index)
        netlink.add_default_route(pod_netlink, index, self.gateway)
        return PodNetwork(ip=str(address), host_interface=host_if)

    def teardown(self, sandbox_id: str) -> None:
        """Give the address back. The veth goes with the pod's network namespace."""
        self.ipam.release(sandbox_id)

    def reconcile(self, live: set[str]) -> None:
        """At start: free addresses and delete veths of sandboxes that no longer exist."""
        self.ipam.reconcile(live)
        live_names = {veth_name(i) for i in live}
        with self._ipr_lock:
            for link in self._ipr.get_links():
                name = link.get_attr("IFLA_IFNAME") or ""
                master = link.get_attr("IFLA_MASTER")
                if name.startswith(VETH_PREFIX) and master == self.bridge_index and name not in live_names:
                    with contextlib.suppress(NetlinkError):
                        self._ipr.link("del", index=link["index"])
                    log.warning("event=veth_swept interface=%s", name)

    def close(self) -> None:
        self._ipr.close()

    def remove_node_setup(self) -> None:
        """Delete the bridge and the nftables table (for tests and uninstall)."""
        with contextlib.suppress(Internal):
            nft(f"table ip {self.config.nft_table}\ndelete table ip {self.config.nft_table}\n")
        with self._ipr_lock, contextlib.suppress(NetlinkError):
            self._ipr.link("del", index=self.bridge_index)


def nft(ruleset: str) -> None:
    done = subprocess.run(["nft", "-f", "-"], input=ruleset, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise Internal(f"nft: {done.stderr.strip()}")
