"""Pods' and containers' cgroups as kubelet expects them, UpdateContainerResources,
and the stats calls."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from cgrouptools import cgroups_under, remove_cgroups_under
from conftest import Daemon, pod_config
from containertools import container_config, create, exec_sync, info, run

from shim._proto import api_pb2
from shim.cgroups import Cgroups, Limits

pytestmark = pytest.mark.root


def run_pod(daemon: Daemon, config: api_pb2.PodSandboxConfig) -> str:
    config.log_directory = str(daemon.base / "logs" / config.metadata.name)
    return str(
        daemon.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=30).pod_sandbox_id
    )


def cgroup_of(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise AssertionError(f"no {controller} line for {pid}")


def memory_limit(cgroup: str) -> int:
    return int(Path(f"/sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes").read_text())


def test_pyshim_makes_the_pod_cgroup_when_none_is_named_and_removes_it(cdaemon: Daemon) -> None:
    config = pod_config()
    config.linux.resources.memory_limit_in_bytes = 256 * 1024 * 1024
    config.linux.overhead.memory_limit_in_bytes = 64 * 1024 * 1024
    sandbox_id = run_pod(cdaemon, config)
    parent = f"{cdaemon.cgroup_root}/{sandbox_id}"
    pause = info_of_pod(cdaemon, sandbox_id)["pid"]
    for controller in ("memory", "pids", "name=systemd"):
        assert cgroup_of(pause, controller) == f"{parent}/pyshim-{sandbox_id}"
    assert Path(f"/sys/fs/cgroup/cpu{parent}/pyshim-{sandbox_id}/cpu.shares").read_text().strip() == "2"
    assert memory_limit(parent) == 320 * 1024 * 1024  # resources plus overhead: pyshim made it
    container_id = run(cdaemon, sandbox_id, container_config("c"))
    pid = info(cdaemon, container_id)["pid"]
    assert cgroup_of(pid, "memory") == f"{parent}/pyshim-{container_id}"
    assert cgroup_of(pid, "name=systemd") == f"{parent}/pyshim-{container_id}"
    monitor = info(cdaemon, container_id)["monitorPid"]
    assert cgroup_of(monitor, "memory") == f"{parent}/pyshim-conmon-{container_id}"  # never the daemon's
    cdaemon.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60)
    assert [d for d in cgroups_under(cdaemon.cgroup_root) if sandbox_id in d] == []


def test_a_cgroup_parent_kubelet_made_is_left_to_kubelet(cdaemon: Daemon) -> None:
    cgroups = Cgroups()
    parent = f"/pyshim-test-kube{cdaemon.tag}/besteffort/podabc"
    made = cgroups.make(parent)
    try:
        cgroups.set_limits(parent, limits := _limits(128 * 1024 * 1024))
        config = pod_config()
        config.linux.cgroup_parent = parent
        config.linux.resources.memory_limit_in_bytes = 999 * 1024 * 1024  # kubelet's job, not ours
        sandbox_id = run_pod(cdaemon, config)
        assert memory_limit(parent) == limits.memory_limit
        run(cdaemon, sandbox_id, container_config("c"))
        cdaemon.runtime.RemovePodSandbox(
            api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60
        )
        # The pod's own children are gone; the parent is kubelet's and stays.
        assert sorted(cgroups_under(parent)) == sorted(d for d in made if d.endswith(parent))
    finally:
        remove_cgroups_under(f"/pyshim-test-kube{cdaemon.tag}")


def test_a_later_sandbox_of_the_same_pod_keeps_the_cgroups_it_shares(cdaemon: Daemon) -> None:
    """kubelet makes a pod's cgroup in every hierarchy but devices, and a replaced
    sandbox (its pause died) is removed while the next one of the pod lives in the
    same parent: the removal succeeds, and leaves the live one's cgroups alone."""
    cgroups = Cgroups()
    top = f"/pyshim-test-kube{cdaemon.tag}"
    parent = f"{top}/burstable/podabc"
    for directory in reversed(cgroups.make(parent)):
        if "/devices/" in directory:
            Path(directory).rmdir()
    try:
        first_config, second_config = pod_config(name="web"), pod_config(name="web", attempt=1)
        for config in (first_config, second_config):
            config.metadata.uid = "podabc"
            config.linux.cgroup_parent = parent
        first = run_pod(cdaemon, first_config)
        second = run_pod(cdaemon, second_config)
        run(cdaemon, second, container_config("c"))
        cdaemon.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=first), timeout=60)
        pause = info_of_pod(cdaemon, second)["pid"]
        assert cgroup_of(pause, "devices") == f"{parent}/pyshim-{second}"
        assert cgroup_of(pause, "memory") == f"{parent}/pyshim-{second}"
        assert [d for d in cgroups_under(top) if first in d] == []
        cdaemon.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=second), timeout=60)
        assert [d for d in cgroups_under(parent) if d.rsplit("/", 1)[-1].startswith("pyshim-")] == []
        assert Path(f"/sys/fs/cgroup/memory{parent}").is_dir()  # kubelet's, left to kubelet
    finally:
        remove_cgroups_under(top)


