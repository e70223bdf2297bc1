"""A busybox image for benchmarks, built here from Debian's busybox-static (as the tests
build theirs) and imported into a daemon's store with `pyshim images import`, as on an
air-gapped node: no registry needed."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

IMAGE = "pyshim.bench/busybox:1"
APPLETS = ("sh", "sleep", "true", "cat", "echo", "ls", "ps")
_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def static_busybox() -> Path:
    """Debian's busybox-static: static, so it runs in a root filesystem without libraries."""
    listed = subprocess.run(["dpkg-query", "-L", "busybox-static"], capture_output=True, text=True)
    paths = [line for line in listed.stdout.splitlines() if line.endswith("bin/busybox")]
    if not paths:
        raise SystemExit("busybox-static is not installed: run scripts/install-system-deps test")
    return Path(paths[0])


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _entry(
    name: str, kind: bytes, mode: int, data: bytes = b"", link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    return info, data


def layer() -> bytes:
    entries = [_entry(d, tarfile.DIRTYPE, 0o755) for d in ("bin", "etc", "root", "proc", "sys", "dev")]
    entries.append(_entry("tmp", tarfile.DIRTYPE, 0o1777))
    entries.append(_entry("bin/busybox", tarfile.REGTYPE, 0o755, static_busybox().read_bytes()))
    entries += [_entry(f"bin/{a}", tarfile.SYMTYPE, 0o777, link="busybox") for a in APPLETS]
    entries.append(_entry("etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/root:/bin/sh\n"))
    entries.append(_entry("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\n"))
    return _tar(entries)


def archive(path: Path) -> Path:
    """An OCI image layout tar with the one-layer busybox image."""
    blobs: dict[str, bytes] = {}

    def put(data: bytes, media_type: str) -> dict[str, object]:
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    rootfs = layer()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "StopSignal": "SIGTERM"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(rootfs).hexdigest()}"]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": _OCI_MANIFEST,
        "config": put(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [put(rootfs, "application/vnd.oci.image.layer.v1.tar")],
    }
    top = put(json.dumps(manifest).encode(), _OCI_MANIFEST)
    top["annotations"] = {"org.opencontainers.image.ref.name": "1"}
    files = [
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
        ("index.json", json.dumps({"schemaVersion": 2, "manifests": [top]}).encode()),
        *((f"blobs/sha256/{d.removeprefix('sha256:')}", data) for d, data in blobs.items()),
    ]
    dirs = [_entry(d, tarfile.DIRTYPE, 0o755) for d in ("blobs", "blobs/sha256")]
    path.write_bytes(_tar([*dirs, *(_entry(n, tarfile.REGTYPE, 0o644, data) for n, data in files)]))
    return path


def import_image(root: Path, workdir: Path, name: str = IMAGE) -> str:
    """Import the image into the store of the daemon whose --root is `root`; its id."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shim",
            "images",
            "import",
            str(archive(workdir / "busybox.tar")),
            "--root",
            str(root),
            "--name",
            name,
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"importing the busybox image failed: {done.stderr.strip()}")
    return done.stdout.split()[0]
