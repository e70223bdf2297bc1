"""Everything one daemon has made on the node, as one comparable value: the leak check
of the fuzzing and failure-injection tests ("a refused request changes nothing",
"a rolled-back Run leaves nothing").

Only what belongs to this test is looked at: pauses descended from this process,
mounts and files under the daemon's own dirs, veths on its own bridge, map elements
in its own nftables table.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import time
from dataclasses import dataclass, fields

from cgrouptools import cgroups_under
from conftest import Daemon, live_pids, mounts_under, reap_our_zombies

from shim._proto import api_pb2

_SYS_PIDFD_GETFD = 438  # the same number on x86_64 and aarch64
_SIOCGSKNS = 0x894C  # a socket's network namespace, as a new fd
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class DaemonState:
    pauses: frozenset[int]
    mounts: tuple[str, ...]  # pins (nsfs) and each pod's /dev/shm (tmpfs)
    cgroups: frozenset[str]  # under the daemon's --cgroup-root, in every hierarchy
    records: frozenset[str]
    run_dirs: frozenset[str]
    netns_pins: frozenset[str]
    addresses: frozenset[str]
    veths: frozenset[str]
    host_ports: frozenset[str]
    # (id, state) of every pod ListPodSandbox shows, newest first.
    listed: tuple[tuple[str, int], ...]

    def diff(self, other: DaemonState) -> str:
        """What differs, field by field: `self` is the expected state."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                if isinstance(mine, frozenset):
                    out.append(f"{f.name}: new {sorted(theirs - mine)} gone {sorted(mine - theirs)}")
                else:
                    out.append(f"{f.name}: expected {mine!r}, found {theirs!r}")
        return "; ".join(out)


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            break
        chain.append(pid)
    return chain


def our_pauses() -> frozenset[int]:
    """Live pyshim-pause processes descended from this test process (through a
    daemon, or re-parented to us after a daemon died: we are a subreaper)."""
    me = os.getpid()
    return frozenset(pid for pid in live_pids("pyshim-pause") if me in _ancestors(pid))


def _names(path: os.PathLike[str] | str) -> frozenset[str]:
    try:
        return frozenset(os.listdir(path))
    except FileNotFoundError:
        return frozenset()


def daemon_state(d: Daemon) -> DaemonState:
    listed = d.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    return DaemonState(
        pauses=our_pauses(),
        mounts=tuple(sorted(point for point, _ in mounts_under(d.base))),
        cgroups=frozenset(c for c in cgroups_under(d.cgroup_root) if not c.endswith(d.cgroup_root)),
        records=_names(d.root / "sandboxes"),
        run_dirs=_names(d.run_root / "sandboxes"),
        netns_pins=_names(d.netns_dir),
        addresses=_names(d.run_root / "ipam"),
        veths=_names(f"/sys/class/net/{d.bridge}/brif"),
        host_ports=frozenset(d.nft_map_elements()),
        listed=tuple((p.id, p.state) for p in listed),
    )


def settled_state(d: Daemon, expected: DaemonState, seconds: float = 5.0) -> DaemonState:
    """The daemon's state once it equals `expected`, or after `seconds`: a pod's veth
    goes with its namespace in the kernel's background, and a killed pause takes a
    moment to be reaped."""
    deadline = time.monotonic() + seconds
    while True:
        state = daemon_state(d)
        if state == expected or time.monotonic() > deadline:
            return state
        reap_our_zombies()
        time.sleep(0.02)


def assert_state(d: Daemon, expected: DaemonState, what: str = "") -> None:
    state = settled_state(d, expected)
    assert state == expected, f"{what}: {expected.diff(state)}"


def sockets_in_other_netns(pid: int) -> list[int]:
    """fds of process `pid` that are sockets in a network namespace other than its
    own: a netlink socket into a pod's namespace left open keeps that namespace (and
    its veth) alive after its pin and pause are gone."""
    own = os.stat(f"/proc/{pid}/ns/net").st_ino
    pidfd = os.pidfd_open(pid)
    stray = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue  # closed meanwhile
            fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                err = ctypes.get_errno()
                if err == errno.EBADF:
                    continue  # closed meanwhile
                raise OSError(err, f"pidfd_getfd of fd {name} of pid {pid}: {os.strerror(err)}")
            try:
                netns = fcntl.ioctl(fd, _SIOCGSKNS)
            except OSError:
                continue
            finally:
                os.close(fd)
            try:
                if os.fstat(netns).st_ino != own:
                    stray.append(int(name))
            finally:
                os.close(netns)
    finally:
        os.close(pidfd)
    return stray
