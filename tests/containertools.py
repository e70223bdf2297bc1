"""Containers for the tests: a busybox image built here from Debian's busybox-static
(imported into a daemon's store like an air-gapped node's image), and request helpers."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path

from conftest import Daemon
from imagetools import oci_layout

from shim._proto import api_pb2

IMAGE = "pyshim.test/busybox:1"
_APPLET_NAMES = (
    "sh cat echo env hostname id ip ls mkdir nc ps pwd readlink rm sleep stat sync tail test "
    "touch true false uname wc yes dd head grep seq kill nproc ifconfig nslookup wget"
)
APPLETS = tuple(_APPLET_NAMES.split())
PASSWD = (
    b"root:x:0:0:root:/root:/bin/sh\n"
    b"nobody:x:65534:65534:nobody:/:/bin/false\n"
    b"app:x:1000:1000::/home/app:/bin/sh\n"
)
GROUP = b"root:x:0:\nnobody:x:65534:\napp:x:1000:\nextra:x:2000:app\nother:x:3000:nobody,app\n"


def static_busybox() -> Path:
    """Debian's busybox-static (installed by scripts/install-system-deps test): static,
    so it runs in a root filesystem that has no libraries."""
    listed = subprocess.run(
        ["dpkg-query", "-L", "busybox-static"], capture_output=True, text=True, check=False
    )
    paths = [line for line in listed.stdout.splitlines() if line.endswith("bin/busybox")]
    assert paths, "busybox-static is not installed: run scripts/install-system-deps test"
    return Path(paths[0])


def busybox_layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(
            name: str, kind: bytes = tarfile.DIRTYPE, mode: int = 0o755, data: bytes = b"", link: str = ""
        ) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size, info.linkname = kind, mode, len(data), link
            tar.addfile(info, io.BytesIO(data) if data else None)

        for d in ("bin", "etc", "root", "home", "home/app", "proc", "sys", "dev", "var", "usr"):
            add(d)
        add("tmp", mode=0o1777)
        add("bin/busybox", tarfile.REGTYPE, 0o755, static_busybox().read_bytes())
        for applet in APPLETS:
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add("etc/passwd", tarfile.REGTYPE, 0o644, PASSWD)
        add("etc/group", tarfile.REGTYPE, 0o644, GROUP)
    return buf.getvalue()


def busybox_archive(directory: Path, config: dict[str, object] | None = None) -> Path:
    """An OCI image layout tar of the busybox image."""
    layout = directory / "layout"
    oci_layout(
        layout,
        "1",
        [busybox_layer()],
        config=config
        or {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "StopSignal": "SIGTERM"},
    )
    archive = directory / "busybox.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(layout)), recursive=False)
    return archive


def import_image(daemon: Daemon, archive: Path, name: str = IMAGE) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shim",
            "images",
            "import",
            str(archive),
            "--root",
            str(daemon.root),
            "--name",
            name,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()[0]


# Ends on SIGTERM, as a well-behaved container does: busybox's sleep as PID 1 would not.
SLEEPER = ("sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait")


def container_config(
    name: str,
    command: Iterable[str] = SLEEPER,
    *,
    image: str = IMAGE,
    args: Iterable[str] = (),
    log_path: str = "",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    envs: dict[str, str] | None = None,
    attempt: int = 0,
) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name, attempt=attempt),
        image=api_pb2.ImageSpec(image=image),
        command=list(command),
        args=list(args),
        log_path=log_path or f"{name}/{attempt}.log",
        labels=labels or {},
        annotations=annotations or {},
        envs=[api_pb2.KeyValue(key=k, value=v.encode()) for k, v in (envs or {}).items()],
    )


def create(
    daemon: Daemon, pod_id: str, config: api_pb2.ContainerConfig, pod: api_pb2.PodSandboxConfig | None = None
) -> str:
    request = api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod or api_pb2.PodSandboxConfig()
    )
    return str(daemon.runtime.CreateContainer(request, timeout=60).container_id)


def start(daemon: Daemon, container_id: str) -> None:
    daemon.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=container_id), timeout=60)


def run(daemon: Daemon, pod_id: str, config: api_pb2.ContainerConfig) -> str:
    container_id = create(daemon, pod_id, config)
    start(daemon, container_id)
    return container_id


def status(daemon: Daemon, container_id: str, verbose: bool = False) -> api_pb2.ContainerStatusResponse:
    return daemon.runtime.ContainerStatus(
        api_pb2.ContainerStatusRequest(container_id=container_id, verbose=verbose), timeout=10
    )


def info(daemon: Daemon, container_id: str) -> dict:  # type: ignore[type-arg]
    return json.loads(status(daemon, container_id, verbose=True).info["info"])  # type: ignore[no-any-return]


def exec_sync(daemon: Daemon, container_id: str, *cmd: str, timeout: int = 0) -> api_pb2.ExecSyncResponse:
    return daemon.runtime.ExecSync(
        api_pb2.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout), timeout=60
    )


def wait_state(daemon: Daemon, container_id: str, state: int, timeout: float = 20) -> api_pb2.ContainerStatus:
    deadline = time.monotonic() + timeout
    while True:
        current = status(daemon, container_id).status
        if current.state == state or time.monotonic() > deadline:
            return current
        time.sleep(0.05)
