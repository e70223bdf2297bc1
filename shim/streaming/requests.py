"""What an Exec, Attach or PortForward call asked for (kept under a token until
the client connects), and how a connecting client's request finds its container
or pod: looked up again at connect time, since a minute may have passed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from shim._proto import api_pb2
from shim.containers.conmon import CONTROL_FIFO
from shim.containers.lifecycle import ContainerManager
from shim.errors import FailedPrecondition
from shim.sandbox import SandboxManager
from shim.sandbox_record import SandboxRecord, SandboxState
from shim.streaming.session import AttachTarget, ExecTarget


@dataclass(frozen=True, slots=True)
class ExecRequest:
    container_id: str
    cmd: tuple[str, ...]
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


@dataclass(frozen=True, slots=True)
class AttachRequest:
    container_id: str
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


@dataclass(frozen=True, slots=True)
class PortForwardRequest:
    sandbox_id: str
    ports: tuple[int, ...]  # empty: any port


class Targets:
    """Resolves stored requests against the live state."""

    def __init__(self, sandboxes: SandboxManager, containers: ContainerManager) -> None:
        self.sandboxes = sandboxes
        self.containers = containers

    def exec_target(self, request: ExecRequest) -> ExecTarget:
        record = self.containers.running(request.container_id)
        return ExecTarget(
            runtime=self.containers.runtime(record.runtime_handler),
            container_id=record.id,
            bundle=self.containers.bundle(record.id),
            cmd=request.cmd,
            tty=request.tty,
            tasks=self.containers.tasks(record),
        )

    def attach_target(self, request: AttachRequest) -> AttachTarget:
        record = self.containers.running(request.container_id)
        bundle = self.containers.bundle(record.id)
        config = api_pb2.ContainerConfig()
        try:
            config.ParseFromString(record.config)
        except DecodeError:
            config = api_pb2.ContainerConfig()
        return AttachTarget(
            container_id=record.id,
            socket_path=bundle / "attach",
            control_path=bundle / CONTROL_FIFO,
            tty=config.tty,
            stdin=config.stdin,
        )

    def netns(self, request: PortForwardRequest) -> Path | None:
        """The pod's network namespace; None for a pod on the node's network."""
        net = ready_pod(self.sandboxes, request.sandbox_id).namespaces.get("net")
        return Path(net) if net else None


def ready_pod(sandboxes: SandboxManager, sandbox_id: str) -> SandboxRecord:
    """The pod's record if it is ready: ports are forwarded only into a live pod."""
    record = sandboxes.get(sandbox_id)
    if record.state is not SandboxState.READY:
        raise FailedPrecondition(f"pod sandbox {record.id} is not ready: nothing to forward to")
    return record
