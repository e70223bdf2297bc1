"""What the node lets a container have, read once at start (HostFacts.detect)."""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

from shim.containers import capabilities, seccomp

# The rlimits a spec may carry, by OCI name (those Python's resource module knows).
_RLIMIT_NAMES = "AS CORE CPU DATA FSIZE MEMLOCK MSGQUEUE NICE NOFILE NPROC RSS RTPRIO RTTIME SIGPENDING STACK"
RLIMITS: tuple[tuple[str, int], ...] = tuple(
    (f"RLIMIT_{name}", getattr(resource, f"RLIMIT_{name}"))
    for name in _RLIMIT_NAMES.split(" ")
    if hasattr(resource, f"RLIMIT_{name}")
)
UNLIMITED = 2**64 - 1  # RLIM_INFINITY as the OCI spec (uint64) writes it
_CAP_SYS_RESOURCE = capabilities.NAMES.index("CAP_SYS_RESOURCE")


def status_masks(status_text: str) -> dict[str, int]:
    """The Cap* lines of /proc/PID/status as integers: {"CapBnd": ..., "CapEff": ...}."""
    masks = {}
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            masks[key] = int(value.strip(), 16)
    return masks


def hard_limits() -> tuple[tuple[str, int], ...]:
    """The daemon's own hard limits: a container can be given no more (raising a hard
    limit needs CAP_SYS_RESOURCE)."""
    limits = []
    for name, number in RLIMITS:
        hard = resource.getrlimit(number)[1]
        limits.append((name, UNLIMITED if hard == resource.RLIM_INFINITY else hard))
    return tuple(limits)


def swap_accounting(cgroup_v2: bool, sys_fs_cgroup: Path, own_cgroup: str) -> bool:
    """v1: the memory hierarchy has memory.memsw.* (swapaccount=1). v2: memory.swap.max
    exists below the root (the root cgroup has none), looked for in the daemon's own
    cgroup and the root's children."""
    if not cgroup_v2:
        return (sys_fs_cgroup / "memory" / "memory.memsw.limit_in_bytes").exists()
    candidates = [sys_fs_cgroup / own_cgroup.lstrip("/")] if own_cgroup.strip("/") else []
    with contextlib.suppress(OSError):  # no such directory: no candidates
        candidates += [p for p in sys_fs_cgroup.iterdir() if p.is_dir()]
    return any((c / "memory.swap.max").exists() for c in candidates)


def own_v2_cgroup(proc_self_cgroup: str) -> str:
    """The path of the "0::" line of /proc/self/cgroup, "" if there is none."""
    for line in proc_self_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


def apparmor_enabled(sys: Path) -> bool:
    """/sys/module/apparmor exists and its `enabled` parameter, if readable, says Y."""
    module = sys / "module" / "apparmor"
    if not module.exists():
        return False
    try:
        return (module / "parameters" / "enabled").read_text().strip() == "Y"
    except OSError:
        return True


def has_mount_setattr(release: str) -> bool:
    """mount_setattr(2) (recursive read-only mounts) came with Linux 5.12."""
    return seccomp.kernel_version(release) >= (5, 12)


def can_lower_oom_score(masks: dict[str, int]) -> bool:
    """Lowering oom_score_adj below its current value needs CAP_SYS_RESOURCE."""
    return bool(masks.get("CapEff", 0) >> _CAP_SYS_RESOURCE & 1)


def read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def uname_release() -> str:
    return os.uname().release
