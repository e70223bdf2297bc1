"""Layers unpacked once per digest, and container root filesystems on overlayfs.

Extraction is done by hand, not with tarfile's extraction filters: those strip
setuid/setgid/sticky bits, which images rely on (a setuid `su`, a 1777 `/tmp`).
Every member is checked instead: no absolute name, no `..`, no parent that is a
symlink (so nothing lands outside the layer dir), hard links only to paths inside
the layer. OCI whiteouts become overlayfs ones: `.wh.NAME` a 0:0 character device,
`.wh..wh..opq` the `trusted.overlay.opaque` xattr on its directory. Block and
character devices in a layer are skipped (a container gets its /dev from the
runtime); FIFOs are made.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO

from shim import mounts
from shim.errors import DataLoss, FailedPrecondition, Internal
from shim.images.store import ImageRecord, ImageStore

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
_MAX_MOUNT_DATA = 4000  # overlayfs' options must fit a page


class UnsafeLayer(DataLoss):
    """A layer tried to write outside its directory, or is not a tar we can read."""


def _open_layer(path: Path) -> IO[bytes]:
    raw = open(path, "rb")  # noqa: SIM115 - handed to tarfile, closed by the caller
    magic = raw.read(4)
    raw.seek(0)
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        raw.close()
        raise FailedPrecondition(f"layer {path.name} is zstd-compressed, which pyshim does not read yet")
    return raw


def extract(layer: Path, dest: Path) -> None:
    """Unpack one layer blob (tar, tar+gzip) into `dest`, which must be empty."""
    with _open_layer(layer) as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    _extract_member(tar, member, dest)
        except (tarfile.TarError, EOFError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Internal(f"unpacking layer {layer.name}: {exc.strerror}") from exc
            raise UnsafeLayer(f"layer {layer.name} is not a readable tar: {exc}") from exc


def _safe_name(name: str) -> PurePosixPath | None:
    path = PurePosixPath(name.lstrip("/"))
    parts = [p for p in path.parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeLayer(f"layer member {name!r} climbs out with '..'")
    return PurePosixPath(*parts) if parts else None


def _parent_dir(dest: Path, rel: PurePosixPath) -> Path:
    """The member's parent inside dest, made if missing; never through a symlink."""
    current = dest
    for part in rel.parent.parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current)
            os.chmod(current, 0o755)  # explicit: the daemon's umask is 077
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise UnsafeLayer(f"layer member {str(rel)!r} goes through {part!r}, which is not a directory")
    return current


def _clear(target: Path, keep_dir: bool) -> None:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if keep_dir:
            return
        shutil.rmtree(target)
    else:
        os.unlink(target)


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    rel = _safe_name(member.name)
    if rel is None:
        if member.isdir():  # "./": the layer's root directory
            os.chown(dest, member.uid, member.gid)
            os.chmod(dest, member.mode & 0o7777)
        return
    parent = _parent_dir(dest, rel)
    name = rel.name
    target = parent / name
    if name == OPAQUE:
        os.setxattr(parent, "trusted.overlay.opaque", b"y")
        return
    if name.startswith(WHITEOUT_PREFIX):
        hidden_name = name[len(WHITEOUT_PREFIX) :]
        if hidden_name in ("", ".", "..") or "/" in hidden_name:
            raise UnsafeLayer(f"layer member {member.name!r} is not a whiteout of a name in its directory")
        hidden = parent / hidden_name
        _clear(hidden, keep_dir=False)
        os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        return
    _clear(target, keep_dir=member.isdir())
    if member.isdir():
        if not target.exists():
            os.mkdir(target, 0o700)
    elif member.isreg():
        source = tar.extractfile(member)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            if source is not None:
                shutil.copyfileobj(source, out, 1024 * 1024)
    elif member.issym():
        os.symlink(member.linkname, target)  # never followed by us; only inside the container
    elif member.islnk():
        link_rel = _safe_name(member.linkname)
        if link_rel is None:
            raise UnsafeLayer(f"hard link {member.name!r} has no target")
        source_path = _parent_dir(dest, link_rel) / link_rel.name
        if not os.path.lexists(source_path):
            raise UnsafeLayer(f"hard link {member.name!r} points at {member.linkname!r}, not in this layer")
        os.link(source_path, target, follow_symlinks=False)
        return  # a hard link shares its target's owner and mode
    elif member.isfifo():
        os.mkfifo(target, 0o600)
    else:
        log.info("event=layer_member_skipped name=%s type=%r", member.name, member.type)
        return
    # Owner first: chown clears setuid/setgid, so the mode comes after it.
    os.chown(target, member.uid, member.gid, follow_symlinks=False)
    if not member.issym():
        os.chmod(target, member.mode & 0o7777)
        os.utime(target, (member.mtime, member.mtime))


class LayerStore:
    """Unpacked layers under DIR/<hex of blob digest>, and overlay root filesystems."""

    def __init__(self, images: ImageStore, directory: Path, mounts_dir: Path) -> None:
        self.images = images
        self.directory = directory
        self.mounts_dir = mounts_dir
        for d in (directory, mounts_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in directory.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # an unpack a crash interrupted
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        # Layers under live root filesystems (the containers' own): never removed.
        self.in_use: Callable[[], set[str]] = set

    def unpacked(self, digest: str) -> Path:
        """The layer's directory, unpacking it the first time (once, even concurrently)."""
        target = self.directory / digest.removeprefix("sha256:")
        with self._lock_of(digest):
            if target.exists():
                return target
            tmp = self.directory / f".tmp-{target.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            os.chmod(tmp, 0o755)  # a layer's root; its own "./" entry may say otherwise
            try:
                extract(self.images.blob_path(digest), tmp)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def prepare(self, key: str, image: ImageRecord) -> Path:
        """A writable root filesystem for `key` (a container id): overlay of the image's
        layers with an upper and work dir of its own. Returns the mounted rootfs."""
        base = self.mounts_dir / key
        lower = ":".join(str(self.unpacked(d)) for d in reversed(image.layers))
        options = f"lowerdir={lower},upperdir={base / 'upper'},workdir={base / 'work'}"
        if len(options) > _MAX_MOUNT_DATA:
            raise FailedPrecondition(f"image {image.id} has too many layers for one overlay mount")
        for d in ("upper", "work", "rootfs"):
            (base / d).mkdir(parents=True, exist_ok=True)
            os.chmod(base / d, 0o755)  # the upper dir is the container's "/": not the umask's 0700
        rootfs = base / "rootfs"
        try:
            mounts.mount("overlay", rootfs, "overlay", 0, options)
        except Internal as exc:
            shutil.rmtree(base, ignore_errors=True)
            raise Internal(f"the root filesystem of {key}: {exc}") from None
        return rootfs

    def release(self, key: str) -> None:
        """Unmount and delete; idempotent."""
        base = self.mounts_dir / key
        mounts.umount(base / "rootfs")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(base)

    def remove_unused(self, live_layers: set[str]) -> None:
        """Delete unpacked layers no image and no container uses any more. A layer
        under a container's root filesystem stays (with the container) even after its
        image is removed, as containerd keeps a removed image's snapshots in use."""
        for path in self.directory.iterdir():
            digest = f"sha256:{path.name}"
            if path.name.startswith(".") or digest in live_layers:
                continue
            # Under the layer's own lock, checked again: a container being made registers
            # its layers before it unpacks or mounts them, which waits for this lock.
            with self._lock_of(digest):
                if digest not in self.in_use():
                    shutil.rmtree(path, ignore_errors=True)

    def _lock_of(self, digest: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(digest, threading.Lock())
