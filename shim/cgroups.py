"""cgroups as the cgroupfs driver knows them: v1 (one hierarchy per controller),
hybrid (v1 plus a cgroup2 mount at /sys/fs/cgroup/unified, and a `name=systemd`
hierarchy) and v2 (one unified hierarchy at /sys/fs/cgroup).

A cgroup is named by its path below the root of every hierarchy, as kubelet and
the OCI spec's `cgroupsPath` name it: `/kubepods/besteffort/pod<uid>/pyshim-<id>`.
Every operation applies to every hierarchy the node has, named ones included, so
that nothing is left behind in `name=systemd` or `unified`.

Everything here is plain os calls on cgroupfs (no subprocess): it runs on every pod
and container start. Paths come from requests (`cgroup_parent`), so each one is
checked before it is joined to a mountpoint.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from dataclasses import dataclass

from shim.errors import FailedPrecondition, Internal, InvalidArgument, NotFound

log = logging.getLogger(__name__)

# Super options of a v1 mount that name controllers; the rest are flags (rw, noprefix,
# clone_children, release_agent=...). `name=...` names a hierarchy without a controller.
_V1_CONTROLLERS = frozenset(
    {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls"}
) | frozenset({"net_prio", "blkio", "perf_event", "hugetlb", "pids", "rdma", "misc"})
# What runc and kubelet enable in a v2 parent's subtree_control for their children.
_V2_ENABLE = ("cpu", "cpuset", "hugetlb", "io", "memory", "pids")
# Retries of an rmdir refused with EBUSY while no process is listed: a task that was just
# killed keeps its cgroup populated until the kernel has finished its exit.
_RMDIR_RETRIES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
# Per version: usage file, OOM events file, and memory.stat's rss, inactive file pages, page
# faults and major faults. v1's total_ counters are hierarchical like v2's: a pod cgroup has no
# task of its own, so its local pgfault would stay 0 while its containers fault.
_MEMORY_FILES = {
    2: ("memory.current", "memory.events", "anon", "inactive_file", "pgfault", "pgmajfault"),
    1: (
        "memory.usage_in_bytes",
        "memory.oom_control",
        "total_rss",
        "total_inactive_file",
        "total_pgfault",
        "total_pgmajfault",
    ),
}
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


class CgroupBusy(FailedPrecondition):
    """A cgroup could not be removed: processes (or child cgroups) are still in it."""

    def __init__(self, path: str, pids: list[int], children: list[str]) -> None:
        if pids:
            what = "processes " + ", ".join(_describe(pid) for pid in pids[:10])
        else:
            what = f"child cgroups {children}" if children else "exiting tasks"
        super().__init__(f"cgroup {path} is busy: {what}")
        self.path = path
        self.pids = pids
        self.children = children


def _describe(pid: int) -> str:
    """ "123 (sleep)", or "123 (sleep, exited: its parent 1 has not reaped it)"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return str(pid)
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    state, parent = raw[raw.rindex(")") + 2 :].split()[:2]
    if state == "Z":
        return f"{pid} ({name}, exited: its parent {parent} has not reaped it)"
    return f"{pid} ({name})"


class BadCgroupPath(InvalidArgument, ValueError):
    """A cgroup path that is not absolute and plain (it can come from a request)."""


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


def check_path(path: str) -> str:
    """`path` if it is an absolute cgroup path below the root with plain components;
    else BadCgroupPath. Nothing that passes can leave a hierarchy's mountpoint."""
    if not isinstance(path, str) or not path.startswith("/") or path == "/":
        raise BadCgroupPath(f"cgroup path {path!r} is not an absolute path below the root")
    for part in path[1:].split("/"):
        if part in ("", ".", "..") or "\0" in part or "\n" in part or len(os.fsencode(part)) > 255:
            raise BadCgroupPath(f"cgroup path {path!r}: component {part!r} is not allowed")
    return path


