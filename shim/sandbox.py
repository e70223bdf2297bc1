"""The pod sandbox lifecycle: RunPodSandbox, Stop, Remove, Status, List.

A sandbox is a pyshim-pause process holding fresh namespaces, the pins that
keep those namespaces at stable paths, and a record on disk. Containers (a
later layer) join exactly the pinned paths.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from shim import namespaces
from shim.config import Config
from shim.errors import AlreadyExists, InjectedFailure, Internal, NotFound, ShimError
from shim.network import NetworkBackend, netlink, node_address
from shim.network.files import write_pod_files
from shim.pause import PauseOrders, SpawnedPause, pauses_of, spawn
from shim.procs import ExitWatcher, TrackedProcess
from shim.store import ID_RE, SandboxRecord, SandboxState, SandboxStore
from shim.validate import SandboxSpec

log = logging.getLogger(__name__)

# How long a concurrent duplicate RunPodSandbox waits for the first one.
_DUPLICATE_WAIT = 240.0


@dataclass(eq=False)
class Sandbox:
    """A record plus what only lives in memory: its lock and its pause's pidfd."""

    record: SandboxRecord
    lock: threading.Lock = field(default_factory=threading.Lock)
    pause: TrackedProcess | None = None
    removed: bool = False


@dataclass(frozen=True, slots=True)
class ListFilter:
    id_prefix: str = ""
    state: SandboxState | None = None
    labels: tuple[tuple[str, str], ...] = ()


