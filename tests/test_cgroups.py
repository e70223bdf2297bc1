"""shim/cgroups.py on the machine's real cgroupfs (under a test prefix of its own, removed
even when a test fails) and, for the layouts this machine does not have, on mountinfo
samples and fake cgroup trees."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cgrouptools import cgroups_under, remove_cgroups_under
from conftest import OWN_CHILDREN

from shim.cgroups import BadCgroupPath, CgroupBusy, Cgroups, Hierarchy, Limits, cpu_shares_to_weight
from shim.errors import Internal, InvalidArgument, NotFound

root = pytest.mark.root
Spawn = Callable[..., "subprocess.Popen[str]"]

# A child that allocates (and touches) or burns CPU when told, and answers each order.
CHILD = r"""
import sys, time
hold = []
while line := sys.stdin.readline():
    cmd, arg = line.split()
    if cmd == "alloc":
        hold.append(bytearray(b"\x01") * int(arg))
    elif cmd == "spin":
        end = time.process_time() + float(arg)
        while time.process_time() < end:
            pass
    print("done", flush=True)
"""


@pytest.fixture
def cg() -> Cgroups:
    return Cgroups()


@pytest.fixture
def prefix(cg: Cgroups) -> Iterator[str]:
    """A cgroup path of this test's own; everything below it is removed after the test."""
    path = f"/pyshim-test-{secrets.token_hex(4)}"
    yield path
    remove_cgroups_under(path, cg)
    assert cgroups_under(path, cg) == []


