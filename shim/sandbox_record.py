"""Sandbox records: what is known of a pod sandbox, as versioned JSON.

States of a sandbox (only READY and NOTREADY are ever written):

    (Run) ──> READY ──(Stop | pause exits)──> NOTREADY ──(Remove)──> gone
                 └──────────────(Remove: stops first)─────────────────┘

A Run in flight has no record yet, only its runtime dir under the run root;
the start-up sweep removes what such a dir names if the daemon died mid-Run.
"""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from shim._proto import api_pb2
from shim.namespaces import NamespacePaths
from shim.network import PodNetwork, PortMapping
from shim.procs import ProcessIdentity
from shim.store import Metadata, RecordStore, is_id, json_int, json_str, json_str_list, json_strings

RECORD_VERSION = 1


class SandboxState(enum.Enum):
    READY = "ready"
    NOTREADY = "notready"


class NamespaceMode(enum.IntEnum):
    """Values of runtime.v1.NamespaceMode."""

    POD = 0
    CONTAINER = 1
    NODE = 2
    TARGET = 3


@dataclass(frozen=True, slots=True)
class NamespaceModes:
    network: NamespaceMode = NamespaceMode.POD
    pid: NamespaceMode = NamespaceMode.POD
    ipc: NamespaceMode = NamespaceMode.POD
    target_id: str = ""


