"""The gRPC server: socket, servicers, error mapping, shutdown.

Servicer methods are thin: they check the request's shape, call the domain
(shim.sandbox), and translate the answer (shim.cri). One wrapper logs each call
once and maps ShimError to its status code, anything else to INTERNAL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from shim import __version__, cri, lockfile, memory, metrics, validate
from shim._proto import api_pb2
from shim.cgroups import Cgroups
from shim.config import Config
from shim.containers import runtime as runtimes
from shim.containers import spec as oci
from shim.containers import validate as container_validate
from shim.containers.conmon import Conmon
from shim.containers.lifecycle import KILL_WAIT, ContainerManager
from shim.containers.lifecycle import ListFilter as ContainerFilter
from shim.containers.record import ContainerRecord, ContainerState
from shim.containers.stats import Stats
from shim.errors import FailedPrecondition, InvalidArgument
from shim.events import EventBus
from shim.images import Images
from shim.images import hosts as registry_hosts
from shim.images.layers import LayerStore
from shim.images.store import ImageStore
from shim.network.select import NetworkSelector
from shim.pause import find_pause
from shim.procs import ExitWatcher, OrphanReaper, become_subreaper, chrooted
from shim.rpc import fill_unimplemented, generic_handler, rpc, rpc_stream
from shim.sandbox import ListFilter, SandboxManager
from shim.sandbox_record import SandboxRecord, SandboxState
from shim.streaming import requests as streaming
from shim.streaming.server import StreamServer, TLSFiles

log = logging.getLogger(__name__)

RUNTIME_NAME = "pyshim"
RUNTIME_API_VERSION = "v1"
# No valid request is larger than a CreateContainer: a sandbox config (at most 2 MiB)
# plus a container config (at most 2 MiB). Anything larger is refused by the transport
# before it is decoded (RESOURCE_EXHAUSTED), so a burst of huge requests cannot take
# memory. Replies may be larger (lists): kubelet's client accepts 16 MiB.
MAX_REQUEST = 4 * 1024 * 1024 + 64 * 1024
MAX_REPLY = 16 * 1024 * 1024
MAX_FORWARDED_PORTS = 64
_UNIX_PATH_MAX = 107


class RuntimeService:
    def __init__(
        self,
        config: Config,
        sandboxes: SandboxManager,
        containers: ContainerManager,
        stats: Stats,
        streams: StreamServer,
        network: NetworkSelector,
    ) -> None:
        self.config = config
        self.network = network
        self.sandboxes = sandboxes
        self.containers = containers
        self.stats = stats
        self.streams = streams
        # The unfiltered lists, encoded, and the generation each was made at: kubelet
        # relists every second and most seconds nothing changed.
        self._full_list: tuple[int, bytes] = (-1, b"")
        self._all_containers: tuple[int, bytes] = (-1, b"")

    @rpc
    def Version(
        self, request: api_pb2.VersionRequest, context: grpc.ServicerContext
    ) -> api_pb2.VersionResponse:
        return api_pb2.VersionResponse(
            version="0.1.0",  # the CRI "kubelet runtime API" version, as containerd answers
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=RUNTIME_API_VERSION,
        )

    @rpc
    def Status(self, request: api_pb2.StatusRequest, context: grpc.ServicerContext) -> api_pb2.StatusResponse:
        ready, reason, message = self.sandboxes.network.status()
        conditions = [
            api_pb2.RuntimeCondition(type="RuntimeReady", status=True),
            api_pb2.RuntimeCondition(type="NetworkReady", status=ready, reason=reason, message=message),
        ]
        response = api_pb2.StatusResponse(
            status=api_pb2.RuntimeStatus(conditions=conditions), runtime_handlers=self._handlers()
        )
        if request.verbose:
            response.info["info"] = json.dumps(self._status_info(), sort_keys=True)
        return response

    def _status_info(self) -> dict[str, Any]:
        c, host = self.config, self.containers.host
        return {
            "version": __version__,
            "socket": str(c.socket),
            "root": str(c.root),
            "runRoot": str(c.run_root),
            "netnsDir": str(c.netns_dir),
            "network": self.sandboxes.network.describe(),
            "pause": str(self.sandboxes.pause_path),
            "runtimeHandlers": {
                name: {
                    "runtime": str(r.binary),
                    "version": runtimes.program_version(r.binary),
                    "root": str(r.root),
                    "createProgram": str(r.create_program),
                }
                for name, r in self.containers.runtimes.items()
                if name
            },
            "conmon": {
                "program": str(self.containers.conmon.binary),
                "version": runtimes.program_version(self.containers.conmon.binary),
            },
            "streamingServer": self.streams.base_url,
            "config": _config_view(c),
            "defaultRuntimeHandler": self.containers.runtimes[""].handler,
            "cgroupDriver": "cgroupfs",
            "cgroups": self.containers.cgroups.mode,
            "cgroupRoot": c.cgroup_root,
            "apparmor": "enabled"
            if host.apparmor
            else "not enabled on this kernel: AppArmor profiles are ignored",
            "seccompDefault": str(host.seccomp_default) if host.seccomp_default else None,
            "selinux": "not enabled: SELinux options are ignored",
            "sandboxes": len(self.sandboxes.list(ListFilter())),
            "containers": len(self.containers.select(ContainerFilter())),
        }

    def _handlers(self) -> list[api_pb2.RuntimeHandler]:
        features = api_pb2.RuntimeHandlerFeatures(recursive_read_only_mounts=self.containers.host.rro)
        return [api_pb2.RuntimeHandler(name=name, features=features) for name in self.containers.runtimes]

    @rpc
    def RuntimeConfig(
        self, request: api_pb2.RuntimeConfigRequest, context: grpc.ServicerContext
    ) -> api_pb2.RuntimeConfigResponse:
        # Explicit: in the enum 0 means SYSTEMD, and these nodes run no systemd.
        return api_pb2.RuntimeConfigResponse(
            linux=api_pb2.LinuxRuntimeConfiguration(cgroup_driver=api_pb2.CGROUPFS)
        )

    @rpc
    def UpdateRuntimeConfig(
        self, request: api_pb2.UpdateRuntimeConfigRequest, context: grpc.ServicerContext
    ) -> api_pb2.UpdateRuntimeConfigResponse:
        pod_cidr = request.runtime_config.network_config.pod_cidr
        if len(pod_cidr) > 200:
            raise InvalidArgument(f"pod CIDR of {len(pod_cidr)} characters: at most two ranges are expected")
        if pod_cidr:
            self.network.update_pod_cidr(pod_cidr)
        return api_pb2.UpdateRuntimeConfigResponse()

    @rpc
    def RunPodSandbox(
        self, request: api_pb2.RunPodSandboxRequest, context: grpc.ServicerContext
    ) -> api_pb2.RunPodSandboxResponse:
        spec = validate.sandbox_spec(request, self.config.handler_names)
        return api_pb2.RunPodSandboxResponse(
            pod_sandbox_id=self.sandboxes.run(spec, context.time_remaining())
        )

    @rpc
    def StopPodSandbox(
        self, request: api_pb2.StopPodSandboxRequest, context: grpc.ServicerContext
    ) -> api_pb2.StopPodSandboxResponse:
        self.sandboxes.stop(_required_id(request.pod_sandbox_id), context.time_remaining())
        return api_pb2.StopPodSandboxResponse()

    @rpc
    def RemovePodSandbox(
        self, request: api_pb2.RemovePodSandboxRequest, context: grpc.ServicerContext
    ) -> api_pb2.RemovePodSandboxResponse:
        self.sandboxes.remove(_required_id(request.pod_sandbox_id), context.time_remaining())
        return api_pb2.RemovePodSandboxResponse()

    @rpc
    def PodSandboxStatus(
        self, request: api_pb2.PodSandboxStatusRequest, context: grpc.ServicerContext
    ) -> api_pb2.PodSandboxStatusResponse:
        record = self.sandboxes.get(validate.id_prefix(request.pod_sandbox_id))
        response = api_pb2.PodSandboxStatusResponse(status=cri.pod_sandbox_status(record))
        if request.verbose:
            response.info.update(cri.verbose_info(record))
        return response

    @rpc
    def ListPodSandbox(self, request: api_pb2.ListPodSandboxRequest, context: grpc.ServicerContext) -> bytes:
        if not request.HasField("filter") or request.filter.ByteSize() == 0:
            return self._list_all()
        flt = request.filter
        id_prefix = flt.id
        if id_prefix and not _looks_like_id(id_prefix):
            return b""  # no sandbox can have that id: an empty response
        state = None
        if flt.HasField("state"):
            state = cri.state_from_cri(flt.state.state)
            if state is None:
                return b""  # no sandbox is in a state the API does not define
        records = self.sandboxes.list(
            ListFilter(
                id_prefix=id_prefix,
                state=state,
                labels=tuple(flt.label_selector.items()),
            )
        )
        return cri.list_pod_sandbox_response(records)

    def _list_all(self) -> bytes:
        generation = self.sandboxes.generation  # read first: a change during the list bumps it
        cached_generation, encoded = self._full_list
        if cached_generation != generation:
            encoded = cri.list_pod_sandbox_response(self.sandboxes.list(ListFilter()))
            self._full_list = (generation, encoded)
        return encoded

    # ---- containers ---------------------------------------------------------------

    @rpc
    def CreateContainer(
        self, request: api_pb2.CreateContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.CreateContainerResponse:
        spec = container_validate.container_spec(request)
        return api_pb2.CreateContainerResponse(container_id=self.containers.create(spec))

    @rpc
    def StartContainer(
        self, request: api_pb2.StartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.StartContainerResponse:
        self.containers.start(validate.id_prefix(request.container_id, "container id"))
        return api_pb2.StartContainerResponse()

    @rpc
    def StopContainer(
        self, request: api_pb2.StopContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.StopContainerResponse:
        timeout = max(0.0, float(request.timeout))
        remaining = context.time_remaining()
        if remaining is not None:
            # Leave time for the SIGKILL that follows a grace period the deadline cuts short.
            timeout = min(timeout, max(remaining - KILL_WAIT, 0.0))
        self.containers.stop(_required_id(request.container_id, "container_id"), timeout)
        return api_pb2.StopContainerResponse()

    @rpc
    def RemoveContainer(
        self, request: api_pb2.RemoveContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.RemoveContainerResponse:
        self.containers.remove(_required_id(request.container_id, "container_id"))
        return api_pb2.RemoveContainerResponse()

    @rpc
    def ListContainers(self, request: api_pb2.ListContainersRequest, context: grpc.ServicerContext) -> bytes:
        if not request.HasField("filter") or request.filter.ByteSize() == 0:
            generation = self.containers.generation  # read first: a change during the list bumps it
            cached_generation, encoded = self._all_containers
            if cached_generation != generation:
                encoded = cri.list_containers_response(self.containers.select(ContainerFilter()))
                self._all_containers = (generation, encoded)
            return encoded
        flt = request.filter
        if (flt.id and not _looks_like_id(flt.id)) or (
            flt.pod_sandbox_id and not _looks_like_id(flt.pod_sandbox_id)
        ):
            return b""  # nothing can have such an id
        state = None
        if flt.HasField("state"):
            state = cri.container_state_from_cri(flt.state.state)
            if state is None:
                return b""
        records = self.containers.select(
            ContainerFilter(
                id_prefix=flt.id,
                state=state,
                sandbox_id=flt.pod_sandbox_id,
                labels=tuple(flt.label_selector.items()),
            )
        )
        return cri.list_containers_response(records)

    @rpc
    def ContainerStatus(
        self, request: api_pb2.ContainerStatusRequest, context: grpc.ServicerContext
    ) -> api_pb2.ContainerStatusResponse:
        container = self.containers.find(validate.id_prefix(request.container_id, "container id"))
        record = container.record
        response = api_pb2.ContainerStatusResponse(status=cri.container_status(record))
        if request.verbose:
            response.info.update(cri.container_info(record, *self.containers.runtime_info(record)))
        return response

    @rpc
    def UpdateContainerResources(
        self, request: api_pb2.UpdateContainerResourcesRequest, context: grpc.ServicerContext
    ) -> api_pb2.UpdateContainerResourcesResponse:
        container_id = validate.id_prefix(request.container_id, "container id")
        validate.resources(request.linux, "linux")
        self.containers.update_resources(container_id, request.linux)
        return api_pb2.UpdateContainerResourcesResponse()

    @rpc
    def ReopenContainerLog(
        self, request: api_pb2.ReopenContainerLogRequest, context: grpc.ServicerContext
    ) -> api_pb2.ReopenContainerLogResponse:
        self.containers.reopen_log(validate.id_prefix(request.container_id, "container id"))
        return api_pb2.ReopenContainerLogResponse()

    @rpc
    def ExecSync(
        self, request: api_pb2.ExecSyncRequest, context: grpc.ServicerContext
    ) -> api_pb2.ExecSyncResponse:
        container_id = validate.id_prefix(request.container_id, "container id")
        cmd = container_validate.command(request.cmd, "cmd")
        if request.timeout < 0:
            raise InvalidArgument(f"timeout {request.timeout} must not be negative")
        result = self.containers.exec_sync(container_id, cmd, float(request.timeout))
        return api_pb2.ExecSyncResponse(
            stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code
        )

    @rpc
    def Exec(self, request: api_pb2.ExecRequest, context: grpc.ServicerContext) -> api_pb2.ExecResponse:
        record = self._running(request.container_id)
        _check_stdio(request.tty, request.stdin, request.stdout, request.stderr)
        cmd = tuple(container_validate.command(request.cmd, "cmd"))
        stored = streaming.ExecRequest(
            record.id, cmd, request.tty, request.stdin, request.stdout, request.stderr
        )
        return api_pb2.ExecResponse(url=self.streams.url(stored))

    @rpc
    def Attach(self, request: api_pb2.AttachRequest, context: grpc.ServicerContext) -> api_pb2.AttachResponse:
        record = self._running(request.container_id)
        _check_stdio(request.tty, request.stdin, request.stdout, request.stderr)
        stored = streaming.AttachRequest(
            record.id, request.tty, request.stdin, request.stdout, request.stderr
        )
        return api_pb2.AttachResponse(url=self.streams.url(stored))

    @rpc
    def PortForward(
        self, request: api_pb2.PortForwardRequest, context: grpc.ServicerContext
    ) -> api_pb2.PortForwardResponse:
        record = streaming.ready_pod(self.sandboxes, _required_id(request.pod_sandbox_id))
        if len(request.port) > MAX_FORWARDED_PORTS:
            raise InvalidArgument(f"{len(request.port)} ports; at most {MAX_FORWARDED_PORTS} per request")
        for port in request.port:
            if not 0 < port < 65536:
                raise InvalidArgument(f"port {port} is out of range (1-65535)")
        stored = streaming.PortForwardRequest(record.id, tuple(request.port))
        return api_pb2.PortForwardResponse(url=self.streams.url(stored))

    def _running(self, container_id: str) -> ContainerRecord:
        return self.containers.running(validate.id_prefix(container_id, "container id"))

    @rpc
    def ContainerStats(
        self, request: api_pb2.ContainerStatsRequest, context: grpc.ServicerContext
    ) -> api_pb2.ContainerStatsResponse:
        record = self.containers.get(validate.id_prefix(request.container_id, "container id"))
        return api_pb2.ContainerStatsResponse(stats=self.stats.container(record))

    @rpc
    def ListContainerStats(
        self, request: api_pb2.ListContainerStatsRequest, context: grpc.ServicerContext
    ) -> api_pb2.ListContainerStatsResponse:
        flt = request.filter
        if (flt.id and not _looks_like_id(flt.id)) or (
            flt.pod_sandbox_id and not _looks_like_id(flt.pod_sandbox_id)
        ):
            return api_pb2.ListContainerStatsResponse()
        records = self.containers.select(
            ContainerFilter(
                id_prefix=flt.id,
                state=ContainerState.RUNNING,
                sandbox_id=flt.pod_sandbox_id,
                labels=tuple(flt.label_selector.items()),
            )
        )
        return api_pb2.ListContainerStatsResponse(stats=[self.stats.container(r) for r in records])

    @rpc
    def PodSandboxStats(
        self, request: api_pb2.PodSandboxStatsRequest, context: grpc.ServicerContext
    ) -> api_pb2.PodSandboxStatsResponse:
        record = self.sandboxes.get(validate.id_prefix(request.pod_sandbox_id))
        return api_pb2.PodSandboxStatsResponse(stats=self._pod_stats(record))

    @rpc
    def ListPodSandboxStats(
        self, request: api_pb2.ListPodSandboxStatsRequest, context: grpc.ServicerContext
    ) -> api_pb2.ListPodSandboxStatsResponse:
        flt = request.filter
        if flt.id and not _looks_like_id(flt.id):
            return api_pb2.ListPodSandboxStatsResponse()
        records = self.sandboxes.list(
            ListFilter(id_prefix=flt.id, state=SandboxState.READY, labels=tuple(flt.label_selector.items()))
        )
        return api_pb2.ListPodSandboxStatsResponse(stats=[self._pod_stats(r) for r in records])

    def _pod_stats(self, record: SandboxRecord) -> api_pb2.PodSandboxStats:
        running = self.containers.select(ContainerFilter(sandbox_id=record.id, state=ContainerState.RUNNING))
        return self.stats.sandbox(record, running)

    @rpc_stream
    def GetContainerEvents(
        self, request: api_pb2.GetEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        events = self.sandboxes.events
        # Dropped for falling behind: reset the stream, since a client that stopped
        # reading would never get a status queued behind its unread events.
        subscription = events.subscribe(on_drop=context.cancel)
        if not context.add_callback(lambda: events.unsubscribe(subscription)):
            events.unsubscribe(subscription)  # the client is gone already
        # Headers at once: a client knows it is subscribed before its first event.
        context.send_initial_metadata(())
        return events.stream(subscription, context.is_active)


class ImageService:
    def __init__(self, config: Config, images: Images) -> None:
        self.config = config
        self.images = images

    @rpc
    def PullImage(
        self, request: api_pb2.PullImageRequest, context: grpc.ServicerContext
    ) -> api_pb2.PullImageResponse:
        record = self.images.pull(request.image.image, cri.credentials(request.auth))
        return api_pb2.PullImageResponse(image_ref=record.id)

    @rpc
    def ListImages(
        self, request: api_pb2.ListImagesRequest, context: grpc.ServicerContext
    ) -> api_pb2.ListImagesResponse:
        records = self.images.matching(request.filter.image.image)
        return api_pb2.ListImagesResponse(images=[cri.image(r) for r in records])

    @rpc
    def ImageStatus(
        self, request: api_pb2.ImageStatusRequest, context: grpc.ServicerContext
    ) -> api_pb2.ImageStatusResponse:
        # An image that is not there is an empty answer, not an error: kubelet pulls then.
        record = self.images.find(request.image.image)
        if record is None:
            return api_pb2.ImageStatusResponse()
        response = api_pb2.ImageStatusResponse(image=cri.image(record))
        if request.verbose:
            response.info.update(self.images.verbose_info(record))
        return response

    @rpc
    def RemoveImage(
        self, request: api_pb2.RemoveImageRequest, context: grpc.ServicerContext
    ) -> api_pb2.RemoveImageResponse:
        self.images.remove(request.image.image)
        return api_pb2.RemoveImageResponse()

    @rpc
    def ImageFsInfo(
        self, request: api_pb2.ImageFsInfoRequest, context: grpc.ServicerContext
    ) -> api_pb2.ImageFsInfoResponse:
        usage = cri.filesystem_usage(self.config.image_dir)
        return api_pb2.ImageFsInfoResponse(image_filesystems=[usage], container_filesystems=[usage])


fill_unimplemented(RuntimeService, "RuntimeService")
fill_unimplemented(ImageService, "ImageService")


def _config_view(config: Config) -> dict[str, Any]:
    """The effective configuration, as plain values (what an operator compares with the file)."""
    view: dict[str, Any] = {}
    for name in config.__dataclass_fields__:
        value = getattr(config, name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [list(map(str, v)) if isinstance(v, tuple) else str(v) for v in value]
        view[name] = value
    return view


def _check_stdio(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    if not (stdin or stdout or stderr):
        raise InvalidArgument("one of stdin, stdout and stderr must be requested")
    if tty and stderr:
        raise InvalidArgument("tty and stderr cannot both be requested: a terminal has one output")


def _required_id(value: str, what: str = "pod_sandbox_id") -> str:
    if not value:
        raise InvalidArgument(f"{what} is required")
    return value


def _program(name: str) -> Path:
    found = shutil.which(name) if "/" not in name else name
    if found is None or not os.access(found, os.X_OK):
        raise FailedPrecondition(f"{name} is not installed (Debian package conmon)")
    return Path(found)


def _looks_like_id(value: str) -> bool:
    return len(value) <= validate.MAX_ID and all(c in "0123456789abcdef" for c in value)


# ---- socket and lifecycle ----------------------------------------------------------------


def prepare_socket(path: Path) -> None:
    """Make the parent dir; replace a stale socket; refuse a live one or a non-socket."""
    if len(str(path)) > _UNIX_PATH_MAX:
        raise FailedPrecondition(f"socket path {path} is longer than {_UNIX_PATH_MAX} bytes")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FailedPrecondition(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # nobody listens: left by a daemon that died
            return
    raise FailedPrecondition(f"another daemon is serving on {path}")


class Daemon:
    """Builds and owns everything one pyshim process runs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # First: a daemon that may not serve here must not touch the node (bridge, tables)
        # nor its state. Held until the process ends.
        self._locks = lockfile.hold_all(config.root, config.run_root, config.socket)
        prepare_socket(config.socket)
        if chrooted():  # after the locks: a daemon that may not serve says one line only
            log.warning(
                "event=chrooted reason=%r",
                "pyshim runs in a chroot: commands run by ExecSync and Exec see the node's real root "
                "directory, not the container's (the runtime's exec enters the mount namespace at its root)",
            )
        # Listening (not yet serving) before the node is touched: a port in use stops us here.
        self.streams = StreamServer(config.stream_address, config.stream_port, _tls_files(config))
        pause = find_pause(config.pause_path)
        self.watcher = ExitWatcher()
        self.reaper = OrphanReaper()
        self.network = NetworkSelector(config)
        image_store = ImageStore(config.image_dir)
        self.layers = LayerStore(image_store, config.image_dir / "layers", config.root / "rootfs")
        self.images = Images(
            image_store,
            self.layers,
            config.insecure_registries,
            registry_hosts.load(config.registry_config_dir),
        )
        self.cgroups = Cgroups()
        self.host = oci.HostFacts.detect(self.cgroups.controllers, self.cgroups.mode == "v2")
        self.runtimes = runtimes.load(
            config.runtime_handlers, config.run_root / "runtimes", self.cgroups.mode == "hybrid"
        )
        conmon = Conmon(
            _program(config.conmon), self.cgroups, config.run_root / "attach", config.create_timeout
        )
        self.events = EventBus(config.event_subscribers, config.event_queue)
        self.sandboxes = SandboxManager(config, pause, self.watcher, self.network, self.cgroups, self.events)
        self.containers = ContainerManager(
            config,
            self.sandboxes,
            self.images,
            self.layers,
            self.cgroups,
            self.host,
            self.watcher,
            self.runtimes,
            conmon,
        )
        self.stats = Stats(self.cgroups, self.layers.mounts_dir)
        self.server: grpc.Server | None = None
        self.metrics = (
            metrics.start(config.metrics_address, self.sandboxes, self.containers)
            if config.metrics_address
            else None
        )

    def start(self) -> None:
        # Recovery before the socket exists: no call ever sees half-loaded state.
        # Containers first: a pod is judged (and swept) knowing its containers.
        self.containers.recover()
        self.sandboxes.recover()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.config.grpc_workers, thread_name_prefix="rpc"),
            options=[
                ("grpc.max_receive_message_length", MAX_REQUEST),
                ("grpc.max_send_message_length", MAX_REPLY),
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_generic_rpc_handlers(
            (
                generic_handler(
                    RuntimeService(
                        self.config, self.sandboxes, self.containers, self.stats, self.streams, self.network
                    ),
                    "RuntimeService",
                ),
                generic_handler(ImageService(self.config, self.images), "ImageService"),
            )
        )
        server.add_insecure_port(f"unix:{self.config.socket}")
        os.chmod(self.config.socket, 0o660)
        self.streams.start(streaming.Targets(self.sandboxes, self.containers))
        server.start()
        self.server = server
        log.info("event=serving socket=%s version=%s", self.config.socket, __version__)

    def stop(self, grace: float = 10.0) -> None:
        """In-flight calls finish (up to `grace`); pods keep running."""
        self.events.close()  # first: event streams would otherwise hold the server for `grace`
        if self.server is not None:
            self.server.stop(grace).wait()
        self.streams.close()
        self.watcher.close()
        self.reaper.close()
        self.network.close()
        if self.metrics is not None:
            self.metrics.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket.unlink()
        log.info("event=stopped")


def _tls_files(config: Config) -> TLSFiles | None:
    cert, key = config.stream_tls_cert, config.stream_tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise InvalidArgument("--stream-tls-cert and --stream-tls-key go together")
    return TLSFiles(cert, key)


def serve(config: Config) -> int:
    os.umask(0o077)
    memory.tune_allocator()
    become_subreaper()
    daemon = Daemon(config)
    daemon.start()
    done = threading.Event()

    def on_signal(signo: int, _frame: object) -> None:
        log.info("event=signal signal=%s", signal.Signals(signo).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not done.wait(3600):
        pass
    daemon.stop()
    return 0
