"""Layer unpacking and overlay root filesystems, on the real kernel: owners,
modes with setuid and sticky bits, links, whiteouts, opaque dirs, hostile tars."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from shim.images.layers import LayerStore, UnsafeLayer, extract
from shim.images.store import ImageRecord, ImageStore

pytestmark = pytest.mark.root


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, data: bytes = b"", **kw: object):  # type: ignore[no-untyped-def]
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid = kind, mode, int(kw.get("uid", 0)), int(kw.get("gid", 0))  # type: ignore[call-overload]
    info.linkname = str(kw.get("link", ""))
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def put(store: ImageStore, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    store.put_blob(digest, data)
    return digest


def test_unpack_keeps_owners_modes_and_links(tmp_path: Path) -> None:
    layer = tar_of(
        entry("bin", tarfile.DIRTYPE, 0o755),
        entry("bin/su", data=b"#!/bin/sh\n", mode=0o4755, uid=0),
        entry("bin/sg", data=b"x", mode=0o2711, uid=5, gid=6),
        entry("bin/su-again", tarfile.LNKTYPE, link="bin/su"),
        entry("bin/sh", tarfile.SYMTYPE, link="/bin/busybox"),
        entry("tmp", tarfile.DIRTYPE, 0o1777),
        entry("home/app/file", data=b"app", uid=1234, gid=4321, mode=0o600),
        entry("run/fifo", tarfile.FIFOTYPE, 0o644),
        entry("dev/null", tarfile.CHRTYPE, 0o666),
    )
    dest = tmp_path / "out"
    dest.mkdir()
    blob = tmp_path / "layer.tar.gz"
    blob.write_bytes(gzip.compress(layer))
    extract(blob, dest)
    assert stat.S_IMODE(os.lstat(dest / "bin/su").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(dest / "bin/sg").st_mode) == 0o2711 and os.lstat(dest / "bin/sg").st_gid == 6
    assert stat.S_IMODE(os.lstat(dest / "tmp").st_mode) == 0o1777
    assert os.lstat(dest / "home/app/file").st_uid == 1234 and os.lstat(dest / "home/app/file").st_gid == 4321
    assert os.lstat(dest / "bin/su-again").st_ino == os.lstat(dest / "bin/su").st_ino
    assert os.readlink(dest / "bin/sh") == "/bin/busybox"
    assert stat.S_ISFIFO(os.lstat(dest / "run/fifo").st_mode)
    assert not (dest / "dev/null").exists()  # devices come from the runtime, not from layers


@pytest.mark.parametrize(
    "members",
    [
        [entry("../evil", data=b"x")],
        [entry("a/../../evil", data=b"x")],
        [entry("link", tarfile.SYMTYPE, link="/tmp"), entry("link/evil", data=b"x")],
        [entry("link", tarfile.SYMTYPE, link=".."), entry("link/evil", data=b"x")],
        [entry("hard", tarfile.LNKTYPE, link="../../etc/passwd")],
        [entry("hard", tarfile.LNKTYPE, link="/etc/passwd")],
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "through-abs-symlink",
        "through-rel-symlink",
        "hardlink-out",
        "hardlink-abs",
    ],
)
def test_hostile_layers_write_nothing_outside(tmp_path: Path, members: list) -> None:  # type: ignore[type-arg]
    box = tmp_path / "box"
    dest = box / "layer"
    dest.mkdir(parents=True)
    blob = tmp_path / "evil.tar"
    blob.write_bytes(tar_of(*members))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UnsafeLayer):
        extract(blob, dest)
    assert not (box / "evil").exists() and not (tmp_path / "evil").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_overlay_rootfs_with_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    base = put(
        store,
        tar_of(
            entry("etc", tarfile.DIRTYPE, 0o755),
            entry("etc/keep", data=b"keep"),
            entry("etc/gone", data=b"gone"),
            entry("opaque", tarfile.DIRTYPE, 0o755),
            entry("opaque/old", data=b"old"),
        ),
    )
    top = put(
        store,
        gzip.compress(
            tar_of(
                entry("etc/.wh.gone", data=b""),
                entry("opaque/.wh..wh..opq", data=b""),
                entry("opaque/new", data=b"new"),
            )
        ),
    )
    layers = LayerStore(store, tmp_path / "images" / "layers", tmp_path / "rootfs")
    image = ImageRecord(
        id="sha256:" + "a" * 64, manifest_digest="sha256:" + "b" * 64, layers=(base, top), size=0
    )
    rootfs = layers.prepare("c1", image)
    try:
        assert (rootfs / "etc/keep").read_bytes() == b"keep"
        assert not (rootfs / "etc/gone").exists()
        assert sorted(os.listdir(rootfs / "opaque")) == ["new"]
        (rootfs / "etc/written").write_text("upper")  # writable; the layers stay untouched
        assert not (layers.unpacked(base) / "etc/written").exists()
        assert any(str(rootfs) in line for line in Path("/proc/self/mountinfo").read_text().splitlines())
    finally:
        layers.release("c1")
    layers.release("c1")
    assert not any(str(rootfs) in line for line in Path("/proc/self/mountinfo").read_text().splitlines())
    assert not (tmp_path / "rootfs" / "c1").exists()
    layers.remove_unused(set())
    assert [p for p in (tmp_path / "images" / "layers").iterdir()] == []


@pytest.mark.parametrize("name", [".wh...", ".wh..", ".wh."])
def test_whiteouts_cannot_name_a_parent(tmp_path: Path, name: str) -> None:
    (tmp_path / "sibling").mkdir()
    dest = tmp_path / "layer"
    dest.mkdir()
    blob = tmp_path / "evil.tar"
    blob.write_bytes(tar_of(entry(name, data=b"")))
    with pytest.raises(UnsafeLayer):
        extract(blob, dest)
    assert (tmp_path / "sibling").is_dir() and dest.is_dir()


def test_unpacked_dirs_are_not_the_daemons_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        dest = tmp_path / "out"
        dest.mkdir()
        blob = tmp_path / "l.tar"
        blob.write_bytes(
            tar_of(entry("./", tarfile.DIRTYPE, 0o755), entry("usr/bin/tool", data=b"x", mode=0o755))
        )
        extract(blob, dest)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "usr").st_mode) == 0o755
