"""Requests, pods, node facts and root filesystems for the OCI spec tests (no daemon)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from shim._proto import api_pb2
from shim.containers import capabilities, spec, validate
from shim.images.store import ImageConfig
from shim.sandbox_record import NamespaceMode, NamespaceModes

SANDBOX_ID = "ab" * 32
CONTAINER_ID = "cd" * 32
SECCOMP_JSON = Path("/usr/share/containers/seccomp.json")
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nweb:x:33:33::/var/www:/bin/false\n"
)
GROUP = "root:x:0:\napp:x:1000:\nweb:x:33:\nextra:x:2000:app,web\nmore:x:2001:app\napp2:x:1001:app\n"


def host_facts(**overrides: Any) -> spec.HostFacts:
    """This node as the measured facts describe it: root without CAP_SYS_RESOURCE,
    cgroup v1 without hugetlb, no AppArmor."""
    facts: dict[str, Any] = {
        "capabilities": frozenset(capabilities.NAMES) - {"CAP_SYS_RESOURCE"},
        "hard_limits": (("RLIMIT_NOFILE", 20000),),
        "can_lower_oom_score": False,
        "seccomp_default": SECCOMP_JSON if SECCOMP_JSON.exists() else None,
        "apparmor": False,
        "controllers": frozenset({"cpu", "cpuacct", "cpuset", "memory", "pids", "devices"}),
        "swap_accounting": True,
        "cgroup_v2": False,
        "rro": True,
        "arch": "x86_64",
    }
    facts.update(overrides)
    return spec.HostFacts(**facts)


def pod_context(
    *,
    network: NamespaceMode = NamespaceMode.POD,
    ipc: NamespaceMode = NamespaceMode.POD,
    pid: NamespaceMode = NamespaceMode.POD,
    **overrides: Any,
) -> spec.PodContext:
    """A pod with the namespaces its modes make pinned under /run/pods/x."""
    pins = {}
    if network != NamespaceMode.NODE:
        pins |= {"net": "/run/pods/x/net", "uts": "/run/pods/x/uts"}
    if ipc != NamespaceMode.NODE:
        pins["ipc"] = "/run/pods/x/ipc"
    if pid == NamespaceMode.POD:
        pins["pid"] = "/run/pods/x/pid"
    fields: dict[str, Any] = {
        "sandbox_id": SANDBOX_ID,
        "namespaces": pins,
        "modes": NamespaceModes(network=network, pid=pid, ipc=ipc),
        "hostname": "pod-host",
        "files": {
            "hostname": "/run/pods/x/hostname",
            "hosts": "/run/pods/x/hosts",
            "resolv.conf": "/run/pods/x/resolv.conf",
        },
        "shm": "/run/pods/x/shm",
        "log_directory": "/var/log/pods/x",
    }
    fields.update(overrides)
    return spec.PodContext(**fields)


def make_rootfs(root: Path, passwd: str = PASSWD, group: str = GROUP) -> Path:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "passwd").write_text(passwd)
    (root / "etc" / "group").write_text(group)
    return root


def busybox_rootfs(
    root: Path, tools: tuple[str, ...] = ("sh", "sleep", "id", "cat", "grep", "touch", "wc")
) -> Path:
    """A root filesystem with a static busybox (Debian's busybox-static) and links to it."""
    make_rootfs(root)
    (root / "bin").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for tool in tools:
        (root / "bin" / tool).symlink_to("busybox")
    return root


def container_config(
    *,
    sc: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    **fields: Any,
) -> api_pb2.ContainerConfig:
    """A valid config; keyword arguments set its fields, `sc` the security context's,
    `resources` the resources'."""
    base: dict[str, Any] = {
        "metadata": api_pb2.ContainerMetadata(name="app", attempt=0),
        "image": api_pb2.ImageSpec(image="docker.io/library/busybox:latest"),
        "command": ["sh"],
    }
    base.update(fields)
    config = api_pb2.ContainerConfig(**base)
    config.linux.security_context.CopyFrom(api_pb2.LinuxContainerSecurityContext(**(sc or {})))
    config.linux.resources.CopyFrom(api_pb2.LinuxContainerResources(**(resources or {})))
    return config


def request(config: api_pb2.ContainerConfig | None = None, **fields: Any) -> api_pb2.CreateContainerRequest:
    return api_pb2.CreateContainerRequest(
        pod_sandbox_id=SANDBOX_ID, config=config if config is not None else container_config(**fields)
    )


def container(rootfs: Path, image: ImageConfig | None = None, **overrides: Any) -> spec.ContainerContext:
    fields: dict[str, Any] = {
        "container_id": CONTAINER_ID,
        "rootfs": rootfs,
        "image": image or ImageConfig(),
        "cgroups_path": f"/kubepods/pod-x/{CONTAINER_ID}",
    }
    fields.update(overrides)
    return spec.ContainerContext(**fields)


def build(
    rootfs: Path,
    config: api_pb2.ContainerConfig | None = None,
    *,
    image: ImageConfig | None = None,
    pod: spec.PodContext | None = None,
    host: spec.HostFacts | None = None,
    ctr: spec.ContainerContext | None = None,
    **fields: Any,
) -> spec.BuiltSpec:
    """Validate a request for `config` (or container_config(**fields)) and build its spec."""
    checked = validate.container_spec(request(config, **fields))
    return spec.build(checked, pod or pod_context(), ctr or container(rootfs, image), host or host_facts())
