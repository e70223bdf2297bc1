"""The OCI runtime spec (config.json) of a container, from its CRI config, its
pod, its image and what the node allows.

Each concern lives in a module of its own: process (args, env, cwd), users, capabilities,
security (masked paths, AppArmor), seccomp, mounts, devices, resources, host (what the
node allows); this module assembles them. Building reads the node and the image's files
and writes nothing but the image's volume directories and the working directory inside
the container's own root filesystem; the node-side preparation of mounts is
`mounts.prepare_host`, which the lifecycle calls first.
"""

from __future__ import annotations

import contextlib
import platform
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim._proto import api_pb2
from shim.containers import (
    capabilities,
    devices,
    mounts,
    process,
    rootpath,
    seccomp,
    security,
    users,
)
from shim.containers import host as node
from shim.containers.resources import linux_resources
from shim.errors import FailedPrecondition
from shim.images.store import ImageConfig
from shim.sandbox_record import NamespaceMode, NamespaceModes

OCI_VERSION = "1.0.2"  # what runc 1.1.5 implements
NOFILE = 1048576  # containerd's and CRI-O's open-files limit, when the daemon may give it
SECCOMP_DEFAULT = Path("/usr/share/containers/seccomp.json")


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
    def detect(
        cls,
        controllers: frozenset[str],
        cgroup_v2: bool,
        *,
        proc: Path = Path("/proc"),
        sys: Path = Path("/sys"),
        seccomp_default: Path = SECCOMP_DEFAULT,
    ) -> HostFacts:
        """Read from the running daemon and node: the bounding set (CapBnd of
        /proc/self/status), hard rlimits, CAP_SYS_RESOURCE in the effective set, the
        default seccomp profile if installed, AppArmor, swap accounting, the kernel's
        mount_setattr, the machine. `controllers` and `cgroup_v2` come from the
        cgroup layer. proc/sys/seccomp_default are for tests."""
        masks = node.status_masks(node.read(proc / "self" / "status"))
        own = node.own_v2_cgroup(node.read(proc / "self" / "cgroup"))
        return cls(
            capabilities=capabilities.from_mask(masks.get("CapBnd", 0)),
            hard_limits=node.hard_limits(),
            can_lower_oom_score=node.can_lower_oom_score(masks),
            seccomp_default=seccomp_default if seccomp_default.is_file() else None,
            apparmor=node.apparmor_enabled(sys),
            controllers=controllers,
            swap_accounting=node.swap_accounting(cgroup_v2, sys / "fs" / "cgroup", own),
            cgroup_v2=cgroup_v2,
            rro=node.has_mount_setattr(node.uname_release()),
            arch=platform.machine(),
        )


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
    # What was asked for and is not applied on this node (for the caller to log once):
    # SELinux options, capabilities the daemon lacks, a clamped oom_score_adj...
    notes: tuple[str, ...] = ()


