"""The pod sandbox lifecycle: RunPodSandbox, Stop, Remove, Status, List.

A sandbox is a pyshim-pause process holding fresh namespaces, the pins that
keep those namespaces at stable paths, and a record on disk. Containers join
exactly the pinned paths; a sandbox's containers are stopped before its pause
and removed before its record (through the PodContainers hooks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from shim import mounts, namespaces
from shim.cgroups import Cgroups
from shim.config import Config
from shim.containers.record import ContainerRecord
from shim.errors import AlreadyExists, Internal, ShimError
from shim.events import EventBus, EventType
from shim.network import NetworkBackend, PodNetwork, netlink, node_address
from shim.network.files import write_pod_files
from shim.pause import PauseOrders, SpawnedPause, pauses_of, spawn
from shim.podcgroups import PodCgroup, PodCgroups
from shim.procs import ExitWatcher, TrackedProcess, wait_gone
from shim.registry import Registry
from shim.sandbox_record import SandboxRecord, SandboxState, sandbox_store
from shim.store import is_id, new_id
from shim.undo import Undo, inject
from shim.validate import SandboxSpec

log = logging.getLogger(__name__)

# How long a concurrent duplicate RunPodSandbox waits for the first one.
_DUPLICATE_WAIT = 240.0
# The grace period a pod's running containers get when the pod is stopped, and the time
# kept from the caller's deadline for what follows it (SIGKILL, the pause, the network).
POD_STOP_GRACE = 10.0
KILL_MARGIN = 2.0
# A pod's /dev/shm, as containerd sizes it.
SHM_SIZE = "64m"


@dataclass(eq=False)
class Sandbox:
    """A record plus what only lives in memory: its locks and its pause's pidfd.

    `lock` serialises the calls that change the sandbox (Stop, Remove, container
    creation) and may be held across slow work; `state_lock` guards only the
    swap of `record` and is never held across anything slow, so that the exit
    watcher can always take it."""

    record: SandboxRecord
    lock: threading.Lock = field(default_factory=threading.Lock)
    state_lock: threading.Lock = field(default_factory=threading.Lock)
    pause: TrackedProcess | None = None
    removed: bool = False

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def reservation(self) -> str:
        return self.record.metadata.reservation


@dataclass(frozen=True, slots=True)
class ListFilter:
    id_prefix: str = ""
    state: SandboxState | None = None
    labels: tuple[tuple[str, str], ...] = ()


class PodContainers(Protocol):
    """What the sandbox lifecycle needs from the containers of a pod."""

    def stop_all(self, sandbox_id: str, grace: float) -> None:
        """Stop every container of the pod: the stop signal, `grace` seconds, SIGKILL."""
        ...

    def remove_all(self, sandbox_id: str) -> None: ...

    def records_of(self, sandbox_id: str) -> tuple[ContainerRecord, ...]:
        """The pod's containers as they are now, for its events."""
        ...

    def announce_recovered(self) -> None:
        """Publish the exits found at start-up: their events need the pods recovered."""
        ...


class _NoContainers:
    def stop_all(self, sandbox_id: str, grace: float) -> None:
        pass

    def remove_all(self, sandbox_id: str) -> None:
        pass

    def records_of(self, sandbox_id: str) -> tuple[ContainerRecord, ...]:
        return ()

    def announce_recovered(self) -> None:
        pass