@pytest.fixture
def spawn(prefix: str) -> Iterator[Spawn]:
    """Starts processes for the test; each is killed and reaped before `prefix` is cleaned."""
    started: list[subprocess.Popen[str]] = []

    def start(*argv: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        OWN_CHILDREN.add(proc.pid)  # joins a test cgroup: not the zombie reaper's to take
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()
        OWN_CHILDREN.discard(proc.pid)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def order(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "done\n"


def proc_cgroups(pid: int) -> dict[frozenset[str], str]:
    """/proc/PID/cgroup as {controllers of the hierarchy: path}; v2's line has no controllers."""
    found = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        found[frozenset(controllers.split(",")) - {""}] = path
    return found


def read(h: Hierarchy, path: str, name: str) -> str:
    return Path(f"{h.mountpoint}{path}/{name}").read_text().strip()


def hierarchy(cg: Cgroups, controller: str) -> Hierarchy:
    return next(h for h in cg.hierarchies if controller in h.controllers)


# ---- the real cgroupfs ---------------------------------------------------------------------


@root
def test_this_machine(cg: Cgroups) -> None:
    """What DESIGN.md records: v1 hierarchies (cpu and cpuacct apart), name=systemd, and
    cgroup2 at .../unified used to track processes only."""
    mounts = {h.mountpoint: h for h in cg.hierarchies}
    if cg.mode != "hybrid":
        pytest.skip(f"this machine is {cg.mode}")
    assert mounts["/sys/fs/cgroup/unified"] == Hierarchy("/sys/fs/cgroup/unified", frozenset(), 2)
    assert mounts["/sys/fs/cgroup/systemd"].controllers == {"name=systemd"}
    assert {"cpu", "cpuacct", "cpuset", "memory", "pids"} <= cg.controllers
    assert not any(c.startswith("name=") for c in cg.controllers)
    # One entry per hierarchy, even where a mount namespace stacks two mounts of it on one path.
    assert len(mounts) == len(cg.hierarchies)


@root
def test_round_trip(cg: Cgroups, prefix: str, spawn: Spawn) -> None:
    pod, ctr = f"{prefix}/pod", f"{prefix}/pod/ctr"
    made = cg.make(ctr)
    for h in cg.hierarchies:  # every hierarchy, parents first
        mine = [d for d in made if d.startswith(h.mountpoint + "/")]
        assert mine == [h.mountpoint + p for p in (prefix, pod, ctr)]
    assert len(made) == 3 * len(cg.hierarchies)
    assert cg.make(ctr) == [] and cg.exists(ctr)

    sleep = spawn("sleep", "1000")
    cg.join(ctr, sleep.pid)
    assert proc_cgroups(sleep.pid) == {h.controllers: ctr for h in cg.hierarchies}
    if cg.mode == "hybrid":
        assert proc_cgroups(sleep.pid)[frozenset({"name=systemd"})] == ctr
        assert f"0::{ctr}" in Path(f"/proc/{sleep.pid}/cgroup").read_text().splitlines()
    assert cg.procs(ctr) == [sleep.pid]
    assert cg.procs(pod) == []

    stats = cg.stats(ctr)
    assert stats.pids == 1 and stats.oom_kills == 0
    assert stats.cpu_usage_ns is not None and stats.memory_usage is not None
    assert stats.memory_working_set is not None and 0 <= stats.memory_working_set <= stats.memory_usage
    assert abs(stats.timestamp - time.time_ns()) < 5e9
    assert cg.stats(pod).pids == 1  # hierarchical

    # Busy: refused, and everything stays where it was.
    with pytest.raises(CgroupBusy) as busy:
        cg.remove(ctr)
    assert busy.value.pids == [sleep.pid] and ctr in str(busy.value)
    with pytest.raises(CgroupBusy) as busy:
        cg.remove(pod)
    assert busy.value.children == ["ctr"]
    assert proc_cgroups(sleep.pid) == {h.controllers: ctr for h in cg.hierarchies}
    assert cg.procs(ctr) == [sleep.pid]

    sleep.kill()
    sleep.wait()
    cg.remove(ctr)
    cg.remove(ctr)  # missing is done
    assert not cg.exists(ctr)
    assert all(not os.path.exists(h.mountpoint + ctr) for h in cg.hierarchies)
    with pytest.raises(NotFound):
        cg.stats(ctr)
    cg.remove_dirs(made)
    cg.remove_dirs(made)
    assert cgroups_under(prefix, cg) == []


@root
def test_limits(cg: Cgroups, prefix: str) -> None:
    if cg.mode == "v2":
        pytest.skip("written for v1 files; v2 is covered by test_v2_on_a_fake_tree")
    ctr = f"{prefix}/ctr"
    cg.make(ctr)
    cpu, memory, cpuset = (hierarchy(cg, c) for c in ("cpu", "memory", "cpuset"))
    cg.set_limits(ctr, Limits(512, 50000, 100000, 64 << 20, "0", "0"))
    assert read(cpu, ctr, "cpu.shares") == "512"
    assert read(cpu, ctr, "cpu.cfs_quota_us") == "50000"
    assert read(cpu, ctr, "cpu.cfs_period_us") == "100000"
    assert read(memory, ctr, "memory.limit_in_bytes") == str(64 << 20)
    assert read(cpuset, ctr, "cpuset.cpus") == "0"
    # Under a parent limited to half a CPU, a shorter period with the old quota would be a
    # whole CPU: the kernel refuses it (EINVAL) until the quota is lowered first.
    cg.set_limits(prefix, Limits(cpu_quota=50000, cpu_period=100000))
    with pytest.raises(Internal, match="EINVAL"):
        cg.set_limits(ctr, Limits(cpu_period=25000))  # what the period-first order would hit
    cg.set_limits(ctr, Limits(cpu_quota=25000, cpu_period=50000))
    assert (read(cpu, ctr, "cpu.cfs_quota_us"), read(cpu, ctr, "cpu.cfs_period_us")) == ("25000", "50000")
    # Zero leaves a limit alone; negative removes it.
    cg.set_limits(ctr, Limits(cpu_shares=256))
    assert read(memory, ctr, "memory.limit_in_bytes") == str(64 << 20)
    cg.set_limits(ctr, Limits(cpu_quota=-1, memory_limit=-1))
    assert read(cpu, ctr, "cpu.cfs_quota_us") == "-1"
    assert int(read(memory, ctr, "memory.limit_in_bytes")) > 1 << 60
    cg.remove(ctr)


@root
def test_cpuset_is_inherited(cg: Cgroups, prefix: str, spawn: Spawn) -> None:
    """A new v1 cpuset cgroup gets its parent's cpus and mems, else joining it fails (ENOSPC)."""
    if "cpuset" not in cg.controllers or cg.mode == "v2":
        pytest.skip("no v1 cpuset hierarchy")
    cpuset = hierarchy(cg, "cpuset")
    cg.make(prefix)
    node_cpus = read(cpuset, "", "cpuset.cpus")
    narrower = node_cpus.split(",")[0].split("-")[0]  # the first cpu alone
    cg.set_limits(prefix, Limits(cpuset_cpus=narrower))
    made = cg.make(f"{prefix}/a/b")
    for path in (f"{prefix}/a", f"{prefix}/a/b"):
        assert read(cpuset, path, "cpuset.cpus") == narrower
        assert read(cpuset, path, "cpuset.mems") == read(cpuset, "", "cpuset.mems")
    sleep = spawn("sleep", "1000")
    cg.join(f"{prefix}/a/b", sleep.pid)
    assert os.sched_getaffinity(sleep.pid) == {int(narrower)}
    sleep.kill()
    sleep.wait()
    cg.remove_dirs(made)
    assert cg.exists(prefix) and not cg.exists(f"{prefix}/a")


@root
def test_join_makes_a_missing_cgroup(cg: Cgroups, prefix: str, spawn: Spawn) -> None:
    sleep = spawn("sleep", "1000")
    cg.join(f"{prefix}/x", sleep.pid)
    assert cg.procs(f"{prefix}/x") == [sleep.pid]
    for pid in (0, -1, True):
        with pytest.raises(ValueError):  # 0 would move the caller itself
            cg.join(f"{prefix}/x", pid)


@root
def test_remove_dirs_leaves_what_it_did_not_make(cg: Cgroups, prefix: str) -> None:
    assert len(cg.make(prefix)) == len(cg.hierarchies)  # there before: not ours
    first = cg.make(f"{prefix}/pod/a")
    second = cg.make(f"{prefix}/pod/b")
    assert len(second) == len(cg.hierarchies)  # only b: pod was made by the first
    cg.remove_dirs(first)  # pod still has b: left in place, no error
    assert cg.exists(f"{prefix}/pod/b") and not cg.exists(f"{prefix}/pod/a")
    cg.remove_dirs(second)
    # The first's pod dir, shared when the first went, is nobody's now: it stays (as runc and
    # containerd leave the parents they made); the prefix, there before, was never touched.
    left = [h.mountpoint + p for h in cg.hierarchies for p in (prefix, f"{prefix}/pod")]
    assert cgroups_under(prefix, cg) == left
    with pytest.raises(BadCgroupPath):
        cg.remove_dirs(["/etc"])
    with pytest.raises(BadCgroupPath):
        cg.remove_dirs([cg.hierarchies[0].mountpoint + "/../cpu" + prefix])
    with pytest.raises(BadCgroupPath):
        cg.remove_dirs([cg.hierarchies[0].mountpoint])


@root
def test_remove_dirs_of_a_busy_cgroup(cg: Cgroups, prefix: str, spawn: Spawn) -> None:
    made = cg.make(f"{prefix}/ctr")
    sleep = spawn("sleep", "1000")
    cg.join(f"{prefix}/ctr", sleep.pid)
    with pytest.raises(CgroupBusy) as busy:
        cg.remove_dirs(made)
    assert busy.value.pids == [sleep.pid]
    assert cg.procs(f"{prefix}/ctr") == [sleep.pid]


@root
def test_stats_move(cg: Cgroups, prefix: str, spawn: Spawn) -> None:
    """Memory (working set, rss, faults) and CPU usage follow what the process does."""
    ctr = f"{prefix}/ctr"
    cg.make(ctr)
    child = spawn(sys.executable, "-c", CHILD)
    cg.join(ctr, child.pid)
    before = cg.stats(ctr)
    order(child, f"alloc {64 << 20}")
    after = cg.stats(ctr)
    for field in ("memory_usage", "memory_working_set", "memory_rss"):
        grew = getattr(after, field) - getattr(before, field)
        assert grew >= 48 << 20, f"{field} grew by {grew} only"
    assert after.page_faults is not None and before.page_faults is not None
    assert after.page_faults - before.page_faults >= (48 << 20) // 4096 // 512  # huge pages count once
    order(child, "spin 0.3")
    spun = cg.stats(ctr)
    assert spun.cpu_usage_ns is not None and after.cpu_usage_ns is not None
    assert spun.cpu_usage_ns - after.cpu_usage_ns >= 0.25e9


@root
def test_oom_kill_is_counted(cg: Cgroups, prefix: str, spawn: Spawn) -> None:
    if Path("/proc/swaps").read_text().count("\n") > 1:
        pytest.skip("swap on: the child would swap rather than be killed")
    ctr = f"{prefix}/ctr"
    cg.make(ctr)
    child = spawn(sys.executable, "-c", CHILD)
    cg.join(ctr, child.pid)
    cg.set_limits(ctr, Limits(memory_limit=32 << 20))
    assert child.stdin is not None
    child.stdin.write(f"alloc {128 << 20}\n")
    child.stdin.flush()
    assert child.wait(timeout=30) == -9
    assert cg.stats(ctr).oom_kills == 1


@root
@pytest.mark.parametrize(
    "path",
    ["", "/", "pod", "pod/a", "/a/../b", "/..", "/a/./b", "/a//b", "/a/", "/a\0b", "/a\nb", "/" + "x" * 256],
)
def test_bad_paths_are_refused(cg: Cgroups, path: str) -> None:
    top = {h.mountpoint: sorted(os.listdir(h.mountpoint)) for h in cg.hierarchies}
    mine = proc_cgroups(os.getpid())
    calls: list[Callable[[], object]] = [
        lambda: cg.make(path),
        lambda: cg.join(path, os.getpid()),
        lambda: cg.remove(path),
        lambda: cg.procs(path),
        lambda: cg.stats(path),
        lambda: cg.set_limits(path, Limits(cpu_shares=2)),
        lambda: cg.exists(path),
    ]
    for call in calls:
        with pytest.raises(BadCgroupPath) as refused:
            call()
        assert isinstance(refused.value, ValueError) and isinstance(refused.value, InvalidArgument)
    assert {h.mountpoint: sorted(os.listdir(h.mountpoint)) for h in cg.hierarchies} == top
    assert proc_cgroups(os.getpid()) == mine


# ---- layouts this machine does not have ------------------------------------------------------

V1 = """\
18 24 0:17 / /sys rw,nosuid,nodev,noexec,relatime shared:6 - sysfs sysfs rw
24 18 0:19 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
25 24 0:20 / /sys/fs/cgroup/systemd rw shared:10 - cgroup cgroup rw,xattr,release_agent=/lib/x,name=systemd
28 24 0:23 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:13 - cgroup cgroup rw,cpu,cpuacct
29 24 0:24 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid shared:14 - cgroup cgroup rw,net_cls,net_prio
30 24 0:25 / /sys/fs/cgroup/memory rw,nosuid shared:15 - cgroup cgroup rw,memory
31 24 0:26 / /sys/fs/cgroup/cpuset rw,nosuid shared:16 - cgroup cgroup rw,cpuset,clone_children
32 24 0:27 / /sys/fs/cgroup/pids rw,nosuid shared:17 - cgroup cgroup rw,pids
33 24 0:28 / /sys/fs/cgroup/hugetlb rw,nosuid shared:18 - cgroup cgroup rw,hugetlb
90 80 0:25 /kubepods /var/lib/x/memory rw,relatime - cgroup cgroup rw,memory
"""

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
67 78 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
77 67 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""


def test_parse_v1(tmp_path: Path) -> None:
    (tmp_path / "mountinfo").write_text(V1)
    cg = Cgroups(str(tmp_path / "mountinfo"))
    assert cg.mode == "v1"
    assert {h.mountpoint: h.controllers for h in cg.hierarchies} == {
        "/sys/fs/cgroup/systemd": {"name=systemd"},
        "/sys/fs/cgroup/cpu,cpuacct": {"cpu", "cpuacct"},  # co-mounted: one hierarchy
        "/sys/fs/cgroup/net_cls,net_prio": {"net_cls", "net_prio"},
        "/sys/fs/cgroup/memory": {"memory"},  # its bind mount of /kubepods is the same one
        "/sys/fs/cgroup/cpuset": {"cpuset"},
        "/sys/fs/cgroup/pids": {"pids"},
        "/sys/fs/cgroup/hugetlb": {"hugetlb"},
    }
    assert {h.version for h in cg.hierarchies} == {1}
    assert "hugetlb" in cg.controllers and "name=systemd" not in cg.controllers


def test_parse_hybrid(tmp_path: Path) -> None:
    """Duplicates (a mount namespace's copies on the same paths) count once; the cgroup2
    mount tracks processes and offers no controller to pyshim."""
    (tmp_path / "mountinfo").write_text(HYBRID)
    cg = Cgroups(str(tmp_path / "mountinfo"))
    assert cg.mode == "hybrid"
    assert cg.hierarchies == (
        Hierarchy("/sys/fs/cgroup/cpu", frozenset({"cpu"}), 1),
        Hierarchy("/sys/fs/cgroup/cpuacct", frozenset({"cpuacct"}), 1),
        Hierarchy("/sys/fs/cgroup/memory", frozenset({"memory"}), 1),
        Hierarchy("/sys/fs/cgroup/systemd", frozenset({"name=systemd"}), 1),
        Hierarchy("/sys/fs/cgroup/unified", frozenset(), 2),
    )
    assert cg.controllers == {"cpu", "cpuacct", "memory"}


def fake_v2(tmp_path: Path) -> Cgroups:
    """A v2 node whose cgroupfs is a plain directory (its mountpoint has a space, which
    mountinfo escapes): enough to check what pyshim reads and writes there."""
    mnt = tmp_path / "fs cgroup"
    mnt.mkdir()
    (mnt / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (mnt / "cgroup.subtree_control").write_text("cpu memory\n")
    escaped = str(mnt).replace(" ", "\\040")
    (tmp_path / "mountinfo").write_text(
        "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n"
        f"26 22 0:23 / {escaped} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
        "rw,nsdelegate,memory_recursiveprot\n"
    )
    return Cgroups(str(tmp_path / "mountinfo"))


def test_parse_v2(tmp_path: Path) -> None:
    cg = fake_v2(tmp_path)
    assert cg.mode == "v2"
    controllers = frozenset({"cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc"})
    assert cg.hierarchies == (Hierarchy(str(tmp_path / "fs cgroup"), controllers, 2),)
    assert cg.controllers == controllers


def test_v2_on_a_fake_tree(tmp_path: Path) -> None:
    """make enables what the child needs in each ancestor's subtree_control, from the top
    down; limits and stats use v2's files."""
    cg = fake_v2(tmp_path)
    mnt = tmp_path / "fs cgroup"
    kubepods = mnt / "kubepods"
    kubepods.mkdir()
    (kubepods / "cgroup.controllers").write_text("cpu memory\n")  # what the root enables
    (kubepods / "cgroup.subtree_control").write_text("")
    assert cg.make("/kubepods/pod1") == [str(kubepods / "pod1")]
    # The root lacked cpuset, hugetlb, io and pids for kubepods; kubepods then enables all
    # it has (this fake's cgroup.controllers does not change when the root's does).
    assert (mnt / "cgroup.subtree_control").read_text() == "+cpuset +hugetlb +io +pids"
    assert (kubepods / "cgroup.subtree_control").read_text() == "+cpu +memory"

    pod = kubepods / "pod1"
    for name in ("cpu.weight", "cpu.max", "memory.max", "cpuset.cpus", "cpuset.mems"):
        (pod / name).write_text("")
    cg.set_limits("/kubepods/pod1", Limits(1024, 50000, 100000, 64 << 20, "0-1", "0"))
    assert [(pod / n).read_text() for n in ("cpu.weight", "cpu.max", "memory.max", "cpuset.cpus")] == [
        "39",
        "50000 100000",
        str(64 << 20),
        "0-1",
    ]
    cg.set_limits("/kubepods/pod1", Limits(cpu_quota=-1, memory_limit=-1))
    assert (pod / "cpu.max").read_text() == "max" and (pod / "memory.max").read_text() == "max"

    (pod / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    (pod / "memory.current").write_text(f"{100 << 20}\n")
    (pod / "memory.stat").write_text(
        f"anon {60 << 20}\nfile {40 << 20}\ninactive_file {30 << 20}\npgfault 70\npgmajfault 2\n"
    )
    (pod / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (pod / "pids.current").write_text("4\n")
    stats = cg.stats("/kubepods/pod1")
    assert (stats.cpu_usage_ns, stats.memory_usage, stats.memory_working_set) == (
        1_500_000,
        100 << 20,
        70 << 20,
    )
    assert (stats.memory_rss, stats.page_faults, stats.major_page_faults) == (60 << 20, 70, 2)
    assert (stats.pids, stats.oom_kills) == (4, 1)
    (pod / "memory.stat").write_text(f"inactive_file {200 << 20}\n")
    assert cg.stats("/kubepods/pod1").memory_working_set == 0  # never below zero
    with pytest.raises(NotFound):
        cg.stats("/kubepods/pod2")


def test_cpu_weight_matches_kubelet() -> None:
    # kubelet: weight = 1 + ((shares - 2) * 9999) / 262142
    assert [cpu_shares_to_weight(s) for s in (1, 2, 1024, 262144, 10**6)] == [1, 1, 39, 10000, 10000]


def test_no_cgroups(tmp_path: Path) -> None:
    (tmp_path / "mountinfo").write_text("22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n")
    with pytest.raises(Internal, match="no cgroup hierarchy"):
        Cgroups(str(tmp_path / "mountinfo"))