class SandboxManager:
    def __init__(
        self, config: Config, pause_path: Path, watcher: ExitWatcher, network: NetworkBackend
    ) -> None:
        self.config = config
        self.pause_path = pause_path
        self.network = network
        self.store = SandboxStore(config.sandboxes_dir)
        self.watcher = watcher
        self._lock = threading.Lock()  # guards the three maps below
        self._sandboxes: dict[str, Sandbox] = {}
        self._names: dict[str, str] = {}  # reservation name -> id
        self._pending: dict[str, threading.Event] = {}  # names whose Run is in flight
        # Bumped after every change a list could show; lets callers cache a full list.
        self.generation = 0
        config.run_sandboxes_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        config.netns_dir.mkdir(parents=True, exist_ok=True, mode=0o755)

    # ---- RunPodSandbox -------------------------------------------------------------

    def run(self, spec: SandboxSpec, wait: float | None = None) -> str:
        """Create a READY sandbox, or return the READY one that already has this name.

        A duplicate of a NOTREADY sandbox is ALREADY_EXISTS; a duplicate that
        arrives while the first is still being made waits for it (at most `wait`
        seconds, the caller's deadline).
        """
        name = spec.metadata.reservation
        event = self._reserve(name, min(wait, _DUPLICATE_WAIT) if wait is not None else _DUPLICATE_WAIT)
        if isinstance(event, str):
            return event
        try:
            sandbox = self._create(spec)
        finally:
            with self._lock:
                del self._pending[name]
            event.set()
        return sandbox.record.id

    def _reserve(self, name: str, wait: float) -> threading.Event | str:
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                existing_id = self._names.get(name)
                existing = self._sandboxes[existing_id].record if existing_id else None
                pending = self._pending.get(name)
                if existing is None and pending is None:
                    event = threading.Event()
                    self._pending[name] = event
                    return event
            if existing is not None:
                if existing.state is SandboxState.READY:
                    log.info("event=run_duplicate sandbox=%s name=%s", existing.id, name)
                    return existing.id
                raise AlreadyExists(
                    f"pod sandbox name {name!r} is taken by NOTREADY sandbox {existing.id}; "
                    "remove it first (crictl rmp) or use another attempt number"
                )
            assert pending is not None
            if not pending.wait(max(deadline - time.monotonic(), 0)):
                raise AlreadyExists(f"pod sandbox name {name!r} is still being created by another request")

    def _create(self, spec: SandboxSpec) -> Sandbox:
        sandbox_id = secrets.token_hex(32)
        # The run dir is the intent marker: if the daemon dies before the record is
        # written, or an undo step fails, the start-up sweep finds it and finishes the job.
        run_dir = self.config.run_sandboxes_dir / sandbox_id
        rollback = _Rollback(sandbox_id)
        try:
            run_dir.mkdir(mode=0o700)
            (run_dir / "ns").mkdir()
            self._inject("mkdir")

            spawned = spawn(self.pause_path, self._orders(sandbox_id, spec), self.config.pause_start_timeout)
            if spawned.netlink is not None:
                rollback.add(spawned.netlink.close)
            pause = self._track(sandbox_id, spawned)
            # Not watched before the record is committed: until then the pause stays our
            # unreaped child, so its pid cannot be reused under the pins below.
            rollback.add(pause.kill_and_reap)
            for warning in spawned.warnings:
                log.info("event=pause_warning sandbox=%s detail=%r", sandbox_id, warning)
            self._inject("spawn")

            paths = self._pin_all(sandbox_id, spawned, spec, rollback)
            self._inject("pin")
            pod_network = None
            if spawned.netlink is not None:
                netlink.link_up(spawned.netlink)
                # Registered first: a setup that fails midway may have taken an address.
                net = paths["net"]
                rollback.add(self.network.teardown, sandbox_id, None, net, spec.metadata)
                pod_network = self.network.setup(
                    sandbox_id, net, spawned.netlink, spec.port_mappings, spec.metadata
                )
                rollback.add(self.network.teardown, sandbox_id, pod_network, net, spec.metadata)
                spawned.netlink.close()
            self._inject("network")
            hostname = spec.hostname or (socket.gethostname() if pod_network is None else "")
            files = write_pod_files(
                run_dir, hostname, pod_network.ip if pod_network else node_address(), spec.dns
            )

            record = SandboxRecord(
                id=sandbox_id,
                metadata=spec.metadata,
                state=SandboxState.READY,
                created_at=time.time_ns(),
                modes=spec.modes,
                runtime_handler=spec.runtime_handler,
                hostname=spec.hostname,
                log_directory=spec.log_directory,
                labels=spec.labels,
                annotations=spec.annotations,
                pause=spawned.identity,
                namespaces=namespaces.NamespacePaths.of(paths),
                network=pod_network,
                files=files,
                config=spec.config,
            )
            self._inject("save")
            rollback.add(self.store.delete, sandbox_id)
            self.store.save(record)
        except BaseException:
            if rollback.run():
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                log.error(
                    "event=rollback_incomplete sandbox=%s detail=left for the start-up sweep", sandbox_id
                )
            raise
        sandbox = Sandbox(record=record, pause=pause)
        with self._lock:
            self._sandboxes[sandbox_id] = sandbox
            self._names[spec.metadata.reservation] = sandbox_id
            self.generation += 1
        # An exit that already happened shows as a readable pidfd: seen at once.
        self.watcher.watch(pause, lambda _: self._on_pause_exit(sandbox_id))
        log.info(
            "event=sandbox_ready sandbox=%s name=%s pid=%d namespaces=%s",
            sandbox_id,
            spec.metadata.reservation,
            spawned.identity.pid,
            ",".join(sorted(paths)),
        )
        return sandbox

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

    def _pin_all(
        self, sandbox_id: str, spawned: SpawnedPause, spec: SandboxSpec, rollback: _Rollback
    ) -> dict[str, str]:
        paths: dict[str, str] = {}
        for kind in sorted(spec.namespaces):
            target = self._pin_path(sandbox_id, kind)
            namespaces.pin(spawned.identity.pid, kind, target)
            rollback.add(namespaces.unpin, target)
            paths[kind] = str(target)
        return paths

    def _pin_path(self, sandbox_id: str, kind: str) -> Path:
        if kind == "net":
            return self.config.netns_dir / f"pyshim-{sandbox_id}"
        return self.config.run_sandboxes_dir / sandbox_id / "ns" / kind

    def _inject(self, step: str) -> None:
        """Failure injection for tests: STEP raises, crash:STEP kills the daemon outright."""
        if self.config.fail_at == step:
            raise InjectedFailure(f"failure injected at step {step!r} (--fail-at)")
        if self.config.fail_at == f"crash:{step}":
            log.error("event=injected_crash step=%s", step)
            os._exit(70)

    # ---- StopPodSandbox / RemovePodSandbox ----------------------------------------

    def stop(self, sandbox_id: str) -> None:
        """Kill the pause and release its namespaces. Unknown ids and repeats succeed."""
        sandbox = self._find(sandbox_id, missing_ok=True)
        if sandbox is None:
            return
        with sandbox.lock:
            if not sandbox.removed:
                self._stop_locked(sandbox)

    def _stop_locked(self, sandbox: Sandbox) -> None:
        record = sandbox.record
        if (
            record.state is SandboxState.NOTREADY
            and record.pause is None
            and record.network is None
            and not record.namespaces.paths
        ):
            return  # stopped before: nothing is left to release
        pause = sandbox.pause
        if pause is not None and not pause.terminate(self.config.pause_stop_timeout):
            raise Internal(
                f"pause of sandbox {record.id} (pid {pause.identity.pid}) did not exit after SIGKILL"
            )
        sandbox.pause = None
        stopped = replace(record, state=SandboxState.NOTREADY, pause=None)
        try:
            if record.network is not None:
                # While the namespace is still pinned: CNI plugins clean up inside it. The
                # built-in network gives the address back here too; the veth is gone once
                # the pin is (the pause is dead), and addresses are handed out round-robin.
                net = record.namespaces.get("net") or ""
                self.network.teardown(record.id, record.network, net, record.metadata)
                stopped = replace(stopped, network=None)
            for path in record.namespaces.as_dict().values():
                namespaces.unpin(Path(path))
        except ShimError:
            # The pause is gone whatever happens next: say so, keep the pins for a retry.
            self._publish(sandbox, stopped)
            raise
        self._publish(sandbox, replace(stopped, namespaces=namespaces.NamespacePaths()))
        log.info("event=sandbox_stopped sandbox=%s", record.id)

    def remove(self, sandbox_id: str) -> None:
        """Stop if needed, then delete every trace. Unknown ids and repeats succeed."""
        sandbox = self._find(sandbox_id, missing_ok=True)
        if sandbox is None:
            return
        with sandbox.lock:
            if sandbox.removed:
                return
            self._stop_locked(sandbox)
            shutil.rmtree(self.config.run_sandboxes_dir / sandbox.record.id, ignore_errors=True)
            self.store.delete(sandbox.record.id)
            sandbox.removed = True
        with self._lock:
            self._sandboxes.pop(sandbox.record.id, None)
            self.generation += 1
            if self._names.get(sandbox.record.metadata.reservation) == sandbox.record.id:
                del self._names[sandbox.record.metadata.reservation]
        log.info("event=sandbox_removed sandbox=%s", sandbox.record.id)

    def _publish(self, sandbox: Sandbox, record: SandboxRecord) -> None:
        """Persist a changed record, then show it (caller holds sandbox.lock)."""
        self.store.save(record)
        sandbox.record = record
        with self._lock:
            self.generation += 1

    def _on_pause_exit(self, sandbox_id: str) -> None:
        """A pause died outside of Stop: the sandbox is NOTREADY; pins stay for Stop."""
        with self._lock:
            sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None:
            return
        with sandbox.lock:
            if sandbox.removed or sandbox.record.state is not SandboxState.READY or sandbox.pause is None:
                return
            sandbox.pause = None
            self._publish(sandbox, replace(sandbox.record, state=SandboxState.NOTREADY, pause=None))
        log.warning("event=pause_exited sandbox=%s state=NOTREADY", sandbox_id)

    # ---- PodSandboxStatus / ListPodSandbox ----------------------------------------

    def get(self, sandbox_id: str) -> SandboxRecord:
        sandbox = self._find(sandbox_id, missing_ok=False)
        assert sandbox is not None
        return sandbox.record

    def list(self, flt: ListFilter) -> list[SandboxRecord]:
        with self._lock:
            if flt.id_prefix:
                exact = self._sandboxes.get(flt.id_prefix)
                candidates = (
                    [exact]
                    if exact
                    else [s for i, s in self._sandboxes.items() if i.startswith(flt.id_prefix)]
                )
            else:
                candidates = list(self._sandboxes.values())
        records = [s.record for s in candidates]
        return sorted((r for r in records if _matches(r, flt)), key=lambda r: r.created_at, reverse=True)

    def _find(self, sandbox_id: str, missing_ok: bool) -> Sandbox | None:
        """A sandbox by full id or unique prefix."""
        with self._lock:
            found = self._sandboxes.get(sandbox_id)
            if found is None and sandbox_id:
                matches = [s for i, s in self._sandboxes.items() if i.startswith(sandbox_id)]
                if len(matches) > 1:
                    raise NotFound(
                        f"pod sandbox id prefix {sandbox_id!r} is ambiguous ({len(matches)} matches)"
                    )
                found = matches[0] if matches else None
        if found is None and not missing_ok:
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        return found

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
        ready = sum(1 for r in records if self._sandboxes[r.id].record.state is SandboxState.READY)
        log.info("event=recovered sandboxes=%d ready=%d", len(records), ready)

    def _check_networks(self) -> None:
        """After a restart, ask the network (CNI CHECK) whether READY pods still have theirs."""
        for sandbox in list(self._sandboxes.values()):
            record = sandbox.record
            net = record.namespaces.get("net")
            if record.state is not SandboxState.READY or record.network is None or net is None:
                continue
            try:
                self.network.check(record.id, record.network, net, record.metadata)
            except ShimError as exc:
                log.warning("event=network_check_failed sandbox=%s reason=%r", record.id, str(exc))

    def _adopt(self, record: SandboxRecord) -> None:
        pause = TrackedProcess.adopt(record.pause) if record.pause else None
        if pause is None and record.state is SandboxState.READY:
            record = replace(record, state=SandboxState.NOTREADY, pause=None)
            self.store.save(record)
            log.warning("event=pause_gone sandbox=%s state=NOTREADY", record.id)
        sandbox = Sandbox(record=record, pause=pause)
        self._sandboxes[record.id] = sandbox
        self._names.setdefault(record.metadata.reservation, record.id)
        if pause is not None:
            self.watcher.watch(pause, lambda _: self._on_pause_exit(record.id))

    def _sweep_unrecorded(self) -> None:
        """Run dirs and net pins without a record file are Runs the daemon died in
        (or whose undo failed): undo them. A record that exists but could not be
        loaded protects its sandbox: it is never swept."""
        recorded = {p.stem for p in self.config.sandboxes_dir.glob("*.json")}
        found = {p.name for p in self.config.run_sandboxes_dir.iterdir()}
        found |= {p.name.removeprefix("pyshim-") for p in self.config.netns_dir.glob("pyshim-*")}
        for sandbox_id in sorted(found - recorded):
            if not ID_RE.match(sandbox_id):
                continue
            run_dir = self.config.run_sandboxes_dir / sandbox_id
            for pid in pauses_of(sandbox_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            with contextlib.suppress(ShimError):
                self.network.teardown(sandbox_id, None, str(self._pin_path(sandbox_id, "net")), None)
            for kind in namespaces.KINDS:
                with contextlib.suppress(ShimError):
                    namespaces.unpin(self._pin_path(sandbox_id, kind))
            shutil.rmtree(run_dir, ignore_errors=True)
            log.warning("event=swept_half_made sandbox=%s", sandbox_id)

    def close(self) -> None:
        """Drop pidfds; pauses keep running (a daemon restart must not stop pods)."""


class _Rollback:
    """Undo steps of a half-made sandbox, run newest first. Every step runs even if
    one fails; a failure is logged and makes run() return False."""

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self._steps: list[tuple[Callable[..., object], tuple[object, ...]]] = []

    def add(self, step: Callable[..., object], *args: object) -> None:
        self._steps.append((step, args))

    def run(self) -> bool:
        clean = True
        for step, args in reversed(self._steps):
            try:
                step(*args)
            except Exception:
                log.exception("event=undo_failed sandbox=%s step=%s", self.sandbox_id, step.__qualname__)
                clean = False
        return clean


def _matches(record: SandboxRecord, flt: ListFilter) -> bool:
    if flt.state is not None and record.state is not flt.state:
        return False
    return all(record.labels.get(k) == v for k, v in flt.labels)
