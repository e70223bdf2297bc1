"""The server around the sandbox calls: the calls crictl and kubelet make first,
the socket, unimplemented methods, and the generated stubs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
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
        daemon.runtime.CheckpointContainer(api_pb2.CheckpointContainerRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "RuntimeService/CheckpointContainer" in (err.value.details() or "")
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
    assert daemon.proc is not None
    assert second.returncode == 1 and f"another pyshim (pid {daemon.proc.pid})" in second.stderr
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


def test_help_and_docs_document_every_flag_and_every_setting_has_a_key() -> None:
    from shim.cli import _parser
    from shim.config import Config
    from shim.configfile import SPECS

    serve = next(
        choice
        for action in _parser()._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, choice in action.choices.items()
        if name == "serve"
    )
    flags = {o for action in serve._actions for o in action.option_strings if o.startswith("--")} - {"--help"}
    assert len(flags) > 20
    done = subprocess.run(
        [sys.executable, "-m", "shim", "serve", "--help"], capture_output=True, text=True, check=True
    )
    assert sorted(f for f in flags if f not in done.stdout) == []
    # Every Config field is a setting: a config file key and a flag of serve.
    assert sorted(spec.name for spec in SPECS) == sorted(f.name for f in dataclasses.fields(Config))
    assert {spec.flag for spec in SPECS} <= flags
    # The full reference of flags and keys is docs/configuration.md.
    reference = (ROOT / "docs" / "configuration.md").read_text()
    assert sorted(f for f in flags if f"`{f}" not in reference) == [], "flags missing from the docs"
    assert sorted(s.key for s in SPECS if f"`{s.key}`" not in reference) == [], "keys missing from the docs"


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
def test_the_wheel_holds_every_module_and_the_native_programs(tmp_path: Path) -> None:
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
    assert {"shim/pause/pyshim-pause", "shim/containers/pyshim-crun-hybrid"} <= names


@pytest.mark.root
def test_container_calls_kubelet_polls_answer_the_truth(daemon: Daemon) -> None:
    # With no container: lists are empty, Status is NOT_FOUND, Stop/Remove succeed.
    assert list(daemon.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers) == []
    assert (
        list(daemon.runtime.ListContainerStats(api_pb2.ListContainerStatsRequest(), timeout=10).stats) == []
    )
    with pytest.raises(grpc.RpcError) as err:
        daemon.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id="abc"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    daemon.runtime.StopContainer(api_pb2.StopContainerRequest(container_id="abc"), timeout=10)
    daemon.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id="abc"), timeout=10)


def _serve_argv(base: Path, socket_path: Path, root: Path, run_root: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "shim",
        "serve",
        "--socket",
        str(socket_path),
        "--root",
        str(root),
        "--run-root",
        str(run_root),
        "--netns-dir",
        str(base / "netns"),
        "--cni-conf-dir",
        str(base / "no-cni"),
        "--registry-config-dir",
        str(base / "certs.d"),
        *extra,
    ]


@pytest.mark.root
@pytest.mark.parametrize("shared", ["root", "run-root", "socket"])
def test_one_daemon_per_state_dir_and_socket_whatever_the_timing(
    daemon_factory: type[Daemon], tmp_path: Path, shared: str
) -> None:
    """Two daemons started at the same instant on one --root, --run-root or socket:
    exactly one serves, the other exits 1 with one line naming the holder."""
    net = daemon_factory(start=False)  # type: ignore[call-arg]
    for trial in range(5):
        base = tmp_path / f"trial{trial}"
        procs = []
        for n in range(2):
            own = base / f"own{n}"
            argv = _serve_argv(
                base,
                (base if shared == "socket" else own) / "s.sock",
                (base if shared == "root" else own) / "root",
                (base if shared == "run-root" else own) / "run",
                [*_network_flags(net), "--netns-dir", str(own / "netns")],
            )
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        try:
            deadline = time.monotonic() + 30
            while sum(p.poll() is not None for p in procs) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # a second daemon that would also serve has had time to
            running = [p for p in procs if p.poll() is None]
            losers = [p for p in procs if p.poll() is not None]
            assert len(running) == 1 and len(losers) == 1, f"trial {trial}: {[p.poll() for p in procs]}"
            err = losers[0].communicate()[1]
            assert losers[0].returncode == 1
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
            assert f"another pyshim (pid {running[0].pid})" in err
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    p.wait(timeout=30)
                p.communicate()


@pytest.mark.root
def test_start_up_errors_are_one_line(daemon_factory: type[Daemon], tmp_path: Path) -> None:
    net = daemon_factory(start=False)  # type: ignore[call-arg]
    for n, extra in enumerate(
        (
            ["--pause", str(tmp_path / "no-such-pause")],
            ["--pod-subnet", "not-a-subnet"],
        )
    ):
        base = tmp_path / f"b{n}"
        flags = [f for f in _network_flags(net) if f != net.pod_subnet and f != "--pod-subnet"]
        argv = _serve_argv(base, base / "s.sock", base / "root", base / "run", [*flags, *extra])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        errors = [line for line in done.stderr.splitlines() if "level=ERROR" in line]
        assert len(errors) == 1 and "event=cannot_start" in errors[0], done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.root
def test_ambiguous_id_prefix_is_invalid_argument(daemon: Daemon) -> None:
    from conftest import run_pod

    ids = [run_pod(daemon, network=api_pb2.NODE) for _ in range(17)]  # 17 ids: two share a first digit
    first = next(c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) >= 2)
    for call, request in (
        (daemon.runtime.PodSandboxStatus, api_pb2.PodSandboxStatusRequest(pod_sandbox_id=first)),
        (daemon.runtime.StopPodSandbox, api_pb2.StopPodSandboxRequest(pod_sandbox_id=first)),
        (daemon.runtime.RemovePodSandbox, api_pb2.RemovePodSandboxRequest(pod_sandbox_id=first)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=10)  # type: ignore[operator]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ambiguous" in (err.value.details() or "")
    listed = daemon.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    assert len(listed) == 17 and all(p.state == api_pb2.SANDBOX_READY for p in listed)


@pytest.mark.root
def test_each_call_logs_one_line_naming_its_sandbox(daemon: Daemon) -> None:
    from conftest import run_pod, status

    sandbox_id = run_pod(daemon, network=api_pb2.NODE)
    status(daemon, sandbox_id[:12])
    daemon.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=10)
    lines = daemon.log.read_text().splitlines()
    for name, named in (
        ("RunPodSandbox", f"sandbox={sandbox_id}"),
        ("PodSandboxStatus", f"sandbox={sandbox_id[:12]}"),
        ("StopPodSandbox", f"sandbox={sandbox_id}"),
    ):
        outcome = [line for line in lines if f"rpc={name} " in line]
        assert len(outcome) == 1 and named in outcome[0], outcome


@pytest.mark.root
def test_undecodable_and_oversized_requests_get_a_clear_status(daemon: Daemon) -> None:
    assert daemon.channel is not None
    raw = daemon.channel.unary_unary("/runtime.v1.RuntimeService/PodSandboxStatus")
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\n\x02\xff\xfe", timeout=10)  # field 1 (a string) that is not UTF-8
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "PodSandboxStatusRequest" in (err.value.details() or "")
    big = api_pb2.RunPodSandboxRequest(
        config=api_pb2.PodSandboxConfig(annotations={"a": "x" * (5 * 1024 * 1024)})
    )
    with pytest.raises(grpc.RpcError) as err:
        daemon.runtime.RunPodSandbox(big, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert daemon.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "pyshim"
    assert "Traceback" not in daemon.log.read_text()


def test_a_chrooted_daemon_warns_that_exec_sees_the_real_root(daemon: Daemon) -> None:
    from shim.procs import chrooted

    daemon.runtime.Version(api_pb2.VersionRequest(), timeout=10)
    assert ("event=chrooted" in daemon.log.read_text()) == chrooted()