# eq=False: records are compared by identity, so that caches can key on them weakly.
@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class SandboxRecord:
    id: str
    metadata: Metadata
    state: SandboxState
    created_at: int  # nanoseconds since the epoch
    modes: NamespaceModes
    runtime_handler: str
    hostname: str
    log_directory: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    pause: ProcessIdentity | None = None
    namespaces: NamespacePaths = field(default_factory=NamespacePaths)
    # What the pod network set up; None for host-network pods and once stopped.
    network: PodNetwork | None = None
    # resolv.conf, hostname, hosts written for containers to mount: name -> path.
    files: dict[str, str] = field(default_factory=dict)
    # The pod's cgroup (cgroupfs path) and the directories pyshim made for it (removed
    # with the pod; a cgroup kubelet made is kubelet's). The pause is in its child
    # `pyshim-<id>`, each container in `pyshim-<container id>`.
    cgroup_parent: str = ""
    cgroup_created: tuple[str, ...] = ()
    # The pod's /dev/shm (a tmpfs its containers share); "" when it uses the node's IPC.
    shm: str = ""
    # The PodSandboxConfig exactly as received (serialized protobuf), for verbose status.
    config: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "id": self.id,
            "metadata": {
                "name": self.metadata.name,
                "uid": self.metadata.uid,
                "namespace": self.metadata.namespace,
                "attempt": self.metadata.attempt,
            },
            "state": self.state.value,
            "created_at": self.created_at,
            "modes": {
                "network": self.modes.network.name,
                "pid": self.modes.pid.name,
                "ipc": self.modes.ipc.name,
                "target_id": self.modes.target_id,
            },
            "runtime_handler": self.runtime_handler,
            "hostname": self.hostname,
            "log_directory": self.log_directory,
            "labels": self.labels,
            "annotations": self.annotations,
            "pause": None
            if self.pause is None
            else {
                "pid": self.pause.pid,
                "start_time": self.pause.start_time,
                "boot_id": self.pause.boot_id,
            },
            "namespaces": self.namespaces.as_dict(),
            "network": None if self.network is None else _network_json(self.network),
            "files": self.files,
            "cgroup_parent": self.cgroup_parent,
            "cgroup_created": list(self.cgroup_created),
            "shm": self.shm,
            "config": base64.b64encode(self.config).decode(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxRecord:
        """The record a file holds; ValueError (or KeyError, TypeError) for anything
        else: every value is checked for its type and range, so that a damaged file is
        refused, never loaded half valid (every later list would fail on it)."""
        if data.get("version") != RECORD_VERSION:
            raise ValueError(f"record version {data.get('version')!r} is not {RECORD_VERSION}")
        if not is_id(data["id"]):
            raise ValueError(f"record id {data['id']!r} is not 64 hex characters")
        md, modes, pause = data["metadata"], data["modes"], data["pause"]
        config = base64.b64decode(json_str(data["config"], "config"), validate=True)
        try:
            api_pb2.PodSandboxConfig.FromString(config)  # shown by verbose status
        except DecodeError as exc:
            raise ValueError(f"config: {exc}") from None
        return cls(
            id=data["id"],
            metadata=Metadata(
                name=json_str(md["name"], "name"),
                uid=json_str(md["uid"], "uid"),
                namespace=json_str(md["namespace"], "namespace"),
                attempt=json_int(md["attempt"], "attempt", 0, 2**32 - 1),
            ),
            state=SandboxState(data["state"]),
            created_at=json_int(data["created_at"], "created_at", -(2**63), 2**63 - 1),
            modes=NamespaceModes(
                network=NamespaceMode[modes["network"]],
                pid=NamespaceMode[modes["pid"]],
                ipc=NamespaceMode[modes["ipc"]],
                target_id=json_str(modes["target_id"], "target_id"),
            ),
            runtime_handler=json_str(data["runtime_handler"], "runtime_handler"),
            hostname=json_str(data["hostname"], "hostname"),
            log_directory=json_str(data["log_directory"], "log_directory"),
            labels=json_strings(data["labels"], "labels"),
            annotations=json_strings(data["annotations"], "annotations"),
            pause=None
            if pause is None
            else ProcessIdentity(
                pid=json_int(pause["pid"], "pid", 1, 2**31 - 1),
                start_time=json_int(pause["start_time"], "start_time", 0, 2**64 - 1),
                boot_id=json_str(pause["boot_id"], "boot_id"),
            ),
            namespaces=NamespacePaths.of(json_strings(data["namespaces"], "namespaces")),
            network=None if data.get("network") is None else _network_from_json(data["network"]),
            files=json_strings(data.get("files", {}), "files"),
            cgroup_parent=json_str(data.get("cgroup_parent", ""), "cgroup_parent"),
            cgroup_created=json_str_list(data.get("cgroup_created", []), "cgroup_created"),
            shm=json_str(data.get("shm", ""), "shm"),
            config=config,
        )


def _network_json(network: PodNetwork) -> dict[str, Any]:
    return {
        "ip": network.ip,
        "additional_ips": list(network.additional_ips),
        "host_interface": network.host_interface,
        "cni_result": network.cni_result,
        "backend": network.backend,
        "port_mappings": [
            {
                "protocol": m.protocol,
                "container_port": m.container_port,
                "host_port": m.host_port,
                "host_ip": m.host_ip,
            }
            for m in network.port_mappings
        ],
    }


def _network_from_json(data: dict[str, Any]) -> PodNetwork:
    additional = data["additional_ips"]
    if not isinstance(additional, list):
        raise ValueError("additional_ips is not a list")
    cni_result = json_str(data.get("cni_result", ""), "cni_result")
    return PodNetwork(
        ip=json_str(data["ip"], "ip"),
        additional_ips=tuple(json_str(ip, "additional_ips") for ip in additional),
        host_interface=json_str(data["host_interface"], "host_interface"),
        cni_result=cni_result,
        backend=json_str(data.get("backend") or ("cni" if cni_result else "bridge"), "backend"),
        port_mappings=tuple(
            PortMapping(
                protocol=json_str(m["protocol"], "protocol"),
                container_port=json_int(m["container_port"], "container_port", 0, 65535),
                host_port=json_int(m["host_port"], "host_port", 0, 65535),
                host_ip=json_str(m["host_ip"], "host_ip"),
            )
            for m in data["port_mappings"]
        ),
    )


def sandbox_store(directory: Path) -> RecordStore[SandboxRecord]:
    """One JSON file per sandbox under DIR/<id>.json."""
    return RecordStore(directory, SandboxRecord.from_json)
