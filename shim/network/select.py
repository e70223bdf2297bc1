"""Which pod network serves a pod: CNI when the CNI config dir holds a network
configuration, the built-in bridge otherwise. Checked again on every Run and
Status (a CNI daemonset usually writes its config after the runtime started), and
each pod is torn down by the backend that set it up, whatever is current then."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from dataclasses import replace
from typing import Any

from shim import metrics
from shim.config import DEFAULT_POD_SUBNET, Config
from shim.errors import FailedPrecondition
from shim.network import PodNetwork, PortMapping, cni
from shim.network.bridge import BridgeConfig, BridgeNetwork
from shim.network.podcidr import PodCidr, ipv4_subnet
from shim.store import Metadata

log = logging.getLogger(__name__)


class NetworkSelector:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._bridge: BridgeNetwork | None = None
        self._cni: cni.CniNetwork | None = None
        self._stamp: tuple[tuple[str, int, int], ...] = ()
        self._pod_cidr = PodCidr.load(config.root)
        self._pending: ipaddress.IPv4Network | None = None  # kubelet's range, not taken yet
        # Guards making and switching the bridge against its users in flight (set-ups,
        # teardowns, checks): a switch closes the old network's sockets.
        self._lock = threading.RLock()
        self._users = 0
        self._current()  # the node set-up of the built-in network happens at start

    def _current(self) -> BridgeNetwork | cni.CniNetwork:
        files = cni.config_files(self.config.cni_conf_dir)
        if not files:
            return self.bridge()
        stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
        if self._cni is None or stamp != self._stamp:
            self._cni = cni.CniNetwork(self.config.cni_conf_dir, self.config.cni_bin_dirs)
            self._stamp = stamp
        return self._cni

    def subnet(self) -> ipaddress.IPv4Network:
        """The built-in network's range: the operator's, else kubelet's, else the default."""
        return ipaddress.IPv4Network(self.config.pod_subnet or self._pod_cidr.subnet or DEFAULT_POD_SUBNET)

    def bridge(self) -> BridgeNetwork:
        with self._lock:
            return self._bridge_locked()

    def _bridge_locked(self) -> BridgeNetwork:
        if self._bridge is None:
            c = self.config
            self._bridge = BridgeNetwork(
                BridgeConfig(
                    name=c.bridge_name,
                    subnet=self.subnet(),
                    nft_table=c.nft_table,
                    ip_forward=c.ip_forward,
                    masquerade=c.masquerade,
                    subnet6=ipaddress.IPv6Network(c.pod_subnet6) if c.pod_subnet6 else None,
                ),
                c.ipam_dir,
            )
        return self._bridge

    def _for(self, pod: PodNetwork) -> BridgeNetwork | cni.CniNetwork:
        if pod.backend == "bridge":
            return self.bridge()
        current = self._current()
        if not isinstance(current, cni.CniNetwork):
            raise FailedPrecondition("this pod's network was made by CNI, and no CNI configuration is left")
        return current

    # ---- NetworkBackend ----------------------------------------------------------------

    def status(self) -> tuple[bool, str, str]:
        return self._current().status()

    def describe(self) -> dict[str, Any]:
        described = self._current().describe()
        described["podCIDR"] = {
            "fromKubelet": self._pod_cidr.sent or None,
            "subnetFrom": "--pod-subnet"
            if self.config.pod_subnet
            else "kubelet"
            if self._pod_cidr.subnet
            else "default",
            "pending": str(self._pending) if self._pending else None,
        }
        return described

    # ---- UpdateRuntimeConfig ------------------------------------------------------------

    def update_pod_cidr(self, pod_cidr: str) -> None:
        """Kubelet's pod CIDR: recorded; its IPv4 range becomes the built-in network's
        subnet for new pods unless the operator set one (at once if no pod holds an
        address on the bridge, else when none does)."""
        wanted = ipv4_subnet(pod_cidr)
        with self._lock:
            self._pod_cidr = replace(self._pod_cidr, sent=pod_cidr)
            self._pod_cidr.save(self.config.root)
            if self.config.pod_subnet or wanted is None:
                self._pending = None
                if wanted is not None:
                    log.info(
                        "event=pod_cidr_kept pod_cidr=%s subnet=%s reason=operator_set",
                        pod_cidr,
                        self.subnet(),
                    )
                return
            self._pending = None if wanted == self.subnet() else wanted
            self._take_pending()

    def _take_pending(self) -> None:
        """Under _lock: switch to the pending subnet if the bridge is free to."""
        if self._pending is None:
            return
        bridge = self._bridge
        if bridge is not None and (self._users or bridge.ipam.allocated()):
            log.info("event=pod_cidr_pending subnet=%s reason=pods_on_the_bridge", self._pending)
            return
        old = self.subnet()
        self._pod_cidr = replace(self._pod_cidr, subnet=str(self._pending))
        self._pod_cidr.save(self.config.root)
        self._pending = None
        if bridge is not None:
            self._bridge = None
            bridge.retire()
            self._bridge_locked()
        log.info("event=pod_subnet_changed from=%s to=%s", old, self.subnet())

    def kind(self) -> str:
        return self._current().KIND

    def setup(
        self,
        sandbox_id: str,
        netns_path: str,
        pod_netlink: socket.socket,
        ports: tuple[PortMapping, ...],
        metadata: Metadata,
    ) -> PodNetwork:
        with self._lock:
            self._take_pending()
            backend = self._current()
            self._users += 1
        try:
            with metrics.network("setup", backend.KIND):
                pod = backend.setup(sandbox_id, netns_path, pod_netlink, ports, metadata)
        finally:
            self._done_using()
        return replace(pod, backend=backend.KIND)

    def _using(self, pod: PodNetwork | None) -> BridgeNetwork | cni.CniNetwork:
        with self._lock:
            backend = self._current() if pod is None else self._for(pod)
            self._users += 1
            return backend

    def _done_using(self) -> None:
        with self._lock:
            self._users -= 1

    def teardown(
        self, sandbox_id: str, pod: PodNetwork | None, netns_path: str, metadata: Metadata | None
    ) -> None:
        backend = self._using(pod)
        try:
            with metrics.network("teardown", backend.KIND):
                backend.teardown(sandbox_id, pod, netns_path, metadata)
        finally:
            self._done_using()

    def check(self, sandbox_id: str, pod: PodNetwork, netns_path: str, metadata: Metadata) -> None:
        backend = self._using(pod)
        try:
            backend.check(sandbox_id, pod, netns_path, metadata)
        finally:
            self._done_using()

    def reconcile(self, live: dict[str, PodNetwork]) -> None:
        bridge_pods = {i: p for i, p in live.items() if p.backend == "bridge"}
        if bridge_pods or self._bridge is not None:
            self.bridge().reconcile(bridge_pods)

    def sync_ports(self, live: list[PodNetwork]) -> None:
        bridge_pods = [p for p in live if p.backend == "bridge"]
        if bridge_pods or self._bridge is not None:
            self.bridge().sync_ports(bridge_pods)

    def close(self) -> None:
        if self._bridge is not None:
            self._bridge.close()
