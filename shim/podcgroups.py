"""Pods' cgroups as kubelet expects them (cgroupfs driver).

A pod's cgroup is the `cgroup_parent` the request names: kubelet makes it, sets the
pod's limits on it and removes it after the pod. Where it is missing (crictl without
kubelet, or no parent named: `<cgroup root>/<sandbox id>`), pyshim makes it, records
exactly the directories it made (in every hierarchy, `name=systemd` and `unified`
too), gives it the pod's limits, and removes it with the pod. The pause lives in the
child `pyshim-<sandbox id>`, each container in `pyshim-<container id>` and its
conmon in `pyshim-conmon-<container id>`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shim.cgroups import CgroupBusy, Cgroups, Limits
from shim.errors import Internal, InvalidArgument, ShimError
from shim.store import write_atomically

log = logging.getLogger(__name__)

# In a Run's dir: the pod's cgroup and what was made for it, until the record says so.
NOTE = "cgroup.json"
PAUSE_LIMITS = Limits(cpu_shares=2)


@dataclass(frozen=True, slots=True)
class PodCgroup:
    parent: str  # the pod's cgroup
    created: tuple[str, ...]  # the directories pyshim made for it (removed with the pod)


def pause_cgroup(parent: str, sandbox_id: str) -> str:
    return f"{parent}/pyshim-{sandbox_id}"


class PodCgroups:
    def __init__(self, cgroups: Cgroups, root: str) -> None:
        self.cgroups = cgroups
        self.root = root  # for pods that name no parent
        # Making a pod's cgroup and removing the ancestors pods share, one at a time.
        self._lock = threading.Lock()

    def make(self, sandbox_id: str, parent: str, limits: Limits, run_dir: Path) -> PodCgroup:
        """The pod's cgroup, made where missing (and then given the pod's limits). The
        note in `run_dir` lets the start-up sweep remove it if the daemon dies first."""
        parent = parent or f"{self.root}/{sandbox_id}"
        with self._lock:
            existed = self.cgroups.exists(parent)
            made = PodCgroup(parent, tuple(self.cgroups.make(parent)))
        write_atomically(run_dir / NOTE, json.dumps([made.parent, *made.created]).encode(), durable=False)
        if not existed and limits != Limits():
            try:
                self.cgroups.set_limits(parent, limits)
            except Internal as exc:  # values the kernel refuses (CPUs this node lacks...)
                raise InvalidArgument(f"the pod's resources cannot be set on its cgroup: {exc}") from None
        return made

    def join_pause(self, parent: str, sandbox_id: str, pid: int) -> None:
        path = pause_cgroup(parent, sandbox_id)
        self.cgroups.join(path, pid)
        # The pause only sleeps: the least CPU weight, as containerd gives its sandbox.
        self.cgroups.set_limits(path, PAUSE_LIMITS)

    def remove_pause(self, parent: str, sandbox_id: str) -> None:
        remove_when_empty(self.cgroups, pause_cgroup(parent, sandbox_id))

    def remove(self, sandbox_id: str, made: PodCgroup) -> None:
        """Remove the pause's cgroup, then exactly the directories pyshim made for the
        pod's. One that holds someone else's cgroups by now (a later sandbox of the same
        pod, which kubelet makes in the same parent; other pods under a shared ancestor)
        is left to them; a cgroup kubelet made is never touched."""
        if not made.parent:
            return
        self.remove_pause(made.parent, sandbox_id)
        with self._lock:
            self.cgroups.remove_dirs(list(made.created))

    def sweep(self, sandbox_id: str, run_dir: Path) -> None:
        """For a Run the daemon died in: what its note names."""
        try:
            parent, *created = json.loads((run_dir / NOTE).read_bytes())
        except (OSError, ValueError):
            return
        try:
            self.remove(sandbox_id, PodCgroup(str(parent), tuple(str(d) for d in created)))
        except ShimError as exc:
            log.warning("event=cgroup_sweep_failed sandbox=%s reason=%r", sandbox_id, str(exc))


def remove_when_empty(cgroups: Cgroups, path: str, timeout: float = 2.0) -> None:
    """Remove a cgroup of a stopped pod. A process still in it is the pod's (nothing
    else is ever put there, and a reused pid cannot move in): it is killed. A dead one
    stays listed until its parent reaps it, after a daemon restart PID 1: waited for."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cgroups.remove(path)
            return
        except CgroupBusy as busy:
            if time.monotonic() > deadline:
                raise
            for pid in busy.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