def build(spec: ContainerSpec, pod: PodContext, ctr: ContainerContext, host: HostFacts) -> BuiltSpec:
    """config.json for the container, or InvalidArgument/FailedPrecondition saying
    what in the request cannot be done (an unknown user, a missing device...).

    Reads the image's /etc/passwd and /etc/group (inside ctr.rootfs, symlinks resolved
    within it), the host paths of mounts and devices, and seccomp profile files. Its
    only writes: the image's Volumes and the working directory are made (0755) inside
    ctr.rootfs if missing, after every check has passed. The CRI mounts' host side
    must have been prepared (mounts.prepare_host) before."""
    config = spec.config
    sc = config.linux.security_context
    notes: list[str] = []
    user = users.resolve(ctr.rootfs, sc, ctr.image.user)
    caps = capabilities.compute(sc, host.capabilities)
    _note_clamped_capabilities(sc, host, notes)
    argv = process.args(config, ctr.image)
    cwd = process.cwd(config, ctr.image)
    linux_devices, device_rules = devices.build(list(config.devices), sc.privileged)
    cri_mounts, rootfs_propagation = mounts.cri(list(config.mounts), host.rro)
    defaults = mounts.standard(sc.privileged) + mounts.pod(pod.files, pod.shm, sc.readonly_rootfs)
    seccomp_profile = seccomp.for_container(
        seccomp.choose(sc),
        default_profile=host.seccomp_default,
        arch=host.arch,
        capabilities=frozenset(caps.bounding),
    )
    proc: dict[str, Any] = {
        "terminal": config.tty,
        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": list(user.additional_gids)},
        "args": argv,
        "env": process.env(config, ctr.image, pod.hostname),
        "cwd": cwd,
        "capabilities": caps.oci(),
        "rlimits": [_nofile(host)],
        "noNewPrivileges": sc.no_new_privs,
        "oomScoreAdj": _oom_score_adj(config.linux.resources.oom_score_adj, host, notes),
    }
    apparmor = security.apparmor_profile(sc, host.apparmor)
    if apparmor:
        proc["apparmorProfile"] = apparmor
    linux_res = resources_for(config.linux.resources, host, notes)
    linux_res["devices"] = device_rules
    linux: dict[str, Any] = {
        "namespaces": namespaces(config, pod, ctr, host.cgroup_v2),
        "cgroupsPath": ctr.cgroups_path,
        "resources": linux_res,
        "devices": linux_devices,
        "maskedPaths": security.masked_paths(sc),
        "readonlyPaths": security.readonly_paths(sc),
    }
    if seccomp_profile is not None:
        linux["seccomp"] = seccomp_profile
    if rootfs_propagation:
        linux["rootfsPropagation"] = rootfs_propagation
    if sc.HasField("selinux_options"):
        notes.append("selinux_options ignored: pyshim does not label containers")
    document = {
        "ociVersion": OCI_VERSION,
        "process": proc,
        "root": {"path": str(ctr.rootfs), "readonly": sc.readonly_rootfs},
        "mounts": mounts.merge(defaults, cri_mounts),
        "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": pod.sandbox_id,
            "io.kubernetes.cri.container-name": spec.name,
            "io.kubernetes.cri.image-name": spec.image,
        },
        "linux": linux,
    }
    _make_directories(ctr, cwd)
    return BuiltSpec(
        document=document,
        uid=user.uid,
        gid=user.gid,
        additional_gids=user.additional_gids,
        username=user.username,
        notes=tuple(notes),
    )


def resources(res: api_pb2.LinuxContainerResources, host: HostFacts) -> dict[str, Any]:
    """OCI `linux.resources` for CRI resources (also for UpdateContainerResources),
    leaving out what the node has no controller for. No device rules (see
    shim.containers.resources)."""
    return resources_for(res, host, [])


def resources_for(res: api_pb2.LinuxContainerResources, host: HostFacts, notes: list[str]) -> dict[str, Any]:
    out = linux_resources(
        res, controllers=host.controllers, swap_accounting=host.swap_accounting, cgroup_v2=host.cgroup_v2
    )
    if res.hugepage_limits and "hugepageLimits" not in out:
        notes.append("hugepage limits ignored: the node has no hugetlb cgroup controller")
    if res.unified and "unified" not in out:
        notes.append("unified cgroup keys ignored: the node is not on cgroup v2")
    return out


def namespaces(
    config: api_pb2.ContainerConfig, pod: PodContext, ctr: ContainerContext, cgroup_v2: bool
) -> list[dict[str, str]]:
    """`linux.namespaces`: a fresh mount namespace; the pod's network, IPC and UTS
    namespaces by their pinned paths (none for NODE: the node's); the pid namespace
    per the container's own pid mode (POD: the pod's pinned one, a new one when the pod
    shares none, or the node's for a host-pid pod; CONTAINER: a new one; NODE: the
    node's, only in a host-pid pod;
    TARGET: the target container's); a cgroup namespace on cgroup v2. Net and IPC
    follow the pod, whatever the container config repeats: a container cannot leave its
    pod's network. Never a `hostname`: the UTS namespace is the pod's."""
    result = [{"type": "mount"}]
    wanted = []
    if pod.modes.network != NamespaceMode.NODE:
        # A host-network pod keeps the node's hostname: its UTS goes with its network.
        wanted += [("net", "network"), ("uts", "uts")]
    if pod.modes.ipc != NamespaceMode.NODE:
        wanted.append(("ipc", "ipc"))
    for kind, oci_type in wanted:
        if kind not in pod.namespaces:
            raise FailedPrecondition(f"pod {pod.sandbox_id} has no pinned {kind} namespace")
        result.append({"type": oci_type, "path": pod.namespaces[kind]})
    pid = _pid_namespace(config.linux.security_context.namespace_options.pid, pod, ctr)
    if pid is not None:
        result.append(pid)
    if cgroup_v2:
        result.append({"type": "cgroup"})
    return result


