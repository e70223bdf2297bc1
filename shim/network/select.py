"""Which pod network serves a pod: CNI when the CNI config dir holds a network
configuration, the built-in bridge otherwise. Checked again on every Run and
Status (a CNI daemonset usually writes its config after the runtime started), and
each pod is torn down by the backend that set it up, whatever is current then."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import replace
from typing import Any

from shim import metrics
from shim.config import Config
from shim.errors import FailedPrecondition
from shim.network import PodNetwork, PortMapping, cni
from shim.network.bridge import BridgeConfig, BridgeNetwork
from shim.store import Metadata


class NetworkSelector:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._bridge: BridgeNetwork | None = None
        self._cni: cni.CniNetwork | None = None
        self._stamp: tuple[tuple[str, int, int], ...] = ()
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

    def bridge(self) -> BridgeNetwork:
        if self._bridge is None:
            c = self.config
            self._bridge = BridgeNetwork(
                BridgeConfig(
                    name=c.bridge_name,
                    subnet=ipaddress.IPv4Network(c.pod_subnet),
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
        return self._current().describe()

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
        backend = self._current()
        with metrics.network("setup", backend.KIND):
            pod = backend.setup(sandbox_id, netns_path, pod_netlink, ports, metadata)
        return replace(pod, backend=backend.KIND)

    def teardown(
        self, sandbox_id: str, pod: PodNetwork | None, netns_path: str, metadata: Metadata | None
    ) -> None:
        backend = self._current() if pod is None else self._for(pod)
        with metrics.network("teardown", backend.KIND):
            backend.teardown(sandbox_id, pod, netns_path, metadata)

    def check(self, sandbox_id: str, pod: PodNetwork, netns_path: str, metadata: Metadata) -> None:
        self._for(pod).check(sandbox_id, pod, netns_path, metadata)

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
