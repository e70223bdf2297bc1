"""mount(2) and umount2(2) for the few mounts the daemon makes itself: namespace
pins (binds), overlay root filesystems, and each pod's /dev/shm (tmpfs).

Unmounting is idempotent: a path that is missing or no longer a mount point is done.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from shim.errors import Internal

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_SHARED = 1 << 20
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str, target: Path, fstype: str | None, flags: int = 0, data: str = "") -> None:
    """Raise Internal naming the target and the kernel's reason on failure."""
    result = _libc.mount(
        source.encode(), bytes(target), fstype.encode() if fstype else None, flags, data.encode() or None
    )
    if result != 0:
        err = ctypes.get_errno()
        raise Internal(f"mounting {source} on {target}: {os.strerror(err)}")


def umount(target: Path) -> None:
    """Lazily unmount; done already (ENOENT, EINVAL: not a mount point) is fine."""
    if _libc.umount2(bytes(target), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.ENOENT, errno.EINVAL):
            raise Internal(f"unmounting {target}: {os.strerror(err)}")
