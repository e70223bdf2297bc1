"""Pinning namespaces: a bind mount of /proc/PID/ns/KIND onto a file keeps the
namespace alive at a stable path, independent of the process that made it.

Pin and unpin are the only mount operations of the daemon. Unpin is idempotent
(a missing file or a file that is no longer a mount point means done).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shim import mounts
from shim.errors import Internal

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
    try:
        mounts.mount(f"/proc/{pid}/ns/{kind}", target, None, mounts.MS_BIND)
    except Internal as exc:
        target.unlink(missing_ok=True)
        raise Internal(f"pinning {kind} namespace of pid {pid}: {exc}") from None


def unpin(target: Path) -> None:
    """Unmount and delete a pin. Done already (ENOENT, EINVAL) counts as success."""
    mounts.umount(target)
    target.unlink(missing_ok=True)
