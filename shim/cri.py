"""Translations between pyshim's records and CRI messages (both directions)."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Generic, TypeVar
from weakref import WeakKeyDictionary

from google.protobuf import json_format

from shim._proto import api_pb2
from shim.containers.record import ContainerRecord, ContainerState
from shim.errors import InvalidArgument
from shim.images.registry import Credentials
from shim.images.store import ImageRecord
from shim.network import node_address
from shim.sandbox_record import NamespaceMode, SandboxRecord, SandboxState

_STATE: dict[SandboxState, api_pb2.PodSandboxState] = {
    SandboxState.READY: api_pb2.SANDBOX_READY,
    SandboxState.NOTREADY: api_pb2.SANDBOX_NOTREADY,
}
_FROM_CRI_STATE: dict[int, SandboxState] = {v: k for k, v in _STATE.items()}


def state_from_cri(value: int) -> SandboxState | None:
    return _FROM_CRI_STATE.get(value)


def _metadata(record: SandboxRecord) -> api_pb2.PodSandboxMetadata:
    md = record.metadata
    return api_pb2.PodSandboxMetadata(name=md.name, uid=md.uid, namespace=md.namespace, attempt=md.attempt)


def pod_sandbox(record: SandboxRecord) -> api_pb2.PodSandbox:
    return api_pb2.PodSandbox(
        id=record.id,
        metadata=_metadata(record),
        state=_STATE[record.state],
        created_at=record.created_at,
        labels=record.labels,
        annotations=record.annotations,
        runtime_handler=record.runtime_handler,
    )


R = TypeVar("R")


class EncodedList(Generic[R]):
    """A list response encoded from cached per-record entries. A record never
    changes (updates replace it), so its entry (a one-item response: exactly the bytes
    of one repeated field) is kept as long as the record lives: kubelet lists every
    second, and a list is then a filter and a join."""

    def __init__(self, entry: Callable[[R], bytes]) -> None:
        self._entry = entry
        self._cache: WeakKeyDictionary[R, bytes] = WeakKeyDictionary()

    def __call__(self, records: Iterable[R]) -> bytes:
        parts = []
        for record in records:
            entry = self._cache.get(record)
            if entry is None:
                entry = self._cache[record] = self._entry(record)
            parts.append(entry)
        return b"".join(parts)


list_pod_sandbox_response: EncodedList[SandboxRecord] = EncodedList(
    lambda r: api_pb2.ListPodSandboxResponse(items=[pod_sandbox(r)]).SerializeToString()
)


def _network(record: SandboxRecord) -> api_pb2.PodSandboxNetworkStatus | None:
    if record.network is not None:
        extra = [api_pb2.PodIP(ip=ip) for ip in record.network.additional_ips]
        return api_pb2.PodSandboxNetworkStatus(ip=record.network.ip, additional_ips=extra)
    if record.modes.network == NamespaceMode.NODE and record.state is SandboxState.READY:
        return api_pb2.PodSandboxNetworkStatus(ip=node_address())
    return None


def pod_sandbox_status(record: SandboxRecord) -> api_pb2.PodSandboxStatus:
    modes = record.modes
    return api_pb2.PodSandboxStatus(
        network=_network(record),
        id=record.id,
        metadata=_metadata(record),
        state=_STATE[record.state],
        created_at=record.created_at,
        linux=api_pb2.LinuxPodSandboxStatus(
            namespaces=api_pb2.Namespace(
                # Echo what was asked for: kubelet compares it with the pod spec.
                options=api_pb2.NamespaceOption(
                    network=modes.network.value,  # type: ignore[arg-type]
                    pid=modes.pid.value,  # type: ignore[arg-type]
                    ipc=modes.ipc.value,  # type: ignore[arg-type]
                    target_id=modes.target_id,
                )
            )
        ),
        labels=record.labels,
        annotations=record.annotations,
        runtime_handler=record.runtime_handler,
    )


def verbose_info(record: SandboxRecord) -> dict[str, str]:
    """`info` of a verbose PodSandboxStatus: one JSON document under the key "info"."""
    config = api_pb2.PodSandboxConfig.FromString(record.config)
    info: dict[str, Any] = {
        "pid": record.pause.pid if record.pause else 0,
        "pauseStartTime": record.pause.start_time if record.pause else 0,
        "namespaces": record.namespaces.as_dict(),
        "network": None
        if record.network is None
        else {
            "ip": record.network.ip,
            "hostInterface": record.network.host_interface,
            "portMappings": [asdict(m) for m in record.network.port_mappings],
        },
        "files": record.files,
        "hostname": record.hostname,
        "runtimeHandler": record.runtime_handler,
        "config": json_format.MessageToDict(config),
    }
    return {"info": json.dumps(info, sort_keys=True)}


def image(record: ImageRecord) -> api_pb2.Image:
    message = api_pb2.Image(
        id=record.id,
        repo_tags=record.repo_tags,
        repo_digests=record.repo_digests,
        size=record.size,
        spec=api_pb2.ImageSpec(image=record.id),
    )
    # The image's user: a numeric uid, or a name (only one of the two is set).
    user = record.config.user.split(":", 1)[0]
    if user.isdigit():
        message.uid.value = int(user)
    elif user:
        message.username = user
    return message


def credentials(auth: api_pb2.AuthConfig) -> Credentials:
    username, password = auth.username, auth.password
    if auth.auth and not username:
        try:
            username, _, password = base64.b64decode(auth.auth).decode().partition(":")
        except ValueError:
            raise InvalidArgument("auth.auth is not base64 of user:password") from None
    return Credentials(
        username=username,
        password=password,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
    )


def filesystem_usage(path: Path) -> api_pb2.FilesystemUsage:
    """Bytes (allocated blocks) and inodes used under `path`, which need not be populated."""
    used, inodes = 0, 0
    for top, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(top, name))
            used += st.st_blocks * 512
            inodes += 1
    st = os.lstat(path)
    return api_pb2.FilesystemUsage(
        timestamp=time.time_ns(),
        fs_id=api_pb2.FilesystemIdentifier(mountpoint=str(path)),
        used_bytes=api_pb2.UInt64Value(value=used + st.st_blocks * 512),
        inodes_used=api_pb2.UInt64Value(value=inodes + 1),
    )


# ---- containers ------------------------------------------------------------------------

_CONTAINER_STATE: dict[ContainerState, api_pb2.ContainerState] = {
    ContainerState.CREATED: api_pb2.CONTAINER_CREATED,
    ContainerState.RUNNING: api_pb2.CONTAINER_RUNNING,
    ContainerState.EXITED: api_pb2.CONTAINER_EXITED,
    ContainerState.UNKNOWN: api_pb2.CONTAINER_UNKNOWN,
}
_FROM_CRI_CONTAINER_STATE: dict[int, ContainerState] = {v: k for k, v in _CONTAINER_STATE.items()}


def container_state_from_cri(value: int) -> ContainerState | None:
    return _FROM_CRI_CONTAINER_STATE.get(value)


def _image_spec(record: ContainerRecord) -> api_pb2.ImageSpec:
    config = api_pb2.ContainerConfig.FromString(record.config)
    spec = api_pb2.ImageSpec()
    spec.CopyFrom(config.image)
    spec.image = record.image
    return spec


def container(record: ContainerRecord) -> api_pb2.Container:
    return api_pb2.Container(
        id=record.id,
        pod_sandbox_id=record.sandbox_id,
        metadata=api_pb2.ContainerMetadata(name=record.name, attempt=record.attempt),
        image=api_pb2.ImageSpec(image=record.image),
        image_ref=record.image_ref,
        image_id=record.image_id,
        state=_CONTAINER_STATE[record.state],
        created_at=record.created_at,
        labels=record.labels,
        annotations=record.annotations,
    )


list_containers_response: EncodedList[ContainerRecord] = EncodedList(
    lambda r: api_pb2.ListContainersResponse(containers=[container(r)]).SerializeToString()
)


def container_status(record: ContainerRecord) -> api_pb2.ContainerStatus:
    config = api_pb2.ContainerConfig.FromString(record.config)
    status = api_pb2.ContainerStatus(
        id=record.id,
        metadata=config.metadata,
        state=_CONTAINER_STATE[record.state],
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        exit_code=record.exit_code,
        image=_image_spec(record),
        image_ref=record.image_ref,
        image_id=record.image_id,
        reason=record.reason,
        message=record.message,
        labels=record.labels,
        annotations=record.annotations,
        mounts=config.mounts,
        log_path=record.log_path,
        stop_signal=config.stop_signal,
    )
    status.resources.linux.MergeFromString(record.resources)
    user = status.user.linux
    user.uid, user.gid = record.user.uid, record.user.gid
    user.supplemental_groups.extend(record.user.additional_gids)
    return status


def container_info(
    record: ContainerRecord, spec: dict[str, Any] | None, runtime: dict[str, str]
) -> dict[str, str]:
    """`info` of a verbose ContainerStatus: one JSON document under the key "info"."""
    config = api_pb2.ContainerConfig.FromString(record.config)
    info: dict[str, Any] = {
        "sandboxID": record.sandbox_id,
        "pid": record.pid.pid if record.pid and record.state is ContainerState.RUNNING else 0,
        "monitorPid": record.monitor.pid if record.monitor else 0,
        "runtime": runtime,
        "cgroup": record.cgroup,
        "config": json_format.MessageToDict(config),
        "runtimeSpec": spec,
    }
    return {"info": json.dumps(info, sort_keys=True)}
