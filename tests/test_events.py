"""GetContainerEvents on a real daemon: the events of a pod's and its containers'
lifecycle with the statuses kubelet's evented PLEG builds the pod from, exits seen
live and at start-up, several subscribers, and what a stream that does not keep up,
the subscriber cap and cancelled streams do to the daemon (nothing that blocks it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Daemon, conmon_pids, pod_config, run_pod
from containertools import container_config, create, import_image, run, start

from shim._proto import api_pb2, api_pb2_grpc

pytestmark = pytest.mark.root

Event = api_pb2.ContainerEventResponse
CREATED, STARTED = api_pb2.CONTAINER_CREATED_EVENT, api_pb2.CONTAINER_STARTED_EVENT
STOPPED, DELETED = api_pb2.CONTAINER_STOPPED_EVENT, api_pb2.CONTAINER_DELETED_EVENT
LIFECYCLE = [CREATED, STARTED, STOPPED, DELETED]
WAIT = 30.0  # seconds an expected event may take: a bound on a wait, never an assertion


class Subscriber:
    """One GetContainerEvents stream, read on a thread of its own."""

    def __init__(self, channel: grpc.Channel, read: bool = True) -> None:
        stub = api_pb2_grpc.RuntimeServiceStub(channel)
        self.call = stub.GetContainerEvents(api_pb2.GetEventsRequest())
        self.call.initial_metadata()  # the daemon sends it once the subscription exists
        if self.call.done() and self.call.code() != grpc.StatusCode.OK:
            raise self.call  # refused: the call is its own error
        self.events: list[Event] = []
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._read, daemon=True) if read else None
        if self._thread is not None:
            self._thread.start()

    def _read(self) -> None:
        try:
            for item in self.call:
                self.events.append(item)
        except grpc.RpcError as exc:
            self.error = exc

    def wait_for(self, done: Callable[[list[Event]], bool]) -> list[Event]:
        deadline = time.monotonic() + WAIT
        while not done(self.events) and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.events)

    def close(self) -> None:
        self.call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)


@pytest.fixture
def subscribe(cdaemon: Daemon) -> Iterator[Callable[..., Subscriber]]:
    made: list[Subscriber] = []

    def make(channel: grpc.Channel | None = None, read: bool = True) -> Subscriber:
        assert cdaemon.channel is not None
        made.append(Subscriber(channel or cdaemon.channel, read))
        return made[-1]

    yield make
    for sub in made:
        sub.close()


def pod(daemon: Daemon, **kwargs: object) -> str:
    config = pod_config(**kwargs)  # type: ignore[arg-type]
    config.log_directory = str(daemon.base / "logs" / config.metadata.name)
    return run_pod(daemon, config)


def of(events: list[Event], object_id: str) -> list[Event]:
    return [e for e in events if e.container_id == object_id]


def kinds(events: list[Event], object_id: str) -> list[int]:
    return [e.container_event_type for e in of(events, object_id)]


def states(event: Event) -> dict[str, int]:
    return {s.id: s.state for s in event.containers_statuses}


def stop_container(daemon: Daemon, container_id: str) -> None:
    daemon.runtime.StopContainer(
        api_pb2.StopContainerRequest(container_id=container_id, timeout=10), timeout=30
    )


def remove_container(daemon: Daemon, container_id: str) -> None:
    daemon.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container_id), timeout=30)


def stop_pod(daemon: Daemon, sandbox_id: str) -> None:
    daemon.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)


def remove_pod(daemon: Daemon, sandbox_id: str) -> None:
    daemon.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)


def test_a_pods_lifecycle_in_events(cdaemon: Daemon, subscribe: Callable[..., Subscriber]) -> None:
    first, second = subscribe(), subscribe()
    sandbox_id = pod(cdaemon, name="web", namespace="shop", uid="uid-web")
    kept = run(cdaemon, sandbox_id, container_config("kept"))
    cascaded = run(cdaemon, sandbox_id, container_config("cascaded"))
    stop_container(cdaemon, kept)
    remove_container(cdaemon, kept)
    remove_pod(cdaemon, sandbox_id)  # stops and removes `cascaded` with the pod

    events = first.wait_for(lambda e: kinds(e, sandbox_id) == LIFECYCLE)
    assert kinds(events, sandbox_id) == LIFECYCLE
    assert kinds(events, kept) == LIFECYCLE
    assert kinds(events, cascaded) == LIFECYCLE
    # Every subscriber sees every event, in the same order.
    assert second.wait_for(lambda e: len(e) >= len(events)) == events

    # Times in nanoseconds (kubelet keys its pod cache on them), in publishing order.
    times = [e.created_at for e in events]
    assert times == sorted(times)
    assert abs(times[0] - time.time_ns()) < 600 * 10**9
    for event in events:
        status = event.pod_sandbox_status
        assert event.HasField("pod_sandbox_status"), event  # kubelet drops events without it
        assert (status.id, status.metadata.name, status.metadata.namespace, status.metadata.uid) == (
            sandbox_id,
            "web",
            "shop",
            "uid-web",
        )

    created, started, stopped, deleted = of(events, kept)
    assert states(created)[kept] == api_pb2.CONTAINER_CREATED
    assert states(started)[kept] == api_pb2.CONTAINER_RUNNING
    assert states(stopped)[kept] == api_pb2.CONTAINER_EXITED
    assert kept not in states(deleted)
    assert states(deleted)[cascaded] == api_pb2.CONTAINER_RUNNING
    stopped_status = {s.id: s for s in stopped.containers_statuses}[kept]
    assert stopped_status.finished_at >= stopped_status.started_at > 0
    assert stopped_status.metadata.name == "kept"

    pod_created, pod_started, pod_stopped, pod_deleted = of(events, sandbox_id)
    assert pod_created.pod_sandbox_status.state == api_pb2.SANDBOX_READY
    assert pod_started.pod_sandbox_status.state == api_pb2.SANDBOX_READY
    assert not pod_created.containers_statuses
    # The pod stops after its containers: all of them exited by then.
    assert pod_stopped.pod_sandbox_status.state == api_pb2.SANDBOX_NOTREADY
    assert states(pod_stopped) == {cascaded: api_pb2.CONTAINER_EXITED}
    # Its removal comes last, with its last status (kubelet forgets the pod on it).
    assert events[-1] == pod_deleted
    assert pod_deleted.pod_sandbox_status.state == api_pb2.SANDBOX_NOTREADY
    assert not pod_deleted.containers_statuses
    assert events.index(of(events, cascaded)[-1]) < events.index(pod_deleted)


def test_stop_then_remove_pod_announces_each_once(
    cdaemon: Daemon, subscribe: Callable[..., Subscriber]
) -> None:
    sub = subscribe()
    sandbox_id = pod(cdaemon)
    container_id = run(cdaemon, sandbox_id, container_config("app"))
    stop_pod(cdaemon, sandbox_id)  # stops the container first
    stop_pod(cdaemon, sandbox_id)  # a repeat changes nothing, and says nothing
    remove_pod(cdaemon, sandbox_id)
    events = sub.wait_for(lambda e: kinds(e, sandbox_id) == LIFECYCLE)
    assert kinds(events, sandbox_id) == LIFECYCLE
    assert kinds(events, container_id) == LIFECYCLE
    assert events.index(of(events, container_id)[2]) < events.index(of(events, sandbox_id)[2])


def test_a_container_that_exits_on_its_own(cdaemon: Daemon, subscribe: Callable[..., Subscriber]) -> None:
    sub = subscribe()
    sandbox_id = pod(cdaemon)
    container_id = run(cdaemon, sandbox_id, container_config("job", ["sh", "-c", "sleep 0.5; exit 3"]))
    events = sub.wait_for(lambda e: STOPPED in kinds(e, container_id))
    assert kinds(events, container_id) == [CREATED, STARTED, STOPPED]
    stopped = {s.id: s for s in of(events, container_id)[-1].containers_statuses}[container_id]
    assert stopped.state == api_pb2.CONTAINER_EXITED
    assert stopped.exit_code == 3
    assert stopped.reason == "Error"
    # Removing it later does not announce its exit again.
    remove_container(cdaemon, container_id)
    events = sub.wait_for(lambda e: DELETED in kinds(e, container_id))
    assert kinds(events, container_id) == [CREATED, STARTED, STOPPED, DELETED]
    remove_pod(cdaemon, sandbox_id)


def test_an_exit_while_the_daemon_was_down(cdaemon: Daemon) -> None:
    sandbox_id = pod(cdaemon)
    container_id = run(cdaemon, sandbox_id, container_config("job", ["sh", "-c", "sleep 1; exit 5"]))
    cdaemon.kill9()
    deadline = time.monotonic() + WAIT
    while _conmon_of(container_id) and time.monotonic() < deadline:
        time.sleep(0.05)  # conmon ends once it has recorded the exit
    cdaemon.start()
    assert cdaemon.channel is not None
    # Nobody listened when pyshim found the exit at start-up: the first subscriber gets it.
    sub = Subscriber(cdaemon.channel)
    try:
        events = sub.wait_for(lambda e: STOPPED in kinds(e, container_id))
        assert kinds(events, container_id) == [STOPPED]
        stopped = of(events, container_id)[0]
        assert stopped.pod_sandbox_status.id == sandbox_id
        assert {s.id: s.exit_code for s in stopped.containers_statuses} == {container_id: 5}
    finally:
        sub.close()
    remove_pod(cdaemon, sandbox_id)


def _conmon_of(container_id: str) -> bool:
    for pid in conmon_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if container_id.encode() in f.read():
                    return True
        except OSError:
            continue
    return False


def test_a_stalled_subscriber_is_dropped_and_blocks_nothing(
    daemon_factory: type[Daemon], busybox: Path
) -> None:
    d = daemon_factory(["--event-queue", "4"])  # type: ignore[call-arg]
    import_image(d, busybox)
    # A channel that never reads, with the transport's window kept small: it stalls soon.
    stalled_channel = grpc.insecure_channel(f"unix://{d.socket}", options=[("grpc.http2.bdp_probe", 0)])
    stalled = Subscriber(stalled_channel, read=False)
    # Big events (the pod's annotations are in every one) fill the transport quickly.
    annotations = {f"note-{i}": "x" * 15000 for i in range(16)}
    sandbox_id = pod(d, annotations=annotations)
    cycles = 0
    while "event=event_subscriber_dropped" not in d.log.read_text() and cycles < 200:
        container_id = create(d, sandbox_id, container_config("churn", attempt=cycles))
        remove_container(d, container_id)  # both calls complete while the subscriber stalls
        cycles += 1
    assert "event=event_subscriber_dropped" in d.log.read_text()
    # The daemon serves on: calls, and a new subscriber that gets what follows.
    d.runtime.Version(api_pb2.VersionRequest(), timeout=10)
    assert d.channel is not None
    fresh = Subscriber(d.channel)
    try:
        container_id = create(d, sandbox_id, container_config("after"))
        start(d, container_id)
        events = fresh.wait_for(lambda e: STARTED in kinds(e, container_id))
        assert kinds(events, container_id) == [CREATED, STARTED]
    finally:
        fresh.close()
    # What the stalled stream had received before it was dropped, then its end in error.
    with pytest.raises(grpc.RpcError) as ended:
        for _ in stalled.call:
            pass
    assert ended.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED)
    stalled_channel.close()
    stop_container(d, container_id)
    remove_pod(d, sandbox_id)


def test_subscribers_are_capped(cdaemon: Daemon, subscribe: Callable[..., Subscriber]) -> None:
    subs = [subscribe() for _ in range(8)]
    assert cdaemon.channel is not None
    stub = api_pb2_grpc.RuntimeServiceStub(cdaemon.channel)
    with pytest.raises(grpc.RpcError) as refused:
        for _ in stub.GetContainerEvents(api_pb2.GetEventsRequest(), timeout=10):
            pass
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Ordinary calls are served all the same.
    sandbox_id = pod(cdaemon)
    for sub in subs:
        assert kinds(sub.wait_for(lambda e: len(kinds(e, sandbox_id)) == 2), sandbox_id) == [CREATED, STARTED]
    remove_pod(cdaemon, sandbox_id)


def test_cancelled_subscriptions_hold_no_worker(daemon_factory: type[Daemon], busybox: Path) -> None:
    # Four workers: a stream that outlived its cancel would soon leave none for calls.
    d = daemon_factory(["--grpc-workers", "4", "--event-subscribers", "2"])  # type: ignore[call-arg]
    assert d.channel is not None
    for _ in range(20):
        sub = _subscribe_when_free(d.channel)
        sub.close()
    sandbox_id = pod(d)
    d.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10)
    sub = _subscribe_when_free(d.channel)
    try:
        remove_pod(d, sandbox_id)
        events = sub.wait_for(lambda e: DELETED in kinds(e, sandbox_id))
        assert kinds(events, sandbox_id)[-2:] == [STOPPED, DELETED]
    finally:
        sub.close()


def _subscribe_when_free(channel: grpc.Channel) -> Subscriber:
    """A subscription, once the daemon has seen the previous ones' cancels (it learns
    of a client's cancel a little after the client sent it)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            return Subscriber(channel)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