def test_update_container_resources_changes_limits_live(cdaemon: Daemon) -> None:
    sandbox_id = run_pod(cdaemon, pod_config())
    config = container_config("c")
    config.linux.resources.memory_limit_in_bytes = 64 * 1024 * 1024
    container_id = run(cdaemon, sandbox_id, config)
    cgroup = cgroup_of(info(cdaemon, container_id)["pid"], "memory")
    assert memory_limit(cgroup) == 64 * 1024 * 1024
    update = api_pb2.LinuxContainerResources(memory_limit_in_bytes=96 * 1024 * 1024, cpu_shares=512)
    cdaemon.runtime.UpdateContainerResources(
        api_pb2.UpdateContainerResourcesRequest(container_id=container_id, linux=update), timeout=30
    )
    assert memory_limit(cgroup) == 96 * 1024 * 1024
    assert Path(f"/sys/fs/cgroup/cpu{cgroup}/cpu.shares").read_text().strip() == "512"
    status = cdaemon.runtime.ContainerStatus(
        api_pb2.ContainerStatusRequest(container_id=container_id), timeout=10
    )
    assert status.status.resources.linux.memory_limit_in_bytes == 96 * 1024 * 1024
    with pytest.raises(grpc.RpcError) as err:
        bad = api_pb2.LinuxContainerResources(cpu_period=5)
        cdaemon.runtime.UpdateContainerResources(
            api_pb2.UpdateContainerResourcesRequest(container_id=container_id, linux=bad), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stats_count_cpu_memory_the_writable_layer_and_the_network(cdaemon: Daemon) -> None:
    sandbox_id = run_pod(cdaemon, pod_config())
    script = "dd if=/dev/zero of=/big bs=1M count=8; sleep 3600"
    container_id = run(cdaemon, sandbox_id, container_config("busy", ["sh", "-c", script]))
    exec_sync(cdaemon, container_id, "sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")
    time.sleep(0.3)
    first = cdaemon.runtime.ContainerStats(
        api_pb2.ContainerStatsRequest(container_id=container_id), timeout=10
    ).stats
    assert first.attributes.id == container_id and first.attributes.metadata.name == "busy"
    assert first.cpu.usage_core_nano_seconds.value > 0
    assert first.memory.working_set_bytes.value > 0
    assert (
        first.writable_layer.used_bytes.value >= 8 * 1024 * 1024
        and first.writable_layer.inodes_used.value >= 1
    )
    listed = cdaemon.runtime.ListContainerStats(api_pb2.ListContainerStatsRequest(), timeout=10).stats
    assert [s.attributes.id for s in listed] == [container_id]
    second = cdaemon.runtime.ListContainerStats(api_pb2.ListContainerStatsRequest(), timeout=10).stats[0]
    assert second.cpu.HasField("usage_nano_cores")  # a rate, from two readings
    pod = cdaemon.runtime.PodSandboxStats(
        api_pb2.PodSandboxStatsRequest(pod_sandbox_id=sandbox_id), timeout=10
    )
    linux = pod.stats.linux
    assert pod.stats.attributes.id == sandbox_id
    assert linux.memory.working_set_bytes.value >= first.memory.working_set_bytes.value
    assert linux.network.default_interface.name == "eth0" and linux.process.process_count.value >= 2
    assert [c.attributes.id for c in linux.containers] == [container_id]
    every = cdaemon.runtime.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(), timeout=10).stats
    assert [s.attributes.id for s in every] == [sandbox_id]


def test_an_image_in_use_can_be_removed_and_its_layers_stay(cdaemon: Daemon) -> None:
    sandbox_id = run_pod(cdaemon, pod_config())
    container_id = run(cdaemon, sandbox_id, container_config("c"))
    layers = list((cdaemon.root / "images" / "layers").iterdir())
    assert layers
    image = api_pb2.ImageSpec(image="pyshim.test/busybox:1")
    cdaemon.images.RemoveImage(api_pb2.RemoveImageRequest(image=image), timeout=30)
    assert not cdaemon.images.ImageStatus(api_pb2.ImageStatusRequest(image=image), timeout=10).HasField(
        "image"
    )
    assert all(layer.exists() for layer in layers)
    assert exec_sync(cdaemon, container_id, "echo", "still here").stdout == b"still here\n"
    cdaemon.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container_id), timeout=30)
    assert not any(layer.exists() for layer in layers)
    with pytest.raises(grpc.RpcError) as err:
        create(cdaemon, sandbox_id, container_config("d"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def info_of_pod(daemon: Daemon, sandbox_id: str) -> dict:  # type: ignore[type-arg]
    response = daemon.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True), timeout=10
    )
    return json.loads(response.info["info"])  # type: ignore[no-any-return]


def _limits(memory: int) -> Limits:
    return Limits(memory_limit=memory)