def cpu_shares_to_weight(shares: int) -> int:
    """cgroup v2 cpu.weight for v1 cpu.shares: the linear map kubelet's cgroup manager and
    runc 1.1 use ([2, 262144] onto [1, 10000]), so that pyshim agrees with them."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


class Cgroups:
    """The node's hierarchies, read once from /proc/self/mountinfo."""

    hierarchies: tuple[Hierarchy, ...]
    mode: str  # "v1", "hybrid" or "v2"

    def __init__(self, mountinfo: str = "/proc/self/mountinfo") -> None:
        with open(mountinfo, "rb") as f:
            mounts = _cgroup_mounts(f.read())
        v1 = [Hierarchy(m, c, 1) for fs, m, c in mounts if fs == "cgroup"]
        v2 = [m for fs, m, _ in mounts if fs == "cgroup2"]
        if any(h.controllers - {c for c in h.controllers if c.startswith("name=")} for h in v1):
            # Hybrid: runtimes use the cgroup2 mount to track processes only, never for
            # limits, even where the kernel offers a controller there that v1 lacks.
            self.mode = "hybrid" if v2 else "v1"
            self.hierarchies = (*v1, *(Hierarchy(m, frozenset(), 2) for m in v2[:1]))
        elif v2:
            self.mode = "v2"
            controllers = frozenset(_read(f"{v2[0]}/cgroup.controllers").decode().split())
            self.hierarchies = (Hierarchy(v2[0], controllers, 2), *v1)
        else:
            raise Internal(f"no cgroup hierarchy is mounted (read {mountinfo})")
        self._v1 = {c: h for h in self.hierarchies if h.version == 1 for c in h.controllers}
        self._v2 = next((h for h in self.hierarchies if h.version == 2 and self.mode == "v2"), None)
        self._main = self._v2 or self._v1.get("memory") or self.hierarchies[0]

    @property
    def controllers(self) -> frozenset[str]:
        """Every controller the node has (cpu, memory, pids, hugetlb, ...)."""
        return frozenset(c for h in self.hierarchies for c in h.controllers if not c.startswith("name="))

    def exists(self, path: str) -> bool:
        """True if the cgroup exists in the hierarchy that holds memory (or the v2 one)."""
        return os.path.isdir(self._main.mountpoint + check_path(path))

    def make(self, path: str) -> list[str]:
        """Create `path` (and missing parents) in every hierarchy. Returns the
        filesystem directories it created, parents first, so that exactly those can
        be removed later. On v1 a new cpuset cgroup gets its parent's cpus and mems;
        on v2 the parents' subtree_control enables the controllers the child needs.
        Idempotent; raises Internal with the path and errno on failure."""
        check_path(path)
        made: list[str] = []
        try:
            for h in self.hierarchies:
                self._make_in(h, path, made)
        except OSError as exc:
            for d in reversed(made):  # nobody else knows of them yet
                try:
                    os.rmdir(d)
                except OSError as undo:
                    log.warning("cgroup %s: cannot undo mkdir: %s", d, undo.strerror)
            raise _internal(f"make {path}", exc) from exc
        return made

    def join(self, path: str, pid: int) -> None:
        """Move a process into `path` in every hierarchy (made if missing)."""
        check_path(path)
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            # 0 would move the writer itself: the daemon.
            raise ValueError(f"not a process id: {pid!r}")
        for h in self.hierarchies:
            procs = f"{h.mountpoint}{path}/cgroup.procs"
            try:
                try:
                    _write(procs, str(pid))
                except FileNotFoundError:
                    self._make_in(h, path, [])
                    _write(procs, str(pid))
            except OSError as exc:
                raise _internal(f"join {pid} to {procs}", exc) from exc

    def remove(self, path: str) -> None:
        """rmdir `path` in every hierarchy. Missing is done; a cgroup that still has
        processes (or child cgroups) raises CgroupBusy and stays where it is busy."""
        check_path(path)
        for h in self.hierarchies:
            self._rmdir(h.mountpoint + path, path, keep_shared=False)

    def remove_dirs(self, dirs: list[str]) -> None:
        """rmdir directories `make` returned, deepest first; missing is done. A directory
        that has child cgroups of someone else's by now is left to them; one with
        processes raises CgroupBusy after every other directory was tried."""
        named = [(d, self._cgroup_of(d)) for d in dirs]  # all checked before any is removed
        busy: CgroupBusy | None = None
        for d, path in reversed(named):
            try:
                self._rmdir(d, path, keep_shared=True)
            except CgroupBusy as exc:
                busy = busy or exc
        if busy is not None:
            raise busy

    def procs(self, path: str) -> list[int]:
        """Pids in `path` (in any hierarchy)."""
        check_path(path)
        pids: set[int] = set()
        for h in self.hierarchies:
            pids.update(_pids(h.mountpoint + path))
        return sorted(pids)

    def set_limits(self, path: str, limits: Limits) -> None:
        """Write limits to `path` where the node has the controller. Zero (or empty)
        leaves a limit as it is; a negative quota or memory limit removes it. Set a pod's
        limits before its children are made: v1 refuses (EBUSY) to shrink a cpuset below
        a child's, or a memory limit below a usage it cannot reclaim."""
        check_path(path)
        v2 = self._v2 is not None
        quota, period, memory_limit = limits.cpu_quota, limits.cpu_period, limits.memory_limit
        if cpu := self._dir_for("cpu", path):
            if limits.cpu_shares and v2:
                _set(f"{cpu}/cpu.weight", str(cpu_shares_to_weight(limits.cpu_shares)))
            elif limits.cpu_shares:
                _set(f"{cpu}/cpu.shares", str(limits.cpu_shares))
            if v2 and (quota or period):
                value = str(quota) if quota > 0 else "max"
                _set(f"{cpu}/cpu.max", f"{value} {period}" if period else value)
            elif not v2:
                _set_cfs(cpu, quota, period)
        if (memory := self._dir_for("memory", path)) and memory_limit:
            name, unlimited = ("memory.max", "max") if v2 else ("memory.limit_in_bytes", "-1")
            _set(f"{memory}/{name}", str(memory_limit) if memory_limit > 0 else unlimited)
        if cpuset := self._dir_for("cpuset", path):
            if limits.cpuset_cpus:
                _set(f"{cpuset}/cpuset.cpus", limits.cpuset_cpus)
            if limits.cpuset_mems:
                _set(f"{cpuset}/cpuset.mems", limits.cpuset_mems)

    def stats(self, path: str) -> CgroupStats:
        """What the node's controllers count for `path`; None where they count nothing.
        NotFound if the cgroup does not exist."""
        check_path(path)
        now = time.time_ns()
        version = 2 if self._v2 is not None else 1
        cpu = usage = working_set = rss = faults = major = oom = None
        if self._v2 is not None:
            # cpu.stat's usage_usec is core accounting: there even without the cpu controller.
            usec = _keyed(f"{self._v2.mountpoint}{path}/cpu.stat").get("usage_usec")
            cpu = None if usec is None else usec * 1000
        elif cpuacct := self._dir_for("cpuacct", path):
            cpu = _int(f"{cpuacct}/cpuacct.usage")
        if memory := self._dir_for("memory", path):
            usage_file, events_file, *keys = _MEMORY_FILES[version]
            usage = _int(f"{memory}/{usage_file}")
            counters = _keyed(f"{memory}/memory.stat")
            rss, inactive, faults, major = (counters.get(k) for k in keys)
            oom = _keyed(f"{memory}/{events_file}").get("oom_kill")
            # As cadvisor computes it for kubelet (evictions use it): never below zero.
            working_set = None if usage is None else max(usage - (inactive or 0), 0)
        pids_dir = self._dir_for("pids", path)
        pids = _int(f"{pids_dir}/pids.current") if pids_dir else None
        if cpu is None and usage is None and pids is None and not self.exists(path):
            raise NotFound(f"cgroup {path} does not exist")
        return CgroupStats(now, cpu, usage, working_set, rss, faults, major, pids, oom)

    # ---- helpers --------------------------------------------------------------------------

    def _make_in(self, h: Hierarchy, path: str, made: list[str]) -> None:
        """mkdir -p of `path` in `h`, appending what it created (parents first) to `made`.
        Tries the leaf first: its parent usually exists, so that is one syscall."""
        target = h.mountpoint + path
        try:
            os.mkdir(target, 0o755)
        except FileExistsError:
            return
        except FileNotFoundError:
            self._make_in(h, _parent(path), made)
            try:
                os.mkdir(target, 0o755)
            except FileExistsError:  # made meanwhile by someone else: theirs
                return
        made.append(target)
        if h.version == 1 and "cpuset" in h.controllers:
            # A new v1 cpuset cgroup starts with no cpus and mems: joining it fails with ENOSPC.
            parent = h.mountpoint + _parent(path).rstrip("/")
            for name in ("cpuset.cpus", "cpuset.mems"):
                value = _read(f"{parent}/{name}").strip()
                if value:
                    _write(f"{target}/{name}", value.decode())
        elif h is self._v2:
            self._enable(h, _parent(path))

    def _enable(self, h: Hierarchy, path: str) -> None:
        """Enable in `path`'s subtree_control the controllers its children need, first in
        its ancestors where `path` does not have them yet."""
        d = h.mountpoint + path.rstrip("/")
        want = set(_V2_ENABLE) & h.controllers
        missing = want - set(_read(f"{d}/cgroup.subtree_control").decode().split())
        if not missing:
            return
        available = set(_read(f"{d}/cgroup.controllers").decode().split())
        if missing - available and path != "/":
            self._enable(h, _parent(path))
            available = set(_read(f"{d}/cgroup.controllers").decode().split())
        enable = sorted(missing & available)
        if not enable:
            return
        try:
            _write(f"{d}/cgroup.subtree_control", " ".join(f"+{c}" for c in enable))
        except OSError:
            # One controller can be refused (cpuset partitions, a parent with processes of its
            # own): enable the others, as runc does, and let set_limits name what is missing.
            for c in enable:
                try:
                    _write(f"{d}/cgroup.subtree_control", f"+{c}")
                except OSError as exc:
                    log.warning("cgroup %s: cannot enable %s for its children: %s", path, c, exc.strerror)

    def _dir_for(self, controller: str, path: str) -> str | None:
        """`path`'s directory in the hierarchy that has `controller`, if the node has it."""
        if self._v2 is not None:
            return self._v2.mountpoint + path if controller in self._v2.controllers else None
        h = self._v1.get(controller)
        return h.mountpoint + path if h else None

    def _rmdir(self, d: str, path: str, keep_shared: bool) -> None:
        for delay in (*_RMDIR_RETRIES, None):
            try:
                os.rmdir(d)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise _internal(f"rmdir {d}", exc) from exc
            pids = _pids(d)
            children = [] if pids else _children(d)
            if children and keep_shared and not pids:
                log.debug("cgroup %s: left in place, it has child cgroups %s", d, children)
                return
            if pids or children or delay is None:
                raise CgroupBusy(path, pids, children)
            time.sleep(delay)

    def _cgroup_of(self, d: str) -> str:
        """The cgroup path of directory `d` (one `make` returned); BadCgroupPath if `d` is
        not a cgroup below some hierarchy's root."""
        for h in self.hierarchies:
            if d.startswith(h.mountpoint + "/"):
                return check_path(d[len(h.mountpoint) :])
        raise BadCgroupPath(f"{d!r} is in no cgroup hierarchy")


