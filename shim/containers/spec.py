"""The OCI runtime spec (config.json) of a container, from its CRI config, its
pod, its image and what the node allows.

INTERFACE ONLY (to be implemented): see the docstrings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim._proto import api_pb2
from shim.images.store import ImageConfig
from shim.sandbox_record import NamespaceModes


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """A validated CreateContainer request (shim.containers.validate makes it)."""

    sandbox_id: str
    name: str
    attempt: int
    image: str  # ImageSpec.image as sent: a reference or an image id
    labels: dict[str, str]
    annotations: dict[str, str]
    log_path: str  # relative to the pod's log directory, checked not to leave it; "" for none
    config: api_pb2.ContainerConfig  # the whole request config, every field checked
    config_bytes: bytes  # the same, serialized deterministically (kept for verbose status)


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What this node lets a container have; read once at start (see detect)."""

    capabilities: frozenset[str]  # the daemon's bounding set, as "CAP_CHOWN", ...
    hard_limits: tuple[tuple[str, int], ...]  # ("RLIMIT_NOFILE", hard), ...: never raised above
    can_lower_oom_score: bool  # False without CAP_SYS_RESOURCE: negative oomScoreAdj clamped to 0
    seccomp_default: Path | None  # the RuntimeDefault profile (containers-common's seccomp.json)
    apparmor: bool  # /sys/module/apparmor exists
    controllers: frozenset[str]  # cgroup controllers the node has (hugetlb, memory swap, ...)
    swap_accounting: bool  # memory.memsw.* exist (v1) or memory.swap.max (v2)
    cgroup_v2: bool  # /sys/fs/cgroup is cgroup2 (unified mode): cgroup namespace, `unified` keys
    rro: bool  # the kernel has mount_setattr (recursive read-only mounts)
    arch: str  # platform.machine(): for the seccomp profile's architectures

    @classmethod
    def detect(cls, controllers: frozenset[str], cgroup_v2: bool) -> HostFacts:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class PodContext:
    """What a container takes from its pod."""

    sandbox_id: str
    namespaces: dict[str, str]  # kind -> pinned path: "net", "ipc", "uts", "pid" (absent: the node's)
    modes: NamespaceModes
    hostname: str  # the pod's hostname (HOSTNAME env)
    files: dict[str, str]  # "resolv.conf", "hostname", "hosts" -> paths to bind
    shm: str  # the pod's /dev/shm tmpfs to bind; "" when the pod uses the node's IPC (bind /dev/shm)
    log_directory: str


@dataclass(frozen=True, slots=True)
class ContainerContext:
    container_id: str
    rootfs: Path  # the mounted overlay root filesystem
    image: ImageConfig
    cgroups_path: str  # absolute cgroupfs path for `linux.cgroupsPath`
    target_pid_namespace: str = ""  # pid mode TARGET: /proc/<target's pid>/ns/pid


@dataclass(frozen=True, slots=True)
class BuiltSpec:
    document: dict[str, Any]  # config.json
    uid: int
    gid: int
    additional_gids: tuple[int, ...]
    username: str  # as resolved from the image's /etc/passwd, "" if unknown


def build(spec: ContainerSpec, pod: PodContext, ctr: ContainerContext, host: HostFacts) -> BuiltSpec:
    """config.json for the container, or InvalidArgument/FailedPrecondition saying
    what in the request cannot be done (an unknown user, a missing device...)."""
    raise NotImplementedError


def resources(res: api_pb2.LinuxContainerResources, host: HostFacts) -> dict[str, Any]:
    """OCI `linux.resources` for CRI resources (also for UpdateContainerResources),
    leaving out what the node has no controller for."""
    raise NotImplementedError
