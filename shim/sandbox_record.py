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
from shim.store import Metadata, RecordStore, is_id

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
        config = base64.b64decode(_str(data["config"], "config"), validate=True)
        try:
            api_pb2.PodSandboxConfig.FromString(config)  # shown by verbose status
        except DecodeError as exc:
            raise ValueError(f"config: {exc}") from None
        return cls(
            id=data["id"],
            metadata=Metadata(
                name=_str(md["name"], "name"),
                uid=_str(md["uid"], "uid"),
                namespace=_str(md["namespace"], "namespace"),
                attempt=_int(md["attempt"], "attempt", 0, 2**32 - 1),
            ),
            state=SandboxState(data["state"]),
            created_at=_int(data["created_at"], "created_at", -(2**63), 2**63 - 1),
            modes=NamespaceModes(
                network=NamespaceMode[modes["network"]],
                pid=NamespaceMode[modes["pid"]],
                ipc=NamespaceMode[modes["ipc"]],
                target_id=_str(modes["target_id"], "target_id"),
            ),
            runtime_handler=_str(data["runtime_handler"], "runtime_handler"),
            hostname=_str(data["hostname"], "hostname"),
            log_directory=_str(data["log_directory"], "log_directory"),
            labels=_strings(data["labels"], "labels"),
            annotations=_strings(data["annotations"], "annotations"),
            pause=None
            if pause is None
            else ProcessIdentity(
                pid=_int(pause["pid"], "pid", 1, 2**31 - 1),
                start_time=_int(pause["start_time"], "start_time", 0, 2**64 - 1),
                boot_id=_str(pause["boot_id"], "boot_id"),
            ),
            namespaces=NamespacePaths.of(_strings(data["namespaces"], "namespaces")),
            network=None if data.get("network") is None else _network_from_json(data["network"]),
            files=_strings(data.get("files", {}), "files"),
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
    cni_result = _str(data.get("cni_result", ""), "cni_result")
    return PodNetwork(
        ip=_str(data["ip"], "ip"),
        additional_ips=tuple(_str(ip, "additional_ips") for ip in additional),
        host_interface=_str(data["host_interface"], "host_interface"),
        cni_result=cni_result,
        backend=_str(data.get("backend") or ("cni" if cni_result else "bridge"), "backend"),
        port_mappings=tuple(
            PortMapping(
                protocol=_str(m["protocol"], "protocol"),
                container_port=_int(m["container_port"], "container_port", 0, 65535),
                host_port=_int(m["host_port"], "host_port", 0, 65535),
                host_ip=_str(m["host_ip"], "host_ip"),
            )
            for m in data["port_mappings"]
        ),
    )


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    return value


def _int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what} is not an integer in [{low}, {high}]")
    return value


def _strings(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{what} is not a map of strings")
    return dict(value)


def sandbox_store(directory: Path) -> RecordStore[SandboxRecord]:
    """One JSON file per sandbox under DIR/<id>.json."""
    return RecordStore(directory, SandboxRecord.from_json)
