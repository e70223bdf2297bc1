"""ContainerStats, ListContainerStats, PodSandboxStats and ListPodSandboxStats:
what the cgroups count, the writable layer's size, and the pod's network counters.

CPU usage in nano-cores is a rate: it is computed from the previous reading of
the same cgroup (kubelet reads every 10 s), so the first reading has none.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from shim._proto import api_pb2
from shim.cgroups import Cgroups, CgroupStats
from shim.containers.record import ContainerRecord
from shim.sandbox_record import SandboxRecord

# A writable layer is walked at most this often (kubelet asks every 10 s; crictl stats -w every second).
_LAYER_TTL = 5.0


class Stats:
    def __init__(self, cgroups: Cgroups, rootfs_dir: Path) -> None:
        self.cgroups = cgroups
        self.rootfs_dir = rootfs_dir
        self._lock = threading.Lock()
        self._cpu: dict[str, tuple[int, int]] = {}  # cgroup -> (timestamp, usage) of the last reading
        self._layers: dict[str, tuple[float, int, int]] = {}  # container id -> (when, bytes, inodes)

    def container(self, record: ContainerRecord) -> api_pb2.ContainerStats:
        cg = self.cgroups.stats(record.cgroup)
        stats = api_pb2.ContainerStats(
            attributes=api_pb2.ContainerAttributes(
                id=record.id,
                metadata=api_pb2.ContainerMetadata(name=record.name, attempt=record.attempt),
                labels=record.labels,
                annotations=record.annotations,
            ),
            cpu=self._cpu_usage(record.cgroup, cg),
            memory=_memory(cg),
        )
        used, inodes = self._layer(record.id)
        stats.writable_layer.timestamp = cg.timestamp
        stats.writable_layer.fs_id.mountpoint = str(self.rootfs_dir)
        stats.writable_layer.used_bytes.value = used
        stats.writable_layer.inodes_used.value = inodes
        return stats

    def sandbox(self, record: SandboxRecord, containers: list[ContainerRecord]) -> api_pb2.PodSandboxStats:
        stats = api_pb2.PodSandboxStats(
            attributes=api_pb2.PodSandboxAttributes(
                id=record.id,
                metadata=api_pb2.PodSandboxMetadata(
                    name=record.metadata.name,
                    uid=record.metadata.uid,
                    namespace=record.metadata.namespace,
                    attempt=record.metadata.attempt,
                ),
                labels=record.labels,
                annotations=record.annotations,
            )
        )
        linux = stats.linux
        if record.cgroup_parent:
            cg = self.cgroups.stats(record.cgroup_parent)
            linux.cpu.CopyFrom(self._cpu_usage(record.cgroup_parent, cg))
            linux.memory.CopyFrom(_memory(cg))
            if cg.pids is not None:
                linux.process.timestamp = cg.timestamp
                linux.process.process_count.value = cg.pids
        if record.pause is not None and record.network is not None:
            linux.network.CopyFrom(_network(record.pause.pid))
        linux.containers.extend(self.container(c) for c in containers)
        return stats

    def forget(self, key: str) -> None:
        with self._lock:
            self._cpu.pop(key, None)
            self._layers.pop(key, None)

    def _cpu_usage(self, cgroup: str, cg: CgroupStats) -> api_pb2.CpuUsage:
        usage = api_pb2.CpuUsage(timestamp=cg.timestamp)
        if cg.cpu_usage_ns is None:
            return usage
        usage.usage_core_nano_seconds.value = cg.cpu_usage_ns
        with self._lock:
            previous = self._cpu.get(cgroup)
            self._cpu[cgroup] = (cg.timestamp, cg.cpu_usage_ns)
        if previous is not None and cg.timestamp > previous[0] and cg.cpu_usage_ns >= previous[1]:
            elapsed = cg.timestamp - previous[0]
            usage.usage_nano_cores.value = (cg.cpu_usage_ns - previous[1]) * 1_000_000_000 // elapsed
        return usage

    def _layer(self, container_id: str) -> tuple[int, int]:
        now = time.monotonic()
        with self._lock:
            cached = self._layers.get(container_id)
        if cached is not None and now - cached[0] < _LAYER_TTL:
            return cached[1], cached[2]
        used, inodes = _disk_usage(self.rootfs_dir / container_id / "upper")
        with self._lock:
            self._layers[container_id] = (now, used, inodes)
        return used, inodes


def _memory(cg: CgroupStats) -> api_pb2.MemoryUsage:
    memory = api_pb2.MemoryUsage(timestamp=cg.timestamp)
    for name, value in (
        ("working_set_bytes", cg.memory_working_set),
        ("usage_bytes", cg.memory_usage),
        ("rss_bytes", cg.memory_rss),
        ("page_faults", cg.page_faults),
        ("major_page_faults", cg.major_page_faults),
    ):
        if value is not None:
            getattr(memory, name).value = value
    return memory


def _network(pid: int) -> api_pb2.NetworkUsage:
    """Counters of the pod's interfaces, from inside its network namespace (the
    pause's view of /proc/PID/net/dev)."""
    usage = api_pb2.NetworkUsage(timestamp=time.time_ns())
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            lines = f.read().splitlines()[2:]
    except OSError:
        return usage
    for line in lines:
        name, _, counters = line.partition(":")
        name = name.strip()
        fields = counters.split()
        if name == "lo" or len(fields) < 16:
            continue
        interface = api_pb2.NetworkInterfaceUsage(name=name)
        interface.rx_bytes.value = int(fields[0])
        interface.rx_errors.value = int(fields[2])
        interface.tx_bytes.value = int(fields[8])
        interface.tx_errors.value = int(fields[10])
        if name == "eth0":
            usage.default_interface.CopyFrom(interface)
        usage.interfaces.append(interface)
    return usage


def _disk_usage(path: Path) -> tuple[int, int]:
    """Allocated bytes and inodes under `path` (hard links counted once)."""
    used, inodes = 0, 0
    seen: set[tuple[int, int]] = set()
    for top, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1:
                if key in seen:
                    continue
                seen.add(key)
            used += st.st_blocks * 512
            inodes += 1
    return used, inodes
