"""A container's mounts, in containerd's order: the standard filesystems (/proc,
/dev, /dev/pts, /dev/mqueue, /sys, /sys/fs/cgroup), the pod's /dev/shm and its
/etc/hostname, /etc/hosts, /etc/resolv.conf, then the CRI mounts (shallower
destinations first). A CRI mount at a path replaces whatever the runtime would mount
there; one at /dev replaces every standard mount under /dev too.

Host-side preparation (a missing host path made a directory, shared propagation for
rslave/rshared mounts) changes the node, so it is not part of building the spec:
`prepare_host` does it, and the lifecycle calls it before `spec.build`.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from typing import Any

from shim._proto import api_pb2
from shim.errors import FailedPrecondition, Internal

_MS_SHARED = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]

_PROPAGATION = {
    api_pb2.PROPAGATION_PRIVATE: "rprivate",
    api_pb2.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    api_pb2.PROPAGATION_BIDIRECTIONAL: "rshared",
}
_OCTAL = re.compile(r"\\([0-7]{3})")
_POD_FILES = (("hostname", "/etc/hostname"), ("hosts", "/etc/hosts"), ("resolv.conf", "/etc/resolv.conf"))


def _mount(destination: str, kind: str, source: str, options: list[str]) -> dict[str, Any]:
    return {"destination": destination, "type": kind, "source": source, "options": options}


def standard(privileged: bool) -> list[dict[str, Any]]:
    """What every container gets (containerd's default spec, less /run, plus the CRI's
    /sys/fs/cgroup). /sys and the cgroup tree are read-only unless privileged."""
    sys_mode = "rw" if privileged else "ro"
    return [
        _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount(
            "/dev/pts",
            "devpts",
            "devpts",
            ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", sys_mode]),
        _mount("/sys/fs/cgroup", "cgroup", "cgroup", ["nosuid", "noexec", "nodev", "relatime", sys_mode]),
    ]


def _bind(destination: str, source: str, readonly: bool, propagation: str = "rprivate") -> dict[str, Any]:
    return _mount(destination, "bind", source, ["rbind", propagation, "ro" if readonly else "rw"])


def pod(files: dict[str, str], shm: str, readonly_rootfs: bool) -> list[dict[str, Any]]:
    """The pod's /dev/shm (its own tmpfs, or the node's when the pod shares the node's
    IPC: shm == "") and the files the sandbox wrote, read-only when the rootfs is."""
    mounts = [_bind("/dev/shm", shm or "/dev/shm", readonly=False)]
    for name, destination in _POD_FILES:
        if files.get(name):
            mounts.append(_bind(destination, files[name], readonly_rootfs))
    return mounts


def host_source(path: str) -> str:
    """The host path a CRI mount binds: symlinks resolved on the node (the host is
    trusted; kubelet made these paths), so that the runtime binds what was meant."""
    return os.path.realpath(path)


def cri(mounts: list[api_pb2.Mount], rro: bool) -> tuple[list[dict[str, Any]], str]:
    """OCI mounts for the CRI mounts (sorted by depth, stable) and the rootfs
    propagation they need ("" for the runtime's default). FailedPrecondition for a
    recursive read-only mount on a kernel without mount_setattr."""
    result = []
    rootfs_propagation = ""
    for m in sorted(mounts, key=lambda m: len(_parts(m.container_path))):
        propagation = _PROPAGATION[m.propagation]
        options = ["rbind", propagation, "ro" if m.readonly else "rw"]
        if m.recursive_read_only:
            if not rro:
                raise FailedPrecondition(
                    f"mount {m.container_path}: recursive read-only needs a kernel with mount_setattr (5.12+)"
                )
            options.append("rro")
        if propagation == "rshared":
            rootfs_propagation = "rshared"
        elif propagation == "rslave" and rootfs_propagation != "rshared":
            rootfs_propagation = "rslave"
        result.append(_mount(destination(m.container_path), "bind", host_source(m.host_path), options))
    return result, rootfs_propagation


def merge(defaults: list[dict[str, Any]], overrides: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """defaults, less those the overrides replace (the same destination, or anything
    under /dev when an override mounts /dev), then the overrides."""
    taken = {m["destination"] for m in overrides}
    kept = [
        m
        for m in defaults
        if m["destination"] not in taken and not ("/dev" in taken and m["destination"].startswith("/dev/"))
    ]
    return kept + overrides


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


def destination(container_path: str) -> str:
    """A container path as one spelling: "//etc/./hosts/" is "/etc/hosts" (normpath
    would keep the leading "//"). Validation has refused '..'."""
    return "/" + "/".join(_parts(container_path))


# ---- the host side (the lifecycle's, before build) ----------------------------------------


@dataclass(frozen=True, slots=True)
class MountPoint:
    mount_point: str
    shared: bool  # "shared:N" among the optional fields: events propagate both ways
    slave: bool  # "master:N": receives the master's events


def parse_mountinfo(text: str) -> list[MountPoint]:
    """The mounts of /proc/PID/mountinfo, in order (later ones cover earlier ones)."""
    found = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 7 or "-" not in fields[6:]:
            continue
        optional = fields[6 : fields.index("-", 6)]
        found.append(
            MountPoint(
                mount_point=_unescape(fields[4]),
                shared=any(f.startswith("shared:") for f in optional),
                slave=any(f.startswith("master:") for f in optional),
            )
        )
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo (octal)."""
    return _OCTAL.sub(lambda m: chr(int(m[1], 8)), field)


def holding(path: str, mounts: list[MountPoint]) -> MountPoint:
    """The mount that holds `path` (an absolute, resolved path): the longest mount
    point that is `path` or one of its parents; the last of equals covers the others."""
    best: MountPoint | None = None
    for m in mounts:
        if (path == m.mount_point or path.startswith(m.mount_point.rstrip("/") + "/")) and (
            best is None or len(m.mount_point) >= len(best.mount_point)
        ):
            best = m
    if best is None:
        raise FailedPrecondition(f"no mount holds {path}")
    return best


def ensure_propagation(path: str, propagation: int, mountinfo: str = "/proc/self/mountinfo") -> None:
    """Make sure events under host `path` reach a container that mounts it with
    `propagation`: rshared (BIDIRECTIONAL) needs the host mount holding it shared,
    rslave (HOST_TO_CONTAINER) shared or a slave. A private one is made shared
    (MS_SHARED on that mount only). PRIVATE needs nothing."""
    if propagation == api_pb2.PROPAGATION_PRIVATE:
        return
    with open(mountinfo) as f:
        mount = holding(host_source(path), parse_mountinfo(f.read()))
    if mount.shared or (propagation == api_pb2.PROPAGATION_HOST_TO_CONTAINER and mount.slave):
        return
    if _libc.mount(None, mount.mount_point.encode(), None, _MS_SHARED, None) != 0:
        err = ctypes.get_errno()
        raise Internal(f"making {mount.mount_point} a shared mount (for {path}): {os.strerror(err)}")


def prepare_host(config: api_pb2.ContainerConfig) -> None:
    """The node-side work the CRI mounts of a (validated) config need, before build: a
    missing host path is made a directory, 0755, with its parents (as containerd does;
    never removed afterwards, as there), and the propagation a mount asks for is made
    possible (ensure_propagation). Idempotent."""
    for m in config.mounts:
        if not os.path.lexists(m.host_path):
            try:
                os.makedirs(m.host_path, mode=0o755, exist_ok=True)
            except OSError as exc:
                raise FailedPrecondition(
                    f"making host path {m.host_path} for a mount: {exc.strerror}"
                ) from None
        ensure_propagation(m.host_path, m.propagation)
