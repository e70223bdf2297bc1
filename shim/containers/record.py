"""Container records: what is known of a container, as versioned JSON.

States (the CRI's), and what moves a container between them:

    (Create) ──> CREATED ──(Start)──> RUNNING ──(its process exits)──> EXITED ──(Remove)──> gone
                    │                    └──(Stop: signal, then SIGKILL)──┘          ▲
                    └──(its process is killed before Start)──> EXITED ───────────────┘
    UNKNOWN: a container whose state could not be found out after a restart.

A Create in flight has no record yet, only its bundle dir under the run root;
the start-up sweep removes what such a dir names if the daemon died mid-Create.
"""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shim.procs import ProcessIdentity
from shim.store import RecordStore, is_id

RECORD_VERSION = 1


class ContainerState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ContainerUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()


def _identity(data: dict[str, Any] | None) -> ProcessIdentity | None:
    return None if data is None else ProcessIdentity(**data)


def _identity_json(identity: ProcessIdentity | None) -> dict[str, Any] | None:
    if identity is None:
        return None
    return {"pid": identity.pid, "start_time": identity.start_time, "boot_id": identity.boot_id}


# eq=False: records are compared by identity, so that caches can key on them weakly.
@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class ContainerRecord:
    id: str
    sandbox_id: str
    name: str
    attempt: int
    state: ContainerState
    created_at: int  # nanoseconds since the epoch, as all times here
    image: str  # its name, as the request gave it (by id: the first tag)
    image_id: str  # sha256:<config digest>
    image_ref: str  # a repo digest of the image, else its id
    runtime_handler: str
    cgroup: str  # cgroupfs path of the container (linux.cgroupsPath)
    log_path: str  # absolute; "" for none
    layers: tuple[str, ...]  # the image's layers under the rootfs: kept while this container lives
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    pid: ProcessIdentity | None = None  # the container's first process
    monitor: ProcessIdentity | None = None  # its conmon
    user: ContainerUser = field(default_factory=lambda: ContainerUser(0, 0))
    stop_signal: int = 15
    # The current LinuxContainerResources (serialized): the config's, then each update's.
    resources: bytes = b""
    # The ContainerConfig exactly as received (serialized protobuf), for status and verbose info.
    config: bytes = b""

    @property
    def reservation(self) -> str:
        return reservation(self.sandbox_id, self.name, self.attempt)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "id": self.id,
            "sandbox_id": self.sandbox_id,
            "name": self.name,
            "attempt": self.attempt,
            "state": self.state.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "message": self.message,
            "image": self.image,
            "image_id": self.image_id,
            "image_ref": self.image_ref,
            "runtime_handler": self.runtime_handler,
            "cgroup": self.cgroup,
            "log_path": self.log_path,
            "layers": list(self.layers),
            "labels": self.labels,
            "annotations": self.annotations,
            "pid": _identity_json(self.pid),
            "monitor": _identity_json(self.monitor),
            "user": {
                "uid": self.user.uid,
                "gid": self.user.gid,
                "additional_gids": list(self.user.additional_gids),
            },
            "stop_signal": self.stop_signal,
            "resources": base64.b64encode(self.resources).decode(),
            "config": base64.b64encode(self.config).decode(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ContainerRecord:
        if data.get("version") != RECORD_VERSION:
            raise ValueError(f"record version {data.get('version')!r} is not {RECORD_VERSION}")
        if not is_id(data["id"]) or not is_id(data["sandbox_id"]):
            raise ValueError("record ids are not 64 hex characters")
        user = data["user"]
        return cls(
            id=data["id"],
            sandbox_id=data["sandbox_id"],
            name=str(data["name"]),
            attempt=int(data["attempt"]),
            state=ContainerState(data["state"]),
            created_at=int(data["created_at"]),
            started_at=int(data["started_at"]),
            finished_at=int(data["finished_at"]),
            exit_code=int(data["exit_code"]),
            reason=str(data["reason"]),
            message=str(data["message"]),
            image=str(data["image"]),
            image_id=str(data["image_id"]),
            image_ref=str(data["image_ref"]),
            runtime_handler=str(data["runtime_handler"]),
            cgroup=str(data["cgroup"]),
            log_path=str(data["log_path"]),
            layers=tuple(str(d) for d in data["layers"]),
            labels=dict(data["labels"]),
            annotations=dict(data["annotations"]),
            pid=_identity(data["pid"]),
            monitor=_identity(data["monitor"]),
            user=ContainerUser(
                uid=int(user["uid"]),
                gid=int(user["gid"]),
                additional_gids=tuple(int(g) for g in user["additional_gids"]),
            ),
            stop_signal=int(data["stop_signal"]),
            resources=base64.b64decode(data["resources"]),
            config=base64.b64decode(data["config"]),
        )


def started(record: ContainerRecord, now: int) -> ContainerRecord:
    """RUNNING since `now`, unless it already exited."""
    if record.state is ContainerState.CREATED:
        return replace(record, state=ContainerState.RUNNING, started_at=now)
    # It exited before Start could say it runs: keep EXITED, but it did start, and not
    # after it finished (the exit file's time comes from the kernel's coarse clock).
    started = record.started_at or now
    return replace(record, started_at=min(started, record.finished_at or started))


def exited(
    record: ContainerRecord, code: int, finished_at: int, reason: str, message: str
) -> ContainerRecord:
    """EXITED with the exit conmon (or the runtime) saw; an EXITED record stays as it is."""
    if record.state is ContainerState.EXITED:
        return record
    return replace(
        record,
        state=ContainerState.EXITED,
        exit_code=code,
        # File times come from the kernel's coarse clock: never before the start.
        finished_at=max(finished_at, record.started_at),
        reason=reason,
        message=message,
    )


def reservation(sandbox_id: str, name: str, attempt: int) -> str:
    """A container name is unique within its pod, per attempt (as kubelet names them)."""
    return f"{name}_{attempt}@{sandbox_id}"


def container_store(directory: Path) -> RecordStore[ContainerRecord]:
    """One JSON file per container under DIR/<id>.json."""
    return RecordStore(directory, ContainerRecord.from_json)
