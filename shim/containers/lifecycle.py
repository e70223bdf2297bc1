"""The container lifecycle: CreateContainer, Start, Stop, Remove, Status, List,
UpdateContainerResources, ReopenContainerLog, and what happens when a container's
process exits, also while the daemon was down.

A container is an overlay root filesystem, a bundle (config.json and conmon's
files) under the run root, a conmon holding its stdio, the OCI runtime's state,
a cgroup under its pod's, and a record on disk. It joins exactly the namespaces
its pod's pause pins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from shim._proto import api_pb2
from shim.cgroups import Cgroups
from shim.config import Config
from shim.containers import mounts as container_mounts
from shim.containers import spec as oci
from shim.containers import sweep
from shim.containers import validate as container_validate
from shim.containers.conmon import Conmon, Exit, forget, read_exit, reopen_log
from shim.containers.exec import ExecResult, exec_sync
from shim.containers.record import (
    ContainerRecord,
    ContainerState,
    ContainerUser,
    container_store,
    exited,
    reservation,
    started,
)
from shim.containers.runtime import Runtime
from shim.errors import AlreadyExists, FailedPrecondition, Internal, NotFound, ShimError
from shim.events import EventType
from shim.images import Images
from shim.images.layers import LayerStore
from shim.images.store import ImageRecord
from shim.procs import ExitWatcher, TrackedProcess
from shim.registry import Registry
from shim.sandbox import Sandbox, SandboxManager
from shim.sandbox_record import NamespaceMode, SandboxRecord, SandboxState
from shim.store import is_id, new_id, write_atomically
from shim.undo import Undo, inject

log = logging.getLogger(__name__)

# After SIGKILL, how long a container may take to be gone before Stop gives up.
KILL_WAIT = 10.0


@dataclass(eq=False)
class Container:
    """A record plus what only lives in memory: locks, process handles, an exit event.

    `lock` serialises Start, Stop, Remove and the other calls that act on the
    container and may be held across slow work; `state_lock` only guards swapping
    `record`, so that the exit watcher can always take it."""

    record: ContainerRecord
    lock: threading.Lock = field(default_factory=threading.Lock)
    state_lock: threading.Lock = field(default_factory=threading.Lock)
    monitor: TrackedProcess | None = None  # conmon
    process: TrackedProcess | None = None  # the container's first process, for signals
    exited: threading.Event = field(default_factory=threading.Event)
    removed: bool = False

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def reservation(self) -> str:
        return self.record.reservation


@dataclass(frozen=True, slots=True)
class ListFilter:
    id_prefix: str = ""
    state: ContainerState | None = None
    sandbox_id: str = ""
    labels: tuple[tuple[str, str], ...] = ()


class ContainerManager:
    def __init__(
        self,
        config: Config,
        sandboxes: SandboxManager,
        images: Images,
        layers: LayerStore,
        cgroups: Cgroups,
        host: oci.HostFacts,
        watcher: ExitWatcher,
        runtimes: dict[str, Runtime],
        conmon: Conmon,
    ) -> None:
        self.config = config
        self.sandboxes = sandboxes
        self.images = images
        self.layers = layers
        self.cgroups = cgroups
        self.host = host
        self.watcher = watcher
        self.runtimes = runtimes
        self.conmon = conmon
        self.store = container_store(config.containers_dir)
        self.registry: Registry[Container] = Registry("container")
        config.run_containers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Layers under a container being made are not yet in any record: kept here.
        self._making: dict[str, tuple[str, ...]] = {}
        self._making_lock = threading.Lock()
        self.events = sandboxes.events
        # Events of exits found while recovering, held until the pods are recovered too.
        self._held: list[tuple[EventType, Container]] | None = None
        self._held_lock = threading.Lock()  # the exit watcher may add to it meanwhile
        sandboxes.containers = self
        layers.in_use = self.layers_in_use

    @property
    def generation(self) -> int:
        return self.registry.generation

    def bundle(self, container_id: str) -> Path:
        return self.config.run_containers_dir / container_id

    # ---- CreateContainer ------------------------------------------------------------

    def create(self, spec: oci.ContainerSpec) -> str:
        """A CREATED container in a READY pod; on failure nothing is left."""
        sandbox = self.sandboxes.find(spec.sandbox_id)
        if sandbox is None:
            raise NotFound(f"pod sandbox {spec.sandbox_id!r} not found")
        with sandbox.lock:  # the pod cannot be stopped or removed while its container is made
            pod = sandbox.record
            if sandbox.removed:
                raise NotFound(f"pod sandbox {spec.sandbox_id!r} not found")
            if pod.state is not SandboxState.READY:
                raise FailedPrecondition(
                    f"pod sandbox {pod.id} is not ready (its pause is gone or it was stopped): "
                    "no container can be created in it"
                )
            image = self.images.get(spec.image)
            name = reservation(pod.id, spec.name, spec.attempt)
            holder = self.registry.reserve(name, 0.0)
            if holder is not None:
                raise AlreadyExists(
                    f"container name {spec.name!r} (attempt {spec.attempt}) in pod {pod.id} is taken by "
                    f"container {holder.id}; remove it first or use another attempt number"
                )
            container: Container | None = None
            try:
                container = self._create(spec, sandbox, image)
            finally:
                if container is None:
                    self.registry.release(name)
                else:
                    self.registry.commit(name, container)
        self._announce(EventType.CREATED, container)  # before the watch: its exit comes after
        self._watch(container)
        return container.id

    def _create(self, spec: oci.ContainerSpec, sandbox: Sandbox, image: ImageRecord) -> Container:
        pod = sandbox.record
        container_id = new_id()
        bundle = self.bundle(container_id)
        runtime = self.runtime(pod.runtime_handler)
        undo = Undo(f"container={container_id}", self.config.fail_at)
        cgroup = container_cgroup(pod.cgroup_parent, container_id)
        log_path = container_validate.log_file(pod.log_directory, spec.log_path)
        try:
            # The bundle dir is the intent marker: the start-up sweep undoes a Create
            # the daemon died in by what this dir names.
            bundle.mkdir(mode=0o700)
            self._inject("container-mkdir")
            with self._making_lock:
                self._making[container_id] = image.layers
            undo.add("container-layers", self._made, container_id)
            rootfs = self.layers.prepare(container_id, image)
            undo.add("container-rootfs", self.layers.release, container_id)
            self._inject("container-rootfs")
            container_mounts.prepare_host(spec.config)
            built = self._spec(spec, sandbox, container_id, rootfs, image, cgroup)
            for note in built.notes:
                log.info("event=not_applied container=%s detail=%r", container_id, note)
            write_atomically(bundle / "config.json", json.dumps(built.document).encode(), durable=False)
            self._inject("container-spec")
            if log_path:
                Path(log_path).parent.mkdir(parents=True, exist_ok=True)
                undo.add("container-log", Path(log_path).unlink, True)
            # Registered before launch: a runtime that fails halfway may leave its state and cgroups.
            undo.add("container-cgroups", self._remove_cgroups, cgroup)
            undo.add("container-runtime", runtime.delete, container_id)
            undo.add("container-attach", forget, self.conmon.attach_dir, container_id)
            launched = self.conmon.launch(
                runtime,
                container_id,
                spec.name,
                bundle,
                log_path,
                monitor_cgroup(pod.cgroup_parent, container_id),
                tty=spec.config.tty,
                stdin=spec.config.stdin,
                stdin_once=spec.config.stdin_once,
            )
            undo.add("container-conmon", launched.monitor.kill_and_reap)
            self._inject("container-create")
            record = ContainerRecord(
                id=container_id,
                sandbox_id=pod.id,
                name=spec.name,
                attempt=spec.attempt,
                state=ContainerState.CREATED,
                created_at=time.time_ns(),
                image=_image_name(spec, image),
                image_id=image.id,
                image_ref=image.repo_digests[0] if image.repo_digests else image.id,
                runtime_handler=runtime.handler,
                cgroup=cgroup,
                log_path=log_path,
                layers=image.layers,
                labels=spec.labels,
                annotations=spec.annotations,
                pid=launched.pid,
                monitor=launched.monitor.identity,
                user=ContainerUser(built.uid, built.gid, built.additional_gids),
                stop_signal=oci.stop_signal(spec.config, image.config),
                resources=spec.config.linux.resources.SerializeToString(deterministic=True),
                config=spec.config_bytes,
            )
            self._inject("container-save")
            undo.add("container-record", self.store.delete, container_id)
            self.store.save(record)
        except BaseException:
            if undo.run():
                shutil.rmtree(bundle, ignore_errors=True)
            else:
                # The bundle (its config.json names the cgroup) stays as the sweep's marker.
                log.error(
                    "event=rollback_incomplete container=%s detail=left for the start-up sweep", container_id
                )
            raise
        finally:
            self._made(container_id)
        log.info(
            "event=container_created container=%s sandbox=%s name=%s pid=%d runtime=%s",
            container_id,
            pod.id,
            spec.name,
            launched.pid.pid,
            runtime.kind,
        )
        return Container(record=record, monitor=launched.monitor, process=TrackedProcess.adopt(launched.pid))

    def _spec(
        self,
        spec: oci.ContainerSpec,
        sandbox: Sandbox,
        container_id: str,
        rootfs: Path,
        image: ImageRecord,
        cgroup: str,
    ) -> oci.BuiltSpec:
        pod = sandbox.record
        target = ""
        options = spec.config.linux.security_context.namespace_options
        if options.pid == api_pb2.TARGET:
            target = self._target_pid_namespace(pod.id, options.target_id)
        return oci.build(
            spec,
            oci.PodContext(
                sandbox_id=pod.id,
                namespaces=pod.namespaces.as_dict(),
                modes=pod.modes,
                hostname=pod.hostname or _node_hostname(pod),
                files=pod.files,
                shm=pod.shm,
                log_directory=pod.log_directory,
            ),
            oci.ContainerContext(
                container_id=container_id,
                rootfs=rootfs,
                image=image.config,
                cgroups_path=cgroup,
                target_pid_namespace=target,
            ),
            self.host,
        )

    def _target_pid_namespace(self, sandbox_id: str, target_id: str) -> str:
        target = self.registry.find(target_id)
        if target is None or target.record.sandbox_id != sandbox_id:
            raise NotFound(f"pid namespace target container {target_id!r} not found in pod {sandbox_id}")
        process = target.record.pid
        if target.record.state is not ContainerState.RUNNING or process is None:
            raise FailedPrecondition(f"pid namespace target container {target.id} is not running")
        return f"/proc/{process.pid}/ns/pid"

    def _made(self, container_id: str) -> None:
        with self._making_lock:
            self._making.pop(container_id, None)

    def layers_in_use(self) -> set[str]:
        """Layers under a container's root filesystem (also one being made): never deleted."""
        with self._making_lock:
            used = {d for layers in self._making.values() for d in layers}
        return used | {d for c in self.registry.entries() for d in c.record.layers}

    def runtime(self, handler: str) -> Runtime:
        found = self.runtimes.get(handler)
        if found is None:
            raise FailedPrecondition(f"runtime handler {handler!r} of this pod is not configured any more")
        return found

    def _inject(self, step: str) -> None:
        inject(self.config.fail_at, step)

    # ---- StartContainer -------------------------------------------------------------

    def start(self, container_id: str) -> None:
        container = self.registry.get(container_id)
        with container.lock:
            record = container.record
            if container.removed:
                raise NotFound(f"container {container_id!r} not found")
            if record.state is not ContainerState.CREATED:
                raise FailedPrecondition(
                    f"container {record.id} is {record.state.value}: only a created container can be started"
                )
            runtime = self.runtime(record.runtime_handler)
            # Taken before: a process that exits at once must not seem to end before it began.
            now = time.time_ns()
            try:
                self._inject("container-start")
                runtime.start(record.id)
            except ShimError as exc:
                self._fail_start(container, exc)
                raise
            # Not fsynced: after a machine crash no container runs, whatever this says;
            # a daemon crash loses nothing written.
            self._update(container, lambda r: started(r, now), durable=False, announce=EventType.STARTED)
        log.info("event=container_started container=%s", record.id)

    def _fail_start(self, container: Container, exc: ShimError) -> None:
        """A container that could not start is over: its process is killed, and it is
        EXITED with the reason, as containerd reports a StartError."""
        self._signal(container, signal.SIGKILL, every_process=True)
        container.exited.wait(KILL_WAIT)
        message = str(exc)[:1000]
        self._update(
            container,
            lambda r: replace(
                r,
                state=ContainerState.EXITED,
                exit_code=128,
                reason="StartError",
                message=message,
                finished_at=r.finished_at or time.time_ns(),
            ),
            # The call fails, but the container did end: kubelet must not go on seeing it created.
            announce=EventType.STOPPED,
        )

    # ---- StopContainer / RemoveContainer --------------------------------------------

    def stop(self, container_id: str, timeout: float) -> None:
        """Signal (the image's stop signal, or SIGTERM), wait `timeout` seconds, then
        SIGKILL every process of the container. Unknown ids and repeats succeed."""
        container = self.registry.find(container_id)
        if container is None:
            return
        if timeout > 0:
            # The grace period is waited out without the container's lock: a second stop
            # (StopPodSandbox after kubelet's StopContainer of 30 s) must be able to kill
            # at its own deadline, not wait for the first one's.
            with container.lock:
                if container.removed or not self._stoppable(container):
                    return
                self._signal(container, container.record.stop_signal)
            if container.exited.wait(timeout):
                log.info(
                    "event=container_stopped container=%s signal=%d",
                    container.id,
                    container.record.stop_signal,
                )
                return
            log.warning(
                "event=sigkill container=%s reason=no exit %.1fs after the stop signal", container.id, timeout
            )
        with container.lock:
            if not container.removed:
                self._kill_locked(container)

    @staticmethod
    def _stoppable(container: Container) -> bool:
        running = container.record.state in (ContainerState.RUNNING, ContainerState.UNKNOWN)
        return running and not container.exited.is_set()

    def _kill_locked(self, container: Container) -> None:
        """SIGKILL to every process of the container, and its exit awaited (under its lock)."""
        record = container.record
        if not self._stoppable(container):
            return
        self._signal(container, signal.SIGKILL, every_process=True)
        if not container.exited.wait(KILL_WAIT):
            raise Internal(f"container {record.id} did not exit {KILL_WAIT:.0f}s after SIGKILL")
        log.info("event=container_stopped container=%s signal=%d", record.id, signal.SIGKILL)

    def _signal(self, container: Container, signo: int, every_process: bool = False) -> None:
        """To the container's first process through its pidfd; with every_process, to
        every process in its cgroup too (in a shared pid namespace the first process's
        death does not end the others)."""
        if container.process is not None:
            container.process.signal(signo)
        elif container.record.pid is not None:
            runtime = self.runtime(container.record.runtime_handler)
            with contextlib.suppress(ShimError):
                runtime.kill(container.id, signo, every_process)
        if every_process:
            for pid in self.cgroups.procs(container.record.cgroup):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signo)

    def remove(self, container_id: str) -> None:
        """Stop (SIGKILL) if needed, then delete every trace. Unknown ids and repeats succeed."""
        container = self.registry.find(container_id)
        if container is None:
            return
        with container.lock:
            if container.removed:
                return
            self._kill_locked(container)
            self._teardown(container)
        self.registry.discard(container)
        self._announce(EventType.DELETED, container)
        self.layers.remove_unused(self.images.live_layers())
        log.info("event=container_removed container=%s", container.id)

    def _teardown(self, container: Container) -> None:
        record = container.record
        runtime = self.runtimes.get(record.runtime_handler)
        if runtime is not None:
            runtime.delete(record.id)  # kills a created container's waiting process
        if container.monitor is not None and not container.exited.wait(KILL_WAIT):
            container.monitor.kill_and_reap()
        self._remove_cgroups(record.cgroup)
        self.layers.release(record.id)
        forget(self.conmon.attach_dir, record.id)
        shutil.rmtree(self.bundle(record.id), ignore_errors=True)
        with container.state_lock:
            container.removed = True  # first: a late exit must not write the record again
        self.store.delete(record.id)

    def _remove_cgroups(self, cgroup: str) -> None:
        self.cgroups.remove(cgroup)
        parent, _, leaf = cgroup.rpartition("/")
        self.cgroups.remove(monitor_cgroup(parent, leaf.removeprefix("pyshim-")))

    # ---- the pod's containers (hooks for the sandbox lifecycle) -----------------------

    def stop_all(self, sandbox_id: str, grace: float) -> None:
        """Every running container of the pod gets `grace`, all at once (as CRI-O)."""
        running = [
            c
            for c in self.registry.entries()
            if c.record.sandbox_id == sandbox_id and c.record.state is ContainerState.RUNNING
        ]
        if not running:
            return
        with ThreadPoolExecutor(max_workers=min(len(running), 16), thread_name_prefix="stop") as pool:
            for future in [pool.submit(self.stop, c.id, grace) for c in running]:
                future.result()

    def remove_all(self, sandbox_id: str) -> None:
        for container in self.registry.entries():
            if container.record.sandbox_id == sandbox_id:
                self.remove(container.id)

    def records_of(self, sandbox_id: str) -> tuple[ContainerRecord, ...]:
        records = [c.record for c in self.registry.entries() if c.record.sandbox_id == sandbox_id]
        return tuple(sorted(records, key=lambda r: r.created_at))

    # ---- events -----------------------------------------------------------------------

    def _announce(self, kind: EventType, container: Container) -> None:
        with self._held_lock:
            if self._held is not None:
                self._held.append((kind, container))
                return
        sandbox_id = container.record.sandbox_id

        def snapshot() -> tuple[SandboxRecord | None, tuple[ContainerRecord, ...]]:
            pod = self.sandboxes.find(sandbox_id)
            return (pod.record if pod is not None else None), self.records_of(sandbox_id)

        self.events.emit(container.id, kind, snapshot)

    def announce_recovered(self) -> None:
        with self._held_lock:
            held, self._held = self._held or [], None
        for kind, container in held:
            self._announce(kind, container)

    # ---- status, list, update, logs -------------------------------------------------

    def get(self, container_id: str) -> ContainerRecord:
        return self.registry.get(container_id).record

    def find(self, container_id: str) -> Container:
        return self.registry.get(container_id)

    def select(self, flt: ListFilter) -> list[ContainerRecord]:
        sandbox_id = flt.sandbox_id
        if sandbox_id and not is_id(sandbox_id):
            try:
                pod = self.sandboxes.find(sandbox_id)
            except ShimError:  # an ambiguous prefix: a list never fails, it finds nothing
                return []
            if pod is None:
                return []
            sandbox_id = pod.id
        records = [c.record for c in self.registry.entries(flt.id_prefix)]
        return sorted(
            (r for r in records if _matches(r, flt, sandbox_id)), key=lambda r: r.created_at, reverse=True
        )

    def update_resources(self, container_id: str, resources: api_pb2.LinuxContainerResources) -> None:
        container = self.registry.get(container_id)
        with container.lock:
            record = container.record
            if record.state in (ContainerState.CREATED, ContainerState.RUNNING):
                self.runtime(record.runtime_handler).update(record.id, oci.resources(resources, self.host))
            # The update is the whole new set (kubelet sends it complete), as containerd takes it.
            payload = resources.SerializeToString(deterministic=True)
            self._update(container, lambda r: replace(r, resources=payload))
        log.info("event=container_updated container=%s", record.id)

    def reopen_log(self, container_id: str) -> None:
        container = self.registry.get(container_id)
        record = container.record
        if record.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"container {record.id} is not running: its log is not open")
        if not reopen_log(self.bundle(record.id), record.log_path):
            raise FailedPrecondition(
                f"container {record.id}: its monitor is gone, the log cannot be reopened"
            )

    def running(self, container_id: str) -> ContainerRecord:
        """The container's record if it runs: what commands, attach and streams need."""
        record = self.registry.get(container_id).record
        if record.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"container {record.id} is {record.state.value}, not running")
        return record

    def tasks(self, record: ContainerRecord) -> Callable[[], list[int]]:
        """Lists the pids in the container's cgroup (what an exec'd command may have started)."""
        return lambda: self.cgroups.procs(record.cgroup)

    def exec_sync(self, container_id: str, cmd: list[str], timeout: float) -> ExecResult:
        record = self.running(container_id)
        return exec_sync(
            self.runtime(record.runtime_handler),
            record.id,
            self.bundle(record.id),
            cmd,
            timeout,
            self.tasks(record),
        )

    def runtime_info(self, record: ContainerRecord) -> tuple[dict[str, object] | None, dict[str, str]]:
        """The container's OCI spec (as written) and its runtime, for verbose status."""
        try:
            spec = json.loads((self.bundle(record.id) / "config.json").read_bytes())
        except (OSError, ValueError):
            spec = None
        runtime = self.runtimes.get(record.runtime_handler)
        described = {"handler": record.runtime_handler}
        if runtime is not None:
            described |= {"binary": str(runtime.binary), "root": str(runtime.root), "kind": runtime.kind}
        return spec, described

    # ---- exits ----------------------------------------------------------------------

    def _update(
        self,
        container: Container,
        change: Callable[[ContainerRecord], ContainerRecord],
        durable: bool = True,
        announce: EventType | None = None,
    ) -> None:
        """Apply a change to the latest record, persist it, then show it (nothing is
        written for a removed container or a change that changes nothing), and
        publish `announce` for it. Published under the state lock, so that the
        events of one container are in the order of its changes; publishing is
        short and never blocks."""
        with container.state_lock:
            if container.removed:
                return
            record = change(container.record)
            if record is container.record:
                return
            self.store.save(record, durable)
            container.record = record
            if announce is not None:
                self._announce(announce, container)
        self.registry.changed()

    def _watch(self, container: Container) -> None:
        if container.monitor is not None:
            self.watcher.watch(container.monitor, lambda _: self._on_monitor_exit(container))
        elif container.process is not None:
            self.watcher.watch(container.process, lambda _: self._on_process_exit(container))
        else:
            container.exited.set()

    def _on_monitor_exit(self, container: Container) -> None:
        """conmon ends once the container has: the exit is in its files. Runs on the
        exit watcher, so it takes only the short state lock."""
        found = read_exit(self.bundle(container.id))
        if found is None:
            process = container.process
            if process is not None and not process.exited.is_set():
                # conmon died, the container lives on: watch the process itself.
                log.warning("event=monitor_gone container=%s detail=watching the process", container.id)
                self.watcher.watch(process, lambda _: self._on_process_exit(container))
                return
            found = Exit(code=255, finished_at=time.time_ns(), oom_killed=False)
            self._exited(container, found, "its monitor (conmon) died and recorded no exit code")
            return
        self._exited(container, found, "")

    def _on_process_exit(self, container: Container) -> None:
        found = read_exit(self.bundle(container.id)) or Exit(255, time.time_ns(), False)
        self._exited(container, found, "" if found.code != 255 else "exit code unknown: conmon was gone")

    def _exited(self, container: Container, found: Exit, message: str) -> None:
        reason = "OOMKilled" if found.oom_killed else "Completed" if found.code == 0 else "Error"
        # Not fsynced, as a start: conmon's exit file holds the same until a reboot.
        self._update(
            container,
            lambda r: exited(r, found.code, found.finished_at, reason, message),
            durable=False,
            announce=EventType.STOPPED,  # once per exit: an EXITED record is not changed again
        )
        container.exited.set()
        log.info("event=container_exited container=%s code=%d reason=%s", container.id, found.code, reason)

    # ---- start-up --------------------------------------------------------------------

    def recover(self) -> None:
        """Reload every record: a container that exited while the daemon was down shows
        its real exit code and time; a Create the daemon died in is swept."""
        records = self.store.load_all()
        with self._held_lock:
            self._held = []  # until the pods are back (SandboxManager.recover announces them)
        for record in records:
            self._adopt(record)
        self._sweep_unrecorded()
        running = sum(1 for c in self.registry.entries() if c.record.state is ContainerState.RUNNING)
        log.info("event=recovered containers=%d running=%d", len(records), running)

    def _adopt(self, record: ContainerRecord) -> None:
        container = Container(record=record)
        live = record.state in (ContainerState.CREATED, ContainerState.RUNNING, ContainerState.UNKNOWN)
        if live:
            container.monitor = TrackedProcess.adopt(record.monitor) if record.monitor else None
            container.process = TrackedProcess.adopt(record.pid) if record.pid else None
        else:
            container.exited.set()
        self.registry.adopt(container)
        if not live:
            return
        if container.monitor is None and container.process is None:
            found = read_exit(self.bundle(record.id))
            if found is None:
                found = Exit(code=255, finished_at=time.time_ns(), oom_killed=False)
                self._exited(container, found, "its processes were gone when pyshim started (a reboot?)")
            else:
                self._exited(container, found, "")
            return
        self._watch(container)

    def _sweep_unrecorded(self) -> None:
        """Bundles and root filesystems without a record are Creates the daemon died in."""
        sweep.unrecorded(
            self.config.run_containers_dir,
            self.conmon.attach_dir,
            self.store.ids(),
            list({r.handler: r for r in self.runtimes.values()}.values()),
            self.layers,
            self._remove_cgroups,
        )


