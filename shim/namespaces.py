"""Pinning namespaces: a bind mount of /proc/PID/ns/KIND onto a file keeps the
namespace alive at a stable path, independent of the process that made it.

Pin and unpin are the only mount operations of the daemon. Unpin is idempotent
(a missing file or a file that is no longer a mount point means done).
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from shim.errors import Internal

_MS_BIND = 4096
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

KINDS = ("net", "ipc", "uts", "pid")


@dataclass(frozen=True, slots=True)
class NamespacePaths:
    """Where each namespace the sandbox created is pinned; absent kinds are the host's."""

    paths: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, mapping: dict[str, str]) -> NamespacePaths:
        return cls(tuple(sorted(mapping.items())))

    def as_dict(self) -> dict[str, str]:
        return dict(self.paths)

    def get(self, kind: str) -> str | None:
        return self.as_dict().get(kind)


def pin(pid: int, kind: str, target: Path) -> None:
    """Bind-mount the namespace of `pid` onto `target` (created; must not exist)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    os.close(fd)
    source = f"/proc/{pid}/ns/{kind}".encode()
    if _libc.mount(source, bytes(target), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        target.unlink(missing_ok=True)
        raise Internal(f"pinning {kind} namespace of pid {pid} at {target}: {os.strerror(err)}")


def unpin(target: Path) -> None:
    """Unmount and delete a pin. Done already (ENOENT, EINVAL) counts as success."""
    if _libc.umount2(bytes(target), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.ENOENT, errno.EINVAL):
            raise Internal(f"unpinning {target}: {os.strerror(err)}")
    target.unlink(missing_ok=True)
