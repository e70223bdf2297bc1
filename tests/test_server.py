"""The server around the sandbox calls: the calls crictl and kubelet make first,
the socket, unimplemented methods, and the generated stubs."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import Daemon

from shim._proto import api_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_are_fresh() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.root
def test_version(daemon: Daemon) -> None:
    version = daemon.runtime.Version(api_pb2.VersionRequest(version="v1"), timeout=10)
    assert version.runtime_name == "pyshim" and version.runtime_api_version == "v1"
    assert version.runtime_version and version.version


@pytest.mark.root
def test_status_lists_both_conditions(daemon: Daemon) -> None:
    response = daemon.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=10)
    conditions = {c.type: c for c in response.status.conditions}
    assert conditions["RuntimeReady"].status is True
    assert conditions["NetworkReady"].status is True
    info = json.loads(response.info["info"])
    assert info["root"] == str(daemon.root) and info["cgroupDriver"] == "cgroupfs"
    assert daemon.runtime.Status(api_pb2.StatusRequest(), timeout=10).info == {}


@pytest.mark.root
def test_runtime_config_says_cgroupfs(daemon: Daemon) -> None:
    response = daemon.runtime.RuntimeConfig(api_pb2.RuntimeConfigRequest(), timeout=10)
    assert response.HasField("linux") and response.linux.cgroup_driver == api_pb2.CGROUPFS


def allocated(top: Path) -> tuple[int, int]:
    """Bytes allocated to `top` and everything under it, and how many inodes that is. A
    directory takes blocks on ext4 and none on tmpfs (Debian 13's /tmp): no fixed minimum."""
    entries = [top]
    for parent, dirs, files in os.walk(top):
        entries += [Path(parent, name) for name in [*dirs, *files]]
    return sum(p.lstat().st_blocks * 512 for p in entries), len(entries)


@pytest.mark.root
def test_image_fs_info_answers_on_an_empty_store(daemon: Daemon) -> None:
    images = daemon.root / "images"
    (fs,) = daemon.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10).image_filesystems
    assert fs.fs_id.mountpoint == str(images) and fs.timestamp > 0
    assert (fs.used_bytes.value, fs.inodes_used.value) == allocated(images)
    (images / "blob").write_bytes(b"x" * 10000)
    grown = daemon.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10).image_filesystems[0]
    assert (grown.used_bytes.value, grown.inodes_used.value) == allocated(images)
    assert grown.used_bytes.value >= fs.used_bytes.value + 10000
    assert grown.inodes_used.value == fs.inodes_used.value + 1


@pytest.mark.root
def test_unimplemented_methods_name_themselves(daemon: Daemon) -> None:
    with pytest.raises(grpc.RpcError) as err:
        daemon.runtime.CreateContainer(api_pb2.CreateContainerRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "RuntimeService/CreateContainer" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        list(daemon.images.StreamImages(api_pb2.StreamImagesRequest(), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "ImageService/StreamImages" in (err.value.details() or "")


@pytest.mark.root
def test_socket_is_root_owned_and_private(daemon: Daemon) -> None:
    st = daemon.socket.stat()
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0
    assert stat.S_IMODE(st.st_mode) & 0o007 == 0
    assert stat.S_IMODE(st.st_mode) & ~0o660 == 0


@pytest.mark.root
def test_stale_socket_is_replaced(daemon_factory: type[Daemon]) -> None:
    d = daemon_factory(start=False)  # type: ignore[call-arg]
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(d.socket))
    stale.close()  # the file stays, nobody listens: like a daemon that died
    d.start()
    assert d.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "pyshim"


@pytest.mark.root
def test_live_socket_and_plain_file_are_refused(daemon: Daemon, tmp_path: Path) -> None:
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "shim",
            "serve",
            "--socket",
            str(daemon.socket),
            "--root",
            str(tmp_path / "r2"),
            "--run-root",
            str(tmp_path / "rr2"),
            "--netns-dir",
            str(tmp_path / "n2"),
            *_network_flags(daemon),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0 and "another daemon is serving" in second.stderr
    assert daemon.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "pyshim"
    plain = tmp_path / "plain.sock"
    plain.write_text("precious")
    third = subprocess.run(
        [
            sys.executable,
            "-m",
            "shim",
            "serve",
            "--socket",
            str(plain),
            "--root",
            str(tmp_path / "r3"),
            "--run-root",
            str(tmp_path / "rr3"),
            "--netns-dir",
            str(tmp_path / "n3"),
            *_network_flags(daemon),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert third.returncode != 0 and "not a socket" in third.stderr
    assert plain.read_text() == "precious"


def _network_flags(daemon: Daemon) -> list[str]:
    return [
        "--bridge-name",
        daemon.bridge,
        "--pod-subnet",
        daemon.pod_subnet,
        "--nft-table",
        daemon.nft_table,
        "--no-ip-forward",
    ]


def test_help_documents_every_flag() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shim", "serve", "--help"], capture_output=True, text=True, check=True
    )
    for flag in (
        "--socket",
        "--root",
        "--run-root",
        "--netns-dir",
        "--pause",
        "--runtime-handler",
        "--log-level",
    ):
        assert flag in done.stdout


def test_pause_binary_behaves_like_kubernetes_pause() -> None:
    from shim.pause import find_pause

    pause = find_pause(None)
    assert os.access(pause, os.X_OK) and pause.name == "pyshim-pause"
    assert subprocess.run([str(pause), "-v"], capture_output=True, text=True, check=True).stdout.startswith(
        "pyshim-pause"
    )
    for signo in (signal.SIGTERM, signal.SIGINT):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = subprocess.Popen([str(pause), "--sync-fd", str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        assert ours.recv(64) == f"pid {proc.pid}".encode()
        assert ours.recv(64) == b"ready"  # handlers are installed by now
        ours.close()
        proc.send_signal(signo)
        assert proc.wait(timeout=10) == 0


def test_pause_refuses_orders_that_would_change_the_host() -> None:
    from shim.pause import find_pause

    pause = find_pause(None)
    for args in (
        ["--hostname", "evil"],
        ["--ns", "net", "--sysctl", "kernel.shmmni=1"],
        ["--sysctl", "net.x=1"],
    ):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = subprocess.Popen(
            [str(pause), "--sync-fd", str(theirs.fileno()), *args], pass_fds=[theirs.fileno()]
        )
        theirs.close()
        assert ours.recv(128).startswith(b"error ")
        ours.close()
        assert proc.wait(timeout=10) != 0


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_the_pause(tmp_path: Path) -> None:
    """What `pip install .` (scripts/serve) installs, not the editable tree the tests use."""
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("pyshim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "shim").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    assert "shim/pause/pyshim-pause" in names


@pytest.mark.root
def test_container_calls_kubelet_polls_answer_the_truth(daemon: Daemon) -> None:
    # No container can exist yet: lists are empty, Status is NOT_FOUND, Stop/Remove succeed.
    assert list(daemon.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers) == []
    assert (
        list(daemon.runtime.ListContainerStats(api_pb2.ListContainerStatsRequest(), timeout=10).stats) == []
    )
    with pytest.raises(grpc.RpcError) as err:
        daemon.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id="abc"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    daemon.runtime.StopContainer(api_pb2.StopContainerRequest(container_id="abc"), timeout=10)
    daemon.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id="abc"), timeout=10)
