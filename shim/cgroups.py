"""cgroups as the cgroupfs driver knows them: v1 (one hierarchy per controller),
hybrid (v1 plus a cgroup2 mount at /sys/fs/cgroup/unified, and a `name=systemd`
hierarchy) and v2 (one unified hierarchy at /sys/fs/cgroup).

A cgroup is named by its path below the root of every hierarchy, as kubelet and
the OCI spec's `cgroupsPath` name it: `/kubepods/besteffort/pod<uid>/pyshim-<id>`.
Every operation applies to every hierarchy the node has, named ones included, so
that nothing is left behind in `name=systemd` or `unified`.

INTERFACE ONLY (to be implemented): see the docstrings.
"""

from __future__ import annotations

from dataclasses import dataclass

from shim.errors import ShimError


class CgroupBusy(ShimError):
    """A cgroup could not be removed: processes are still in it."""


@dataclass(frozen=True, slots=True)
class Hierarchy:
    mountpoint: str  # /sys/fs/cgroup/memory, /sys/fs/cgroup/unified, /sys/fs/cgroup
    controllers: frozenset[str]  # {"memory"}, {"cpu", "cpuacct"}, {"name=systemd"}; v2: its controllers
    version: int  # 1 or 2


@dataclass(frozen=True, slots=True)
class CgroupStats:
    timestamp: int  # ns since the epoch, when read
    cpu_usage_ns: int | None  # cumulative CPU time of every task
    memory_usage: int | None  # bytes
    memory_working_set: int | None  # usage minus inactive file pages, as kubelet computes it
    memory_rss: int | None
    page_faults: int | None
    major_page_faults: int | None
    pids: int | None  # tasks now
    oom_kills: int | None  # OOM kills so far in this cgroup, where the kernel counts them


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits pyshim itself writes (a pod cgroup it created: overhead plus resources).
    Containers' limits are written by the OCI runtime from the spec."""

    cpu_shares: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    memory_limit: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""


class Cgroups:
    """The node's hierarchies, read once from /proc/self/mountinfo."""

    hierarchies: tuple[Hierarchy, ...]
    mode: str  # "v1", "hybrid" or "v2"

    def __init__(self, mountinfo: str = "/proc/self/mountinfo") -> None:
        raise NotImplementedError

    @property
    def controllers(self) -> frozenset[str]:
        """Every controller the node has (cpu, memory, pids, hugetlb, ...)."""
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        """True if the cgroup exists in the hierarchy that holds memory (or the v2 one)."""
        raise NotImplementedError

    def make(self, path: str) -> list[str]:
        """Create `path` (and missing parents) in every hierarchy. Returns the
        filesystem directories it created, parents first, so that exactly those can
        be removed later. On v1 a new cpuset cgroup gets its parent's cpus and mems;
        on v2 the parents' subtree_control enables the controllers the child needs.
        Idempotent; raises Internal with the path and errno on failure."""
        raise NotImplementedError

    def join(self, path: str, pid: int) -> None:
        """Move a process into `path` in every hierarchy (made if missing)."""
        raise NotImplementedError

    def remove(self, path: str) -> None:
        """rmdir `path` in every hierarchy. Missing is done; a cgroup that still has
        processes raises CgroupBusy."""
        raise NotImplementedError

    def remove_dirs(self, dirs: list[str]) -> None:
        """rmdir directories `make` returned, deepest first; missing is done."""
        raise NotImplementedError

    def procs(self, path: str) -> list[int]:
        """Pids in `path` (in any hierarchy)."""
        raise NotImplementedError

    def set_limits(self, path: str, limits: Limits) -> None:
        """Write limits to `path` where the node has the controller."""
        raise NotImplementedError

    def stats(self, path: str) -> CgroupStats:
        """What the node's controllers count for `path`; None where they count nothing."""
        raise NotImplementedError
