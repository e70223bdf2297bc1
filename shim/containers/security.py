"""Masked and read-only paths and the AppArmor profile of a container."""

from __future__ import annotations

from shim._proto import api_pb2

# containerd's defaults (oci/spec.go): files under /proc and /sys that reveal or
# change the node. Masked: a /dev/null (files) or an empty read-only tmpfs (dirs).
DEFAULT_MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
)
DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)


def masked_paths(sc: api_pb2.LinuxContainerSecurityContext) -> list[str]:
    """None when privileged; the CRI's list when it sends one (kubelet sends its own,
    with /proc/interrupts...); containerd's defaults otherwise. An empty CRI list cannot
    be told from an absent one on the wire: it means the defaults, as in containerd."""
    if sc.privileged:
        return []
    return list(sc.masked_paths) or list(DEFAULT_MASKED_PATHS)


def readonly_paths(sc: api_pb2.LinuxContainerSecurityContext) -> list[str]:
    """As masked_paths, for the paths that stay visible but read-only."""
    if sc.privileged:
        return []
    return list(sc.readonly_paths) or list(DEFAULT_READONLY_PATHS)


def apparmor_profile(sc: api_pb2.LinuxContainerSecurityContext, enabled: bool) -> str:
    """`process.apparmorProfile`, "" for none. None at all when the kernel has no
    AppArmor (this node): a container is never refused for it. With AppArmor, only a
    Localhost profile (loaded by the operator) is applied: pyshim loads no default
    profile of its own, so RuntimeDefault runs without one, like Unconfined."""
    if not enabled or sc.privileged:
        return ""
    if sc.HasField("apparmor"):
        if sc.apparmor.profile_type == api_pb2.SecurityProfile.Localhost:
            return sc.apparmor.localhost_ref
        return ""
    if sc.apparmor_profile.startswith("localhost/"):
        return sc.apparmor_profile.removeprefix("localhost/")
    return ""
