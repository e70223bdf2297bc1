"""The pod sandbox lifecycle against a real daemon: namespaces, pins, modes,
idempotence, duplicates and list filters."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import Daemon, pod_config, run_pod, sandbox_pid, status, unique

from shim._proto import api_pb2

pytestmark = pytest.mark.root


def ns_inode(path: str | Path) -> int:
    return os.stat(path).st_ino


def info(daemon: Daemon, sandbox_id: str) -> dict:  # type: ignore[type-arg]
    return json.loads(status(daemon, sandbox_id, verbose=True).info["info"])


def stop(daemon: Daemon, sandbox_id: str) -> None:
    daemon.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)


def remove(daemon: Daemon, sandbox_id: str) -> None:
    daemon.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)


def listed(daemon: Daemon, **filter_fields: object) -> list[str]:
    flt = api_pb2.PodSandboxFilter(**filter_fields)  # type: ignore[arg-type]
    items = daemon.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(filter=flt), timeout=10).items
    return [p.id for p in items]


def test_run_makes_fresh_namespaces_pinned_at_recorded_paths(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon, hostname="web-1", pid=api_pb2.POD)
    assert len(sandbox_id) == 64 and all(c in "0123456789abcdef" for c in sandbox_id)
    st = status(daemon, sandbox_id).status
    assert st.state == api_pb2.SANDBOX_READY and st.created_at > 0
    details = info(daemon, sandbox_id)
    pid = details["pid"]
    assert set(details["namespaces"]) == {"net", "ipc", "uts", "pid"}
    for kind, path in details["namespaces"].items():
        assert ns_inode(f"/proc/{pid}/ns/{kind}") != ns_inode(f"/proc/self/ns/{kind}"), kind
        assert ns_inode(path) == ns_inode(f"/proc/{pid}/ns/{kind}"), kind
        assert Path(path).is_relative_to(daemon.base)
    assert Path(details["namespaces"]["net"]).parent == daemon.netns_dir
    # POD pid mode: the pause is PID 1 of its own pid namespace.
    nspid = [
        line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("NSpid:")
    ]
    assert nspid[0].split()[1:] == [str(pid), "1"]
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "pyshim-pause"
    uts = details["namespaces"]["uts"]
    hostname = subprocess.run(
        ["nsenter", f"--uts={uts}", "hostname"], capture_output=True, text=True, check=True
    )
    assert hostname.stdout.strip() == "web-1"
    net = details["namespaces"]["net"]
    links = subprocess.run(
        ["nsenter", f"--net={net}", "ip", "-o", "link"], capture_output=True, text=True, check=True
    )
    lines = links.stdout.splitlines()
    assert [line.split(":")[1].strip().split("@")[0] for line in lines] == ["lo", "eth0"]
    assert all(",UP" in line for line in lines)
    remove(daemon, sandbox_id)


def test_container_pid_mode_keeps_host_pid_namespace(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon, pid=api_pb2.CONTAINER)
    details = info(daemon, sandbox_id)
    assert set(details["namespaces"]) == {"net", "ipc", "uts"}
    assert ns_inode(f"/proc/{details['pid']}/ns/pid") == ns_inode("/proc/self/ns/pid")


def test_node_modes_share_the_host_namespaces(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon, network=api_pb2.NODE, ipc=api_pb2.NODE, pid=api_pb2.NODE, hostname="ignored")
    details = info(daemon, sandbox_id)
    assert details["namespaces"] == {}
    pid = details["pid"]
    for kind in ("net", "ipc", "uts", "pid"):
        assert ns_inode(f"/proc/{pid}/ns/{kind}") == ns_inode(f"/proc/self/ns/{kind}"), kind
    options = status(daemon, sandbox_id).status.linux.namespaces.options
    assert (options.network, options.ipc, options.pid) == (api_pb2.NODE, api_pb2.NODE, api_pb2.NODE)


def test_sysctls_are_applied_inside_the_pod(daemon: Daemon) -> None:
    host_files = [Path("/proc/sys/kernel/shmmni"), Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")]
    host_before = [f.read_text() for f in host_files]
    sandbox_id = run_pod(
        daemon, sysctls={"net.ipv4.ip_unprivileged_port_start": "80", "kernel.shmmni": "1000"}
    )
    details = info(daemon, sandbox_id)
    for kind, key, value in (
        ("net", "net/ipv4/ip_unprivileged_port_start", "80"),
        ("ipc", "kernel/shmmni", "1000"),
    ):
        got = subprocess.run(
            ["nsenter", f"--{kind}={details['namespaces'][kind]}", "cat", f"/proc/sys/{key}"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert got.stdout.strip() == value
    assert [f.read_text() for f in host_files] == host_before


def test_status_echoes_the_request(daemon: Daemon) -> None:
    config = pod_config(
        labels={"app": "web", "tier": "a"}, annotations={"note": "x" * 1000, "k8s/a": ""}, attempt=3
    )
    sandbox_id = run_pod(daemon, config)
    st = status(daemon, sandbox_id).status
    assert st.metadata == config.metadata
    assert dict(st.labels) == dict(config.labels) and dict(st.annotations) == dict(config.annotations)
    assert st.runtime_handler == "crun"  # the default handler
    assert status(daemon, sandbox_id).info == {}  # only with verbose
    details = info(daemon, sandbox_id)
    assert details["config"]["metadata"]["name"] == config.metadata.name
    assert details["config"]["annotations"]["note"] == "x" * 1000


def test_stop_then_remove_leaves_nothing(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon, pid=api_pb2.POD)
    details = info(daemon, sandbox_id)
    stop(daemon, sandbox_id)
    assert status(daemon, sandbox_id).status.state == api_pb2.SANDBOX_NOTREADY
    assert (
        not Path(f"/proc/{details['pid']}").exists()
        or "Z" in Path(f"/proc/{details['pid']}/stat").read_text()
    )
    for path in details["namespaces"].values():
        assert not Path(path).exists()
    stop(daemon, sandbox_id)  # again: still fine, still NOTREADY
    assert status(daemon, sandbox_id).status.state == api_pb2.SANDBOX_NOTREADY
    remove(daemon, sandbox_id)
    remove(daemon, sandbox_id)
    with pytest.raises(grpc.RpcError) as err:
        status(daemon, sandbox_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert listed(daemon) == []
    assert list((daemon.root / "sandboxes").iterdir()) == []
    assert list((daemon.run_root / "sandboxes").iterdir()) == []
    assert list(daemon.netns_dir.iterdir()) == []


def test_remove_without_stop_cleans_everything(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon)
    pid = sandbox_pid(daemon, sandbox_id)
    remove(daemon, sandbox_id)
    assert listed(daemon) == []
    assert not Path(f"/proc/{pid}/cmdline").exists() or Path(f"/proc/{pid}/cmdline").read_bytes() == b""


def test_unknown_ids_stop_and_remove_succeed_status_is_not_found(daemon: Daemon) -> None:
    for unknown in ("0" * 64, "deadbeef", "8c6c5b5e-4f0e-4b8f-9a8e-1f1d5c3e2a10"):
        stop(daemon, unknown)
        remove(daemon, unknown)
    with pytest.raises(grpc.RpcError) as err:
        status(daemon, "0" * 64)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not found" in (err.value.details() or "")


def test_id_prefix_is_accepted(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon)
    assert status(daemon, sandbox_id[:8]).status.id == sandbox_id
    assert listed(daemon, id=sandbox_id[:10]) == [sandbox_id]
    stop(daemon, sandbox_id[:12])
    assert status(daemon, sandbox_id).status.state == api_pb2.SANDBOX_NOTREADY


def test_retried_run_returns_the_ready_sandbox(daemon: Daemon) -> None:
    config = pod_config()
    first = run_pod(daemon, config)
    assert run_pod(daemon, config) == first
    assert listed(daemon) == [first]
    # Another attempt is another sandbox.
    config.metadata.attempt = 1
    second = run_pod(daemon, config)
    assert second != first


def test_concurrent_duplicates_get_one_sandbox(daemon: Daemon) -> None:
    config = pod_config()
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(run_pod(daemon, config))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert listed(daemon) == [results[0]]


def test_duplicate_of_notready_sandbox_is_already_exists(daemon: Daemon) -> None:
    config = pod_config()
    first = run_pod(daemon, config)
    stop(daemon, first)
    with pytest.raises(grpc.RpcError) as err:
        run_pod(daemon, config)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first in (err.value.details() or "")
    remove(daemon, first)
    assert run_pod(daemon, config) != first  # the name is free again


def test_list_filters(daemon: Daemon) -> None:
    a = run_pod(daemon, labels={"app": "a", "tier": "front"})
    b = run_pod(daemon, labels={"app": "b", "tier": "front"})
    c = run_pod(daemon, labels={"app": "c"})
    stop(daemon, c)
    assert set(listed(daemon)) == {a, b, c}
    assert listed(daemon)[0] == c  # newest first
    # The unfiltered list (kubelet's relist) shows the state as it is now.
    states = {
        p.id: p.state
        for p in daemon.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    }
    assert states == {a: api_pb2.SANDBOX_READY, b: api_pb2.SANDBOX_READY, c: api_pb2.SANDBOX_NOTREADY}
    assert set(listed(daemon, label_selector={"tier": "front"})) == {a, b}
    assert listed(daemon, label_selector={"tier": "front", "app": "b"}) == [b]
    assert listed(daemon, label_selector={"app": "nope"}) == []
    ready = api_pb2.PodSandboxStateValue(state=api_pb2.SANDBOX_READY)
    notready = api_pb2.PodSandboxStateValue(state=api_pb2.SANDBOX_NOTREADY)
    assert set(listed(daemon, state=ready)) == {a, b}
    assert listed(daemon, state=notready) == [c]
    assert listed(daemon, id=a) == [a]
    assert listed(daemon, id=a, state=notready) == []
    assert listed(daemon, id="0" * 64) == []
    assert listed(daemon, id="not-hex") == []


def test_list_item_carries_metadata_labels_annotations(daemon: Daemon) -> None:
    config = pod_config(labels={"app": "x"}, annotations={"a": "b"}, attempt=2)
    sandbox_id = run_pod(daemon, config)
    item = daemon.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items[0]
    assert item.id == sandbox_id and item.metadata == config.metadata
    assert dict(item.labels) == {"app": "x"} and dict(item.annotations) == {"a": "b"}
    assert item.state == api_pb2.SANDBOX_READY and item.created_at > 0 and item.runtime_handler == "crun"


def test_many_concurrent_runs_get_distinct_ready_sandboxes(daemon: Daemon) -> None:
    prefix = unique("c")
    ids: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(10):
            sandbox_id = run_pod(
                daemon, name=f"{prefix}-{n}-{i}", pid=api_pb2.POD if i % 2 else api_pb2.CONTAINER
            )
            with lock:
                ids.append(sandbox_id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 60
    pids = {sandbox_pid(daemon, i) for i in ids}
    assert len(pids) == 60
    assert all(status(daemon, i).status.state == api_pb2.SANDBOX_READY for i in ids)
    removers = [threading.Thread(target=remove, args=(daemon, i)) for i in ids]
    for t in removers:
        t.start()
    for t in removers:
        t.join()
    assert listed(daemon) == []


def test_pause_reaps_orphans_in_the_pod_pid_namespace(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon, pid=api_pb2.POD)
    details = info(daemon, sandbox_id)
    # sh exits at once; its background child is re-parented to the pause (PID 1 there).
    subprocess.run(
        ["nsenter", f"--pid={details['namespaces']['pid']}", "sh", "-c", "sleep 0.3 & exit 0"], check=True
    )
    children_file = Path(f"/proc/{details['pid']}/task/{details['pid']}/children")
    deadline = time.monotonic() + 10
    while children_file.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children_file.read_text().strip() == ""  # exited and reaped: no zombie left
    assert status(daemon, sandbox_id).status.state == api_pb2.SANDBOX_READY


def test_pauses_hold_no_stray_file_descriptors(daemon: Daemon) -> None:
    # Made concurrently: a descriptor of one Run must not leak into another's pause.
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(run_pod(daemon))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sandbox_id in ids:
        pid = sandbox_pid(daemon, sandbox_id)
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")) == [0, 1, 2]


def test_names_as_critest_sends_them_are_accepted(daemon: Daemon) -> None:
    name = "PodSandbox-for-creating-performance-test-4e3ade6e"
    sandbox_id = run_pod(daemon, name=name, namespace="Bench-ns")
    assert status(daemon, sandbox_id).status.metadata.name == name