class SandboxManager:
    def __init__(
        self,
        config: Config,
        pause_path: Path,
        watcher: ExitWatcher,
        network: NetworkBackend,
        cgroups: Cgroups,
        events: EventBus | None = None,
    ) -> None:
        self.config = config
        self.events = events if events is not None else EventBus()
        self.pause_path = pause_path
        self.network = network
        self.pod_cgroups = PodCgroups(cgroups, config.cgroup_root)
        self.store = sandbox_store(config.sandboxes_dir)
        self.watcher = watcher
        self.registry: Registry[Sandbox] = Registry("pod sandbox")
        self.containers: PodContainers = _NoContainers()
        config.run_sandboxes_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        config.netns_dir.mkdir(parents=True, exist_ok=True, mode=0o755)

    @property
    def generation(self) -> int:
        return self.registry.generation

    # ---- RunPodSandbox -------------------------------------------------------------

    def run(self, spec: SandboxSpec, wait: float | None = None) -> str:
        """Create a READY sandbox, or return the READY one that already has this name.

        A duplicate of a NOTREADY sandbox is ALREADY_EXISTS; a duplicate that
        arrives while the first is still being made waits for it (at most `wait`
        seconds, the caller's deadline).
        """
        name = spec.metadata.reservation
        holder = self.registry.reserve(name, min(wait or _DUPLICATE_WAIT, _DUPLICATE_WAIT))
        if holder is not None:
            record = holder.record
            if record.state is SandboxState.READY:
                log.info("event=run_duplicate sandbox=%s name=%s", record.id, name)
                return record.id
            raise AlreadyExists(
                f"pod sandbox name {name!r} is taken by NOTREADY sandbox {record.id}; "
                "remove it first (crictl rmp) or use another attempt number"
            )
        sandbox: Sandbox | None = None
        try:
            sandbox = self._create(spec)
        finally:
            if sandbox is None:
                self.registry.release(name)
            else:
                self.registry.commit(name, sandbox)
        # As containerd: the sandbox's own id as the container's, created then started.
        self._announce(EventType.CREATED, sandbox)
        self._announce(EventType.STARTED, sandbox)
        self._watch(sandbox)
        return sandbox.id

    def _create(self, spec: SandboxSpec) -> Sandbox:
        """A READY sandbox; on failure nothing is left, or (if an undo failed) a
        NOTREADY sandbox holding what is left, which is returned after raising."""
        sandbox_id = new_id()
        # The run dir is the intent marker: if the daemon dies before the record is
        # written, the start-up sweep finds it and finishes the job.
        run_dir = self.config.run_sandboxes_dir / sandbox_id
        made = _Made(sandbox_id, self.config.fail_at)
        try:
            run_dir.mkdir(mode=0o700)
            (run_dir / "ns").mkdir()
            self._inject("mkdir")
            self._make_cgroup(spec, made)
            self._inject("cgroup")

            spawned = spawn(self.pause_path, self._orders(sandbox_id, spec), self.config.pause_start_timeout)
            if spawned.netlink is not None:
                made.undo("close_netlink", spawned.netlink.close)
            made.pause = self._track(sandbox_id, spawned)
            # Not watched before the record is committed: until then the pause stays our
            # unreaped child, so its pid cannot be reused under the pins below.
            made.undo("kill_pause", made.drop_pause)
            for warning in spawned.warnings:
                log.info("event=pause_warning sandbox=%s detail=%r", sandbox_id, warning)
            self.pod_cgroups.join_pause(made.cgroup.parent, sandbox_id, spawned.identity.pid)
            self._inject("spawn")

            self._pin_all(spawned, spec, made)
            self._inject("pin")
            if "ipc" in spec.namespaces:
                self._mount_shm(run_dir, made)
            self._inject("shm")
            pod_network = self._setup_network(spawned, spec, made)
            self._inject("network")
            hostname = spec.hostname or (socket.gethostname() if pod_network is None else "")
            files = write_pod_files(
                run_dir, hostname, pod_network.ip if pod_network else node_address(), spec.dns
            )
            record = self._record(spec, made, SandboxState.READY, files)
            self._inject("save")
            made.undo("delete_record", self.store.delete, sandbox_id)
            self.store.save(record)
            self._inject("commit")  # written, not yet committed: the only way to reach delete_record
        except BaseException:
            if made.rollback():
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            self._keep_remains(spec, made)
            raise
        log.info(
            "event=sandbox_ready sandbox=%s name=%s pid=%d namespaces=%s",
            sandbox_id,
            spec.metadata.reservation,
            spawned.identity.pid,
            ",".join(sorted(made.pins)),
        )
        return Sandbox(record=record, pause=made.pause)

    def _make_cgroup(self, spec: SandboxSpec, made: _Made) -> None:
        # Registered first: what make() creates, and then the pause's cgroup, go on any failure.
        made.undo("cgroup", made.drop_cgroups, self.pod_cgroups)
        made.cgroup = self.pod_cgroups.make(
            made.sandbox_id, spec.cgroup_parent, spec.limits, self.config.run_sandboxes_dir / made.sandbox_id
        )

    def _mount_shm(self, run_dir: Path, made: _Made) -> None:
        """One /dev/shm for all of the pod's containers, as containerd makes it."""
        shm = run_dir / "shm"
        shm.mkdir(mode=0o1777)
        mounts.mount(
            "shm",
            shm,
            "tmpfs",
            mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC,
            f"mode=1777,size={SHM_SIZE}",
        )
        made.shm = str(shm)
        made.undo("shm", made.drop_shm)

    def _setup_network(self, spawned: SpawnedPause, spec: SandboxSpec, made: _Made) -> PodNetwork | None:
        if spawned.netlink is None:
            return None
        netlink.link_up(spawned.netlink)
        net = made.pins["net"]
        # Registered before setup: a setup that fails midway may have taken an address.
        made.network = PodNetwork(ip="", backend=self.network.kind())
        made.undo("network", made.drop_network, self.network, spec)
        pod_network = self.network.setup(
            made.sandbox_id, net, spawned.netlink, spec.port_mappings, spec.metadata
        )
        made.network = pod_network
        spawned.netlink.close()
        return pod_network

    @staticmethod
    def _record(spec: SandboxSpec, made: _Made, state: SandboxState, files: dict[str, str]) -> SandboxRecord:
        """What is made so far, as a record: a READY pod, or the remains of a failed undo."""
        return SandboxRecord(
            id=made.sandbox_id,
            metadata=spec.metadata,
            state=state,
            created_at=time.time_ns(),
            modes=spec.modes,
            runtime_handler=spec.runtime_handler,
            hostname=spec.hostname,
            log_directory=spec.log_directory,
            labels=spec.labels,
            annotations=spec.annotations,
            pause=made.pause.identity if made.pause else None,
            namespaces=namespaces.NamespacePaths.of(dict(made.pins)),
            network=made.network,
            files=files,
            cgroup_parent=made.cgroup.parent,
            cgroup_created=made.cgroup.created,
            shm=made.shm,
            config=spec.config,
        )

    def _keep_remains(self, spec: SandboxSpec, made: _Made) -> None:
        """An undo failed: what is left stays known as a NOTREADY sandbox that Stop
        and Remove can finish (its name stays taken until then)."""
        record = self._record(spec, made, SandboxState.NOTREADY, {})
        try:
            self.store.save(record)
        except OSError:
            log.exception("event=remains_unrecorded sandbox=%s detail=left for the start-up sweep", record.id)
            return
        sandbox = Sandbox(record=record, pause=made.pause)
        self.registry.commit(spec.metadata.reservation, sandbox)
        self._watch(sandbox)
        log.error(
            "event=rollback_incomplete sandbox=%s state=NOTREADY detail=Stop or Remove finishes it", record.id
        )

    def _orders(self, sandbox_id: str, spec: SandboxSpec) -> PauseOrders:
        return PauseOrders(
            sandbox_id=sandbox_id,
            namespaces=spec.namespaces,
            hostname=spec.hostname or None,
            sysctls=spec.sysctls,
            oom_score_adj=self.config.pause_oom_score_adj,
        )

    def _track(self, sandbox_id: str, spawned: SpawnedPause) -> TrackedProcess:
        proc = TrackedProcess.adopt(spawned.identity)
        if proc is None:
            # Died already: a zombie child of ours, reaped here.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(spawned.identity.pid, os.WNOHANG)
            raise Internal(f"pause of sandbox {sandbox_id} (pid {spawned.identity.pid}) exited at start")
        return proc

    def _pin_all(self, spawned: SpawnedPause, spec: SandboxSpec, made: _Made) -> None:
        for kind in sorted(spec.namespaces):
            target = self._pin_path(made.sandbox_id, kind)
            namespaces.pin(spawned.identity.pid, kind, target)
            made.pins[kind] = str(target)
            made.undo("unpin", made.drop_pin, kind)

    def _pin_path(self, sandbox_id: str, kind: str) -> Path:
        if kind == "net":
            return self.config.netns_dir / f"pyshim-{sandbox_id}"
        return self.config.run_sandboxes_dir / sandbox_id / "ns" / kind

    def _inject(self, step: str) -> None:
        inject(self.config.fail_at, step)

    # ---- StopPodSandbox / RemovePodSandbox ----------------------------------------

    def stop(self, sandbox_id: str, deadline: float | None = None) -> None:
        """Stop the pod's containers, then kill the pause and release its namespaces
        and network. Unknown ids and repeats succeed. `deadline` (seconds the caller
        waits) bounds the containers' grace period."""
        sandbox = self.registry.find(sandbox_id)
        if sandbox is None:
            return
        with sandbox.lock:
            if not sandbox.removed:
                self._stop_locked(sandbox, deadline)

    def _stop_locked(self, sandbox: Sandbox, deadline: float | None) -> None:
        # First: in a POD pid namespace the pause's death kills every container at
        # once, and each container is owed its grace period (CRI-O's: 10 s, or what
        # the caller's deadline leaves, all at once; kubelet stops them before anyway).
        grace = POD_STOP_GRACE if deadline is None else max(0.0, min(POD_STOP_GRACE, deadline - KILL_MARGIN))
        self.containers.stop_all(sandbox.id, grace)
        record = sandbox.record
        if (
            record.state is SandboxState.NOTREADY
            and record.pause is None
            and record.network is None
            and not record.namespaces.paths
            and not record.shm
        ):
            # Stopped before: nothing is left to release but, after a failed undo, the
            # pause's cgroup (gone already on every other path: this is an rmdir of nothing).
            if record.cgroup_parent:
                self.pod_cgroups.remove_pause(record.cgroup_parent, record.id)
            return
        with sandbox.state_lock:  # first: its exit is then Stop's, not news (nor an event)
            pause, sandbox.pause = sandbox.pause, None
        if pause is not None and not pause.terminate(self.config.pause_stop_timeout):
            sandbox.pause = pause
            raise Internal(
                f"pause of sandbox {record.id} (pid {pause.identity.pid}) did not exit after SIGKILL"
            )
        network_gone = pins_gone = False
        try:
            if record.network is not None:
                # While the namespace is still pinned: CNI plugins clean up inside it. The
                # built-in network gives the address back here too; the veth is gone once
                # the pin is (the pause is dead), and addresses are handed out round-robin.
                net = record.namespaces.get("net") or ""
                self.network.teardown(record.id, record.network, net, record.metadata)
                network_gone = True
            for path in record.namespaces.as_dict().values():
                namespaces.unpin(Path(path))
            if record.shm:
                mounts.umount(Path(record.shm))
            if record.cgroup_parent:
                self.pod_cgroups.remove_pause(record.cgroup_parent, record.id)
            pins_gone = True
        finally:
            # One write, also after a partial failure: what is left stays recorded for a retry.
            self._update(sandbox, lambda r: _stopped(r, network_gone, pins_gone))
        log.info("event=sandbox_stopped sandbox=%s", record.id)
        if pause is not None:  # a pause that died on its own was announced when it did
            self._announce(EventType.STOPPED, sandbox)

    def remove(self, sandbox_id: str, deadline: float | None = None) -> None:
        """Stop if needed, remove the pod's containers, then delete every trace.
        Unknown ids and repeats succeed."""
        sandbox = self.registry.find(sandbox_id)
        if sandbox is None:
            return
        with sandbox.lock:
            if sandbox.removed:
                return
            self._stop_locked(sandbox, deadline)
            self.containers.remove_all(sandbox.id)
            record = sandbox.record
            self.pod_cgroups.remove(record.id, PodCgroup(record.cgroup_parent, record.cgroup_created))
            shutil.rmtree(self.config.run_sandboxes_dir / sandbox.id, ignore_errors=True)
            self.store.delete(sandbox.id)
            sandbox.removed = True
        self.registry.discard(sandbox)
        log.info("event=sandbox_removed sandbox=%s", sandbox.id)
        # With the last status (containerd 2.x does the same): kubelet ignores an event
        # without one, and drops the pod from its cache on this one.
        self._announce(EventType.DELETED, sandbox)

    def _update(self, sandbox: Sandbox, change: Callable[[SandboxRecord], SandboxRecord]) -> None:
        """Apply a change to the latest record, persist it, then show it (nothing is
        written if the change returns the record as it is)."""
        with sandbox.state_lock:
            record = change(sandbox.record)
            if record is sandbox.record:
                return
            self.store.save(record)
            sandbox.record = record
        self.registry.changed()

    def _watch(self, sandbox: Sandbox) -> None:
        pause = sandbox.pause
        if pause is not None:
            # An exit that already happened shows as a readable pidfd: seen at once.
            self.watcher.watch(pause, lambda proc: self._on_pause_exit(sandbox, proc))

    def _on_pause_exit(self, sandbox: Sandbox, pause: TrackedProcess) -> None:
        """A pause died outside of Stop: the sandbox is NOTREADY; pins stay for Stop.
        Runs on the exit watcher, so it takes only the short state lock."""
        with sandbox.state_lock:
            if sandbox.removed or sandbox.pause is not pause:
                return  # Stop killed it, and says so itself
            sandbox.pause = None
        self._update(sandbox, lambda r: replace(r, state=SandboxState.NOTREADY, pause=None))
        log.warning("event=pause_exited sandbox=%s state=NOTREADY", sandbox.id)
        self._announce(EventType.STOPPED, sandbox)

    def _announce(self, kind: EventType, sandbox: Sandbox) -> None:
        self.events.emit(sandbox.id, kind, lambda: (sandbox.record, self.containers.records_of(sandbox.id)))

    # ---- PodSandboxStatus / ListPodSandbox ----------------------------------------

    def get(self, sandbox_id: str) -> SandboxRecord:
        return self.registry.get(sandbox_id).record

    def find(self, sandbox_id: str) -> Sandbox | None:
        return self.registry.find(sandbox_id)

    def list(self, flt: ListFilter) -> list[SandboxRecord]:
        records = [s.record for s in self.registry.entries(flt.id_prefix)]
        return sorted((r for r in records if _matches(r, flt)), key=lambda r: r.created_at, reverse=True)

    # ---- start-up --------------------------------------------------------------------

    def recover(self) -> None:
        """Reload every record, re-adopt live pauses, and sweep what a crash left half-made."""
        records = self.store.load_all()
        for record in records:
            self._adopt(record)
        self._sweep_unrecorded()
        with_network = [r for r in records if r.network is not None]
        self.network.reconcile({r.id: r.network for r in with_network if r.network is not None})
        self.network.sync_ports([r.network for r in with_network if r.network is not None])
        self._check_networks()
        self.containers.announce_recovered()
        ready = sum(1 for s in self.registry.entries() if s.record.state is SandboxState.READY)
        log.info("event=recovered sandboxes=%d ready=%d", len(records), ready)

    def _check_networks(self) -> None:
        """After a restart, ask the network (CNI CHECK) whether READY pods still have theirs."""
        for sandbox in self.registry.entries():
            record = sandbox.record
            net = record.namespaces.get("net")
            if record.state is not SandboxState.READY or record.network is None or net is None:
                continue
            try:
                self.network.check(record.id, record.network, net, record.metadata)
            except ShimError as exc:
                log.warning("event=network_check_failed sandbox=%s reason=%r", record.id, str(exc))
            else:
                log.info("event=network_checked sandbox=%s", record.id)

    def _adopt(self, record: SandboxRecord) -> None:
        pause = TrackedProcess.adopt(record.pause) if record.pause else None
        was_ready = record.state is SandboxState.READY
        if pause is None and record.state is SandboxState.READY:
            record = replace(record, state=SandboxState.NOTREADY, pause=None)
            self.store.save(record)
            log.warning("event=pause_gone sandbox=%s state=NOTREADY", record.id)
        elif record.state is SandboxState.READY and not all(
            os.path.ismount(path) for path in record.namespaces.as_dict().values()
        ):
            # A rollback that died after its record could not be deleted: the pause may
            # live on while its pins are gone. Not READY; Stop and Remove finish it.
            record = replace(record, state=SandboxState.NOTREADY)
            self.store.save(record)
            log.warning("event=pins_gone sandbox=%s state=NOTREADY", record.id)
        sandbox = Sandbox(record=record, pause=pause)
        self.registry.adopt(sandbox)
        if was_ready and record.state is not SandboxState.READY:
            self._announce(EventType.STOPPED, sandbox)  # it stopped while pyshim was down
        self._watch(sandbox)

    def _sweep_unrecorded(self) -> None:
        """Run dirs and net pins without a record file are Runs the daemon died in:
        undo them. A record that exists but could not be loaded protects its
        sandbox: it is never swept."""
        recorded = self.store.ids()
        found = {p.name for p in self.config.run_sandboxes_dir.iterdir()}
        found |= {p.name.removeprefix("pyshim-") for p in self.config.netns_dir.glob("pyshim-*")}
        for sandbox_id in sorted(found - recorded):
            if not is_id(sandbox_id):
                continue
            run_dir = self.config.run_sandboxes_dir / sandbox_id
            killed = list(pauses_of(sandbox_id))
            for pid in killed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            wait_gone(killed)  # their cgroups can go only once they have
            with contextlib.suppress(ShimError):
                self.network.teardown(sandbox_id, None, str(self._pin_path(sandbox_id, "net")), None)
            for kind in namespaces.KINDS:
                with contextlib.suppress(ShimError):
                    namespaces.unpin(self._pin_path(sandbox_id, kind))
            with contextlib.suppress(ShimError):
                mounts.umount(run_dir / "shm")
            self.pod_cgroups.sweep(sandbox_id, run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
            log.warning("event=swept_half_made sandbox=%s", sandbox_id)


class _Made:
    """What a RunPodSandbox in flight has made so far, and the undo of each piece,
    run newest first. Every undo runs even if one fails; an undo that succeeds
    forgets its piece, so after a failed rollback what is left is exactly what the
    remaining fields name."""

    def __init__(self, sandbox_id: str, fail_at: tuple[str, ...]) -> None:
        self.sandbox_id = sandbox_id
        self._undo = Undo(f"sandbox={sandbox_id}", fail_at)
        self.pause: TrackedProcess | None = None
        self.pins: dict[str, str] = {}
        self.network: PodNetwork | None = None
        self.cgroup = PodCgroup("", ())
        self.shm = ""

    def undo(self, name: str, step: Callable[..., object], *args: object) -> None:
        self._undo.add(name, step, *args)

    def drop_pause(self) -> None:
        if self.pause is not None:
            self.pause.kill_and_reap()
            self.pause = None

    def drop_pin(self, kind: str) -> None:
        namespaces.unpin(Path(self.pins[kind]))
        del self.pins[kind]

    def drop_cgroups(self, pod_cgroups: PodCgroups) -> None:
        pod_cgroups.remove(self.sandbox_id, self.cgroup)
        self.cgroup = PodCgroup("", ())

    def drop_shm(self) -> None:
        mounts.umount(Path(self.shm))
        self.shm = ""

    def drop_network(self, network: NetworkBackend, spec: SandboxSpec) -> None:
        pod = self.network if self.network is not None and self.network.ip else None
        network.teardown(self.sandbox_id, pod, self.pins.get("net", ""), spec.metadata)
        self.network = None

    def rollback(self) -> bool:
        return self._undo.run()


def _stopped(record: SandboxRecord, network_gone: bool, pins_gone: bool) -> SandboxRecord:
    return replace(
        record,
        state=SandboxState.NOTREADY,
        pause=None,
        network=None if network_gone else record.network,
        namespaces=namespaces.NamespacePaths() if pins_gone else record.namespaces,
        shm="" if pins_gone else record.shm,
    )


def _matches(record: SandboxRecord, flt: ListFilter) -> bool:
    if flt.state is not None and record.state is not flt.state:
        return False
    return all(record.labels.get(k) == v for k, v in flt.labels)
