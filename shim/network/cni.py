"""CNI mode: pod networks made by CNI plugins, per the CNI spec.

When the CNI config dir holds a network configuration (`*.conflist`, `*.conf`,
`*.json`; the first by name wins), pyshim runs its plugins instead of the
built-in bridge: ADD in order with each result chained into the next plugin's
`prevResult`, DEL in reverse order, with the pinned network namespace path, the
sandbox id as container id, `eth0`, and Kubernetes' CNI_ARGS. Host ports go to
plugins that declare the `portMappings` capability (e.g. portmap).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.errors import FailedPrecondition, Internal
from shim.network import PodNetwork, PortMapping
from shim.store import Metadata

log = logging.getLogger(__name__)

IFNAME = "eth0"
PLUGIN_TIMEOUT = 60.0
_PLUGIN_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_CONFIG_SUFFIXES = (".conflist", ".conf", ".json")


@dataclass(frozen=True, slots=True)
class NetworkList:
    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    source: Path


class CniNetwork:
    KIND = "cni"

    def __init__(self, conf_dir: Path, bin_dirs: tuple[Path, ...]) -> None:
        self.conf_dir = conf_dir
        self.bin_dirs = bin_dirs
        self.network: NetworkList | None = None
        self.problem = ""
        try:
            self.network = load(conf_dir, bin_dirs)
            log.info("event=cni_loaded network=%s source=%s", self.network.name, self.network.source)
        except FailedPrecondition as exc:
            self.problem = str(exc)
            log.error("event=cni_not_ready reason=%r", self.problem)

    def status(self) -> tuple[bool, str, str]:
        if self.network is None:
            return False, "NetworkPluginNotReady", self.problem
        return True, "", ""

    def kind(self) -> str:
        return self.KIND

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "cni",
            "confDir": str(self.conf_dir),
            "binDirs": [str(d) for d in self.bin_dirs],
            "network": self.network.name if self.network else None,
            "source": str(self.network.source) if self.network else None,
            "problem": self.problem,
        }

    def _require(self) -> NetworkList:
        if self.network is None:
            raise FailedPrecondition(f"pod network is not ready: {self.problem}")
        return self.network

    def setup(
        self,
        sandbox_id: str,
        netns_path: str,
        pod_netlink: socket.socket,
        ports: tuple[PortMapping, ...],
        metadata: Metadata,
    ) -> PodNetwork:
        network = self._require()
        result: dict[str, Any] | None = None
        for plugin in network.plugins:
            conf = self._plugin_conf(network, plugin, result, ports)
            result = self._exec("ADD", plugin["type"], conf, sandbox_id, netns_path, metadata)
        ips = [ip["address"].split("/")[0] for ip in (result or {}).get("ips", [])]
        v4 = [ip for ip in ips if ":" not in ip]
        if not ips:
            raise Internal(f"CNI network {network.name} returned no address for sandbox {sandbox_id}")
        primary = (v4 or ips)[0]
        return PodNetwork(
            ip=primary,
            additional_ips=tuple(ip for ip in ips if ip != primary),
            port_mappings=ports,
            cni_result=json.dumps(result, sort_keys=True),
            backend=self.KIND,
        )

    def teardown(
        self, sandbox_id: str, pod: PodNetwork | None, netns_path: str, metadata: Metadata | None
    ) -> None:
        """DEL through every plugin, last first. Also after a failed or half-made ADD."""
        network = self.network
        if network is None:
            if pod is None:
                return  # nothing was added through CNI
            # Keep the record's network so that a later Stop (with a config) can DEL it.
            raise FailedPrecondition(f"cannot release the pod network of {sandbox_id}: {self.problem}")
        previous = json.loads(pod.cni_result) if pod is not None and pod.cni_result else None
        ports = pod.port_mappings if pod is not None else ()
        # The spec allows an empty CNI_NETNS on DEL when the namespace is already gone.
        netns = netns_path if netns_path and os.path.exists(netns_path) else ""
        errors = []
        for plugin in reversed(network.plugins):
            conf = self._plugin_conf(network, plugin, previous, ports)
            try:
                self._exec("DEL", plugin["type"], conf, sandbox_id, netns, metadata)
            except Internal as exc:
                errors.append(str(exc))
        if errors:
            raise Internal("; ".join(errors))

    def check(self, sandbox_id: str, pod: PodNetwork, netns_path: str, metadata: Metadata) -> None:
        """CHECK through every plugin with the ADD result (CNI 0.4.0 and later)."""
        network = self._require()
        if network.cni_version.startswith(("0.1", "0.2", "0.3")) or not pod.cni_result:
            return
        previous = json.loads(pod.cni_result)
        for plugin in network.plugins:
            conf = self._plugin_conf(network, plugin, previous, pod.port_mappings)
            self._exec("CHECK", plugin["type"], conf, sandbox_id, netns_path, metadata)

    def reconcile(self, live: dict[str, PodNetwork]) -> None:
        """Plugins keep their own state; half-made Runs get a DEL from the start-up sweep."""

    def sync_ports(self, live: list[PodNetwork]) -> None:
        """Host ports belong to the plugins (portmap keeps its rules)."""

    def close(self) -> None:
        pass

    @staticmethod
    def _plugin_conf(
        network: NetworkList,
        plugin: dict[str, Any],
        previous: dict[str, Any] | None,
        ports: tuple[PortMapping, ...],
    ) -> dict[str, Any]:
        conf = dict(plugin)
        conf["name"] = network.name
        conf["cniVersion"] = network.cni_version
        if previous is not None:
            conf["prevResult"] = previous
        if plugin.get("capabilities", {}).get("portMappings") and ports:
            conf["runtimeConfig"] = {
                "portMappings": [
                    {"hostPort": m.host_port, "containerPort": m.container_port, "protocol": m.protocol}
                    | ({"hostIP": m.host_ip} if m.host_ip else {})
                    for m in ports
                ]
            }
        return conf

    def _exec(
        self,
        command: str,
        plugin_type: str,
        conf: dict[str, Any],
        sandbox_id: str,
        netns: str,
        metadata: Metadata | None,
    ) -> dict[str, Any]:
        binary = find_plugin(plugin_type, self.bin_dirs)
        if binary is None:
            raise Internal(f"CNI plugin {plugin_type!r} not found in {', '.join(map(str, self.bin_dirs))}")
        args = ["IgnoreUnknown=1"]
        if metadata is not None:
            args += [
                f"K8S_POD_NAMESPACE={metadata.namespace}",
                f"K8S_POD_NAME={metadata.name}",
                f"K8S_POD_INFRA_CONTAINER_ID={sandbox_id}",
                f"K8S_POD_UID={metadata.uid}",
            ]
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": sandbox_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": IFNAME,
            "CNI_ARGS": ";".join(args),
            "CNI_PATH": os.pathsep.join(map(str, self.bin_dirs)),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        try:
            done = subprocess.run(
                [str(binary)],
                input=json.dumps(conf).encode(),
                env=env,
                capture_output=True,
                timeout=PLUGIN_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Internal(
                f"CNI plugin {plugin_type} {command} timed out after {PLUGIN_TIMEOUT:.0f}s"
            ) from None
        if done.returncode != 0:
            raise Internal(
                f"CNI plugin {plugin_type} {command} failed: {_error_text(done.stdout, done.stderr)}"
            )
        if command != "ADD":
            return {}
        try:
            result = json.loads(done.stdout)
        except ValueError:
            raise Internal(f"CNI plugin {plugin_type} ADD printed no JSON result") from None
        if not isinstance(result, dict):
            raise Internal(f"CNI plugin {plugin_type} ADD printed no JSON object")
        return result


def _error_text(stdout: bytes, stderr: bytes) -> str:
    try:
        error = json.loads(stdout)
    except ValueError:
        error = None
    if isinstance(error, dict):
        return f"{error.get('msg', '')} {error.get('details', '')}".strip()[:500]
    return (stderr or stdout).decode(errors="replace").strip()[:500]


def find_plugin(plugin_type: str, bin_dirs: tuple[Path, ...]) -> Path | None:
    if not _PLUGIN_TYPE.fullmatch(plugin_type):
        return None
    for directory in bin_dirs:
        candidate = directory / plugin_type
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def config_files(conf_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in conf_dir.iterdir() if p.suffix in _CONFIG_SUFFIXES and p.is_file())
    except FileNotFoundError:
        return []


def load(conf_dir: Path, bin_dirs: tuple[Path, ...]) -> NetworkList:
    """The first valid network configuration, as CRI runtimes choose it; or FailedPrecondition."""
    files = config_files(conf_dir)
    if not files:
        raise FailedPrecondition(f"no CNI network configuration in {conf_dir}")
    problems = []
    for path in files:
        try:
            return _parse(path, bin_dirs)
        except (ValueError, KeyError, TypeError, FailedPrecondition) as exc:
            problems.append(f"{path.name}: {exc}")
    raise FailedPrecondition("no usable CNI configuration: " + "; ".join(problems))


def _parse(path: Path, bin_dirs: tuple[Path, ...]) -> NetworkList:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    plugins = data.get("plugins") if path.suffix == ".conflist" or "plugins" in data else [data]
    if not isinstance(plugins, list) or not plugins:
        raise ValueError("no plugins")
    for plugin in plugins:
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str):
            raise ValueError("a plugin without a type")
        if find_plugin(plugin["type"], bin_dirs) is None:
            raise FailedPrecondition(
                f"plugin {plugin['type']!r} not found in {', '.join(map(str, bin_dirs))}"
            )
    return NetworkList(
        name=str(data["name"]),
        cni_version=str(data.get("cniVersion", "0.4.0")),
        plugins=tuple(plugins),
        source=path,
    )