def _cgroup_mounts(mountinfo: bytes) -> list[tuple[str, str, frozenset[str]]]:
    """(fstype, mountpoint, v1 controllers) of each cgroup hierarchy, once: a hierarchy can
    be mounted more than once (bind mounts, a mount namespace's copies stacked on one path),
    and its mounts share one device number. A mount of the hierarchy's root is preferred."""
    found: dict[bytes, tuple[bytes, str, str, frozenset[str]]] = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(b" - ")
        fields, tail = left.split(b" "), right.split(b" ")
        if not sep or len(fields) < 6 or len(tail) < 3 or tail[0] not in (b"cgroup", b"cgroup2"):
            continue
        dev, root, mountpoint = fields[2], fields[3], _unescape(fields[4])
        options = tail[2].decode().split(",")
        controllers = frozenset(o for o in options if o in _V1_CONTROLLERS or o.startswith("name="))
        if dev not in found or (found[dev][0] != b"/" and root == b"/"):
            found[dev] = (root, tail[0].decode(), mountpoint, controllers)
    return [(fs, mountpoint, controllers) for _, fs, mountpoint, controllers in found.values()]


def _unescape(field: bytes) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as \\ooo."""
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field))


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _read(file: str) -> bytes:
    fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write(file: str, value: str) -> None:
    # One write(2) per value: cgroupfs parses each write on its own (O_TRUNC is what a
    # shell's `>` does; cgroupfs ignores it).
    fd = os.open(file, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _set(file: str, value: str) -> None:
    try:
        _write(file, value)
    except OSError as exc:
        raise _internal(f"write {value!r} to {file}", exc) from exc


def _set_cfs(d: str, quota: int, period: int) -> None:
    """v1 CFS quota and period. A period below the current one can be refused (EINVAL)
    until the quota is lowered: then the quota goes first and the period after it."""
    if period:
        try:
            _write(f"{d}/cpu.cfs_period_us", str(period))
            period = 0
        except OSError as exc:
            if exc.errno != errno.EINVAL or not quota:
                raise _internal(f"write {period} to {d}/cpu.cfs_period_us", exc) from exc
    if quota:
        _set(f"{d}/cpu.cfs_quota_us", str(max(quota, -1)))
    if period:
        _set(f"{d}/cpu.cfs_period_us", str(period))


def _int(file: str) -> int | None:
    try:
        return int(_read(file))
    except FileNotFoundError:
        return None


def _keyed(file: str) -> dict[str, int]:
    """A flat-keyed file (`key value` lines); empty if the file is missing."""
    try:
        text = _read(file).decode()
    except FileNotFoundError:
        return {}
    return {k: int(v) for k, v in (line.split(" ", 1) for line in text.splitlines() if " " in line)}


def _pids(d: str) -> list[int]:
    try:
        return [int(p) for p in _read(f"{d}/cgroup.procs").split()]
    except FileNotFoundError:
        return []


def _children(d: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(d) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def _internal(what: str, exc: OSError) -> Internal:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return Internal(f"cgroup {what}: {name} ({exc.strerror})")
