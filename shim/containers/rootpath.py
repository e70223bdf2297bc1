"""Paths inside a container's root filesystem, resolved as the container would see them.

An image is untrusted input: its `/etc/passwd` may be a symlink to `/etc/shadow`, its
`/etc` a symlink to `/`, a volume path may climb out through `..`. Following such links
with the host's path lookup would make the daemon read or create files on the node.
Python 3.11 has no openat2(RESOLVE_IN_ROOT), so this module walks a path one component at
a time with directory file descriptors: `..` never climbs above the root, a symlink's
target is resolved again from the root (absolute) or from its directory (relative), and
every open uses O_NOFOLLOW, so no step is ever taken by the host's own lookup.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from shim.errors import FailedPrecondition

MAX_SYMLINKS = 40  # what the kernel allows in one lookup (ELOOP after that)
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Walk:
    """A stack of directory fds from the root down to the current directory; the root
    is never popped, which is what keeps `..` inside."""

    def __init__(self, rootfs: Path) -> None:
        try:
            self.stack = [os.open(rootfs, _DIR_FLAGS)]
        except OSError as exc:
            raise FailedPrecondition(f"root filesystem {rootfs}: {exc.strerror}") from None

    @property
    def fd(self) -> int:
        return self.stack[-1]

    def to_root(self) -> None:
        while len(self.stack) > 1:
            os.close(self.stack.pop())

    def up(self) -> None:
        if len(self.stack) > 1:
            os.close(self.stack.pop())

    def down(self, name: str) -> None:
        self.stack.append(os.open(name, _DIR_FLAGS, dir_fd=self.fd))

    def close(self) -> None:
        for fd in self.stack:
            os.close(fd)
        self.stack = []


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


@contextlib.contextmanager
def _resolve(rootfs: Path, path: str, *, create_dirs: bool, mode: int = 0o755) -> Iterator[tuple[int, str]]:
    """Walk `path` inside `rootfs`; yield (fd of the directory holding the last
    component, its name), every symlink on the way resolved inside the root. The last
    component is "" when the path names a directory (the fd is that directory).
    With create_dirs, missing directories are made (mode, whatever the umask)."""
    walk = _Walk(rootfs)
    try:
        todo = deque(_parts(path))
        links = 0
        while todo:
            name = todo.popleft()
            if name == "..":
                walk.up()
                continue
            try:
                st = os.stat(name, dir_fd=walk.fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create_dirs:
                    raise
                _mkdir(walk.fd, name, mode)
                st = os.stat(name, dir_fd=walk.fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                target = os.readlink(name, dir_fd=walk.fd)
                if target.startswith("/"):
                    walk.to_root()
                todo.extendleft(reversed(_parts(target)))
            elif stat.S_ISDIR(st.st_mode):
                walk.down(name)
            elif todo:
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            else:
                yield walk.fd, name
                return
        yield walk.fd, ""
    finally:
        walk.close()


def _mkdir(dir_fd: int, name: str, mode: int) -> None:
    with contextlib.suppress(FileExistsError):  # made meanwhile: stat again decides
        os.mkdir(name, mode, dir_fd=dir_fd)
        # The daemon's umask must not decide the mode an image asked for.
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def read_file(rootfs: Path, path: str, limit: int) -> bytes | None:
    """The content of the regular file `path` inside `rootfs`, or None if it does not
    exist. FailedPrecondition when it is not a regular file (a FIFO would block the
    daemon, a device could be anything), is larger than `limit` bytes, or cannot be
    walked to (a symlink loop, a file where a directory should be)."""
    try:
        with _resolve(rootfs, path, create_dirs=False) as (dir_fd, name):
            if not name:
                raise FailedPrecondition(f"image file {path} is a directory")
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=dir_fd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise FailedPrecondition(f"image file {path} is not a regular file")
                if st.st_size > limit:
                    raise FailedPrecondition(f"image file {path} is {st.st_size} bytes, the limit is {limit}")
                data = os.read(fd, limit + 1)
            finally:
                os.close(fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FailedPrecondition(f"image file {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise FailedPrecondition(f"image file {path} is larger than {limit} bytes")
    return data


def make_dirs(rootfs: Path, path: str, mode: int = 0o755) -> None:
    """Make `path` and its missing parents inside `rootfs` as directories (mode, whatever
    the umask); existing ones are left as they are. FailedPrecondition when a component
    exists and is not a directory (or a symlink to one inside the root)."""
    try:
        with _resolve(rootfs, path, create_dirs=True, mode=mode) as (_, name):
            if name:
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot make directory {path} in the container's root: {exc.strerror}"
        ) from None
