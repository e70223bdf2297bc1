"""Host devices a container gets: `linux.devices` entries (the runtime makes the
nodes in the container's /dev) and the device-cgroup rules that let it use them."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

from shim._proto import api_pb2
from shim.errors import FailedPrecondition

# Never copied from a host directory (containerd's HostDevices): they are mounts of
# their own in a container, or belong to the node's tooling.
_SKIP_DIRS = frozenset({"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"})
_SKIP_FILES = frozenset({"console"})
MAX_DEVICES_IN_DIR = 4096


@dataclass(frozen=True, slots=True)
class Device:
    container_path: str
    kind: str  # "c" or "b"
    major: int
    minor: int
    file_mode: int
    uid: int
    gid: int

    def oci(self) -> dict[str, Any]:
        return {
            "path": self.container_path,
            "type": self.kind,
            "major": self.major,
            "minor": self.minor,
            "fileMode": self.file_mode,
            "uid": self.uid,
            "gid": self.gid,
        }

    def rule(self, access: str) -> dict[str, Any]:
        return {"allow": True, "type": self.kind, "major": self.major, "minor": self.minor, "access": access}


def _device(container_path: str, st: os.stat_result) -> Device | None:
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
    else:
        return None
    return Device(
        container_path=container_path,
        kind=kind,
        major=os.major(st.st_rdev),
        minor=os.minor(st.st_rdev),
        file_mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
    )


def in_directory(host_dir: str, container_dir: str) -> list[Device]:
    """Every device node under host_dir (symlinks and the directories containerd skips
    are left out), at the same relative path under container_dir, sorted by path."""
    found: list[Device] = []
    for top, dirs, files in os.walk(host_dir):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if name in _SKIP_FILES and top == host_dir:
                continue
            host = os.path.join(top, name)
            try:
                st = os.lstat(host)
            except OSError:
                continue  # gone meanwhile (hotplug)
            device = _device(os.path.join(container_dir, os.path.relpath(host, host_dir)), st)
            if device is not None:
                found.append(device)
                if len(found) > MAX_DEVICES_IN_DIR:
                    raise FailedPrecondition(f"{host_dir} holds more than {MAX_DEVICES_IN_DIR} devices")
    return found


def requested(device: api_pb2.Device) -> list[Device]:
    """The devices one CRI Device names: the node at host_path (symlinks followed), or
    every device under it when it is a directory (as containerd does, /dev/snd...).
    FailedPrecondition when the host path is missing or holds no device."""
    try:
        st = os.stat(device.host_path)
    except OSError as exc:
        raise FailedPrecondition(f"device {device.host_path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        found = in_directory(device.host_path, device.container_path)
        if not found:
            raise FailedPrecondition(f"device directory {device.host_path} holds no device")
        return found
    single = _device(device.container_path, st)
    if single is None:
        raise FailedPrecondition(f"device {device.host_path} is not a character or block device")
    return [single]


def build(
    devices: list[api_pb2.Device], privileged: bool, host_dev: str = "/dev"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(linux.devices, linux.resources.devices) for a container: a deny-all rule first,
    then one allow rule per requested device with its permissions ("rwm" when empty).
    Privileged: every device of the node's /dev as well, and every device allowed."""
    entries: dict[str, Device] = {}
    rules: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
    if privileged:
        for d in in_directory(host_dev, "/dev"):
            entries[d.container_path] = d
        rules.append({"allow": True, "access": "rwm"})
    for request in devices:
        for d in requested(request):
            entries[d.container_path] = d  # the CRI's request wins over the node's copy
            if not privileged:
                rules.append(d.rule(request.permissions or "rwm"))
    return [d.oci() for d in entries.values()], rules