def container_cgroup(pod_cgroup: str, container_id: str) -> str:
    return f"{pod_cgroup}/pyshim-{container_id}"


def monitor_cgroup(pod_cgroup: str, container_id: str) -> str:
    """conmon's own cgroup, under the pod's (CRI-O's conmon_cgroup = "pod")."""
    return f"{pod_cgroup}/pyshim-conmon-{container_id}"


def _image_name(spec: oci.ContainerSpec, image: ImageRecord) -> str:
    """The name status shows (as containerd): what the user asked for, else the image's
    first tag when the request named it by id (kubelet does), else what it sent."""
    if spec.config.image.user_specified_image:
        return spec.config.image.user_specified_image
    named_by_id = image.id.removeprefix("sha256:").startswith(spec.image.removeprefix("sha256:"))
    return image.repo_tags[0] if named_by_id and image.repo_tags else spec.image


def _node_hostname(pod: SandboxRecord) -> str:
    if pod.modes.network == NamespaceMode.NODE:
        return os.uname().nodename
    return ""


def _matches(record: ContainerRecord, flt: ListFilter, sandbox_id: str) -> bool:
    if flt.state is not None and record.state is not flt.state:
        return False
    if sandbox_id and record.sandbox_id != sandbox_id:
        return False
    return all(record.labels.get(k) == v for k, v in flt.labels)