def _pid_namespace(mode: int, pod: PodContext, ctr: ContainerContext) -> dict[str, str] | None:
    if mode == NamespaceMode.CONTAINER:
        return {"type": "pid"}
    if mode == NamespaceMode.TARGET:
        if not ctr.target_pid_namespace:
            raise FailedPrecondition("pid namespace mode TARGET: the target container's namespace is unknown")
        return {"type": "pid", "path": ctr.target_pid_namespace}
    if mode == NamespaceMode.NODE and pod.modes.pid != NamespaceMode.NODE:
        raise FailedPrecondition(
            f"the container asks for the node's pid namespace, but pod {pod.sandbox_id} "
            f"has pid mode {pod.modes.pid.name}"
        )
    if pod.modes.pid == NamespaceMode.NODE:
        return None  # POD in a host-pid pod: the pod's pid namespace is the node's
    if "pid" not in pod.namespaces:
        # A pod without a shared pid namespace (kubelet's default, CONTAINER): a config
        # that leaves the mode unset (POD is 0, e.g. from crictl) gets one of its own.
        return {"type": "pid"}
    return {"type": "pid", "path": pod.namespaces["pid"]}


def _nofile(host: HostFacts) -> dict[str, Any]:
    limit = min(NOFILE, dict(host.hard_limits).get("RLIMIT_NOFILE", NOFILE))
    return {"type": "RLIMIT_NOFILE", "hard": limit, "soft": limit}


def _oom_score_adj(value: int, host: HostFacts, notes: list[str]) -> int:
    if value < 0 and not host.can_lower_oom_score:
        notes.append(f"oom_score_adj {value} raised to 0: the daemon lacks CAP_SYS_RESOURCE")
        return 0
    return value


def _note_clamped_capabilities(
    sc: api_pb2.LinuxContainerSecurityContext, host: HostFacts, notes: list[str]
) -> None:
    asked = {capabilities.canonical(c) for c in sc.capabilities.add_capabilities}
    asked |= {capabilities.canonical(c) for c in sc.capabilities.add_ambient_capabilities}
    missing = sorted(c for c in asked if c and c != "ALL" and c not in host.capabilities)
    if missing:
        notes.append(f"capabilities the daemon lacks are not given: {', '.join(missing)}")


def _make_directories(ctr: ContainerContext, cwd: str) -> None:
    """The image's volumes and the working directory, inside the rootfs (CRI-O's
    image_volumes = "mkdir": an image volume is a directory of the container's own
    writable layer; no host volume is made)."""
    for volume in ctr.image.volumes:
        if "\0" in volume:
            raise FailedPrecondition("an image volume path holds a NUL character")
        rootpath.make_dirs(ctr.rootfs, "/" + volume.lstrip("/"))
    rootpath.make_dirs(ctr.rootfs, cwd)


def stop_signal(config: api_pb2.ContainerConfig, image: ImageConfig) -> int:
    """The signal that asks the container to stop: the config's, else the image's
    StopSignal, else SIGTERM."""
    if config.stop_signal:
        name = api_pb2.Signal.Name(config.stop_signal).removeprefix("SIGNAL_")
        with contextlib.suppress(KeyError):
            return int(signal.Signals[name])
    return image.stop_signal or int(signal.SIGTERM)
