"""Sandbox records on disk: versioned JSON, written atomically.

States of a sandbox (only READY and NOTREADY are ever written):

    (Run) ──> READY ──(Stop | pause exits)──> NOTREADY ──(Remove)──> gone
                 └──────────────(Remove: stops first)─────────────────┘

A Run in flight has no record yet, only its runtime dir under the run root;
the start-up sweep removes what such a dir names if the daemon died mid-Run.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.namespaces import NamespacePaths
from shim.network import PodNetwork, PortMapping
from shim.procs import ProcessIdentity

log = logging.getLogger(__name__)

RECORD_VERSION = 1
ID_RE = re.compile(r"^[0-9a-f]{64}$")


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
class Metadata:
    name: str
    uid: str
    namespace: str
    attempt: int

    @property
    def reservation(self) -> str:
        """The key that makes a sandbox unique, as kubelet means it."""
        return f"{self.name}_{self.namespace}_{self.uid}_{self.attempt}"


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
        if data.get("version") != RECORD_VERSION:
            raise ValueError(f"record version {data.get('version')!r} is not {RECORD_VERSION}")
        if not ID_RE.match(data["id"]):
            raise ValueError(f"record id {data['id']!r} is not 64 hex characters")
        modes = data["modes"]
        pause = data["pause"]
        return cls(
            id=data["id"],
            metadata=Metadata(**data["metadata"]),
            state=SandboxState(data["state"]),
            created_at=int(data["created_at"]),
            modes=NamespaceModes(
                network=NamespaceMode[modes["network"]],
                pid=NamespaceMode[modes["pid"]],
                ipc=NamespaceMode[modes["ipc"]],
                target_id=modes["target_id"],
            ),
            runtime_handler=data["runtime_handler"],
            hostname=data["hostname"],
            log_directory=data["log_directory"],
            labels=dict(data["labels"]),
            annotations=dict(data["annotations"]),
            pause=None if pause is None else ProcessIdentity(**pause),
            namespaces=NamespacePaths.of(data["namespaces"]),
            network=None if data.get("network") is None else _network_from_json(data["network"]),
            files=dict(data.get("files", {})),
            config=base64.b64decode(data["config"]),
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
    return PodNetwork(
        ip=data["ip"],
        additional_ips=tuple(data["additional_ips"]),
        host_interface=data["host_interface"],
        cni_result=data.get("cni_result", ""),
        backend=data.get("backend") or ("cni" if data.get("cni_result") else "bridge"),
        port_mappings=tuple(PortMapping(**m) for m in data["port_mappings"]),
    )


def write_atomically(path: Path, payload: bytes, durable: bool = True) -> None:
    """Temp file in the same dir, fsync, rename, fsync the dir: all or nothing.

    durable=False skips the fsyncs: for files on tmpfs, which a reboot clears anyway.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(payload)
        while view:  # a short write (e.g. a full disk) must never be renamed into place
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SandboxStore:
    """One JSON file per sandbox under DIR/<id>.json."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, sandbox_id: str) -> Path:
        if not ID_RE.match(sandbox_id):
            raise ValueError(f"not a sandbox id: {sandbox_id!r}")
        return self.directory / f"{sandbox_id}.json"

    def save(self, record: SandboxRecord) -> None:
        payload = json.dumps(record.to_json(), separators=(",", ":")).encode()
        write_atomically(self._path(record.id), payload)

    def delete(self, sandbox_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(sandbox_id).unlink()
            _fsync_dir(self.directory)

    def load_all(self) -> list[SandboxRecord]:
        """Every readable record; a bad or future-versioned file is logged and left alone."""
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(SandboxRecord.from_json(json.loads(path.read_bytes())))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("event=record_refused path=%s reason=%s", path, exc)
        for tmp in self.directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)  # a write that never got renamed
        return records
