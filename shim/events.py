"""Container events for GetContainerEvents (kubelet's evented PLEG).

The lifecycle publishes an event after each state change it saved; every
subscriber (one GetContainerEvents stream) has a bounded queue of its own, and
the gRPC worker serving the stream drains it. Publishing never blocks and never
raises: it runs under the lifecycle's short state locks and on the exit-watcher
thread, so it takes only the bus lock, held for a few appends. A subscriber
whose queue is full is dropped (one log line) and its stream ends in error:
kubelet then relists and subscribes again.

An event holds references to the (immutable) records it reports; it is encoded
on the subscriber's worker, and each record's encoding is cached while the
record lives, so publishing costs a few references and N subscribers encode a
record once.

Each stream holds a gRPC worker thread for its whole life, so subscribers are
capped (--event-subscribers, below --grpc-workers) and the rest are
RESOURCE_EXHAUSTED: streams can never take every worker from ordinary calls.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from shim import cri
from shim._proto import api_pb2
from shim.containers.record import ContainerRecord
from shim.errors import ResourceExhausted, SubscriberDropped, Unavailable
from shim.sandbox_record import SandboxRecord

log = logging.getLogger(__name__)

MAX_SUBSCRIBERS = 8
QUEUE_LENGTH = 1000  # kubelet's own PLEG channel holds as many
# Events published while nobody listens wait this long for the first subscriber (as
# containerd's CRI plugin keeps them): exits found at start-up reach a kubelet that
# subscribes once the socket is up.
BACKLOG_AGE = 300.0
# How often a waiting stream checks that its client is still there, in case the
# termination callback never came.
_POLL = 1.0


class EventType(enum.IntEnum):
    CREATED = api_pb2.CONTAINER_CREATED_EVENT
    STARTED = api_pb2.CONTAINER_STARTED_EVENT
    STOPPED = api_pb2.CONTAINER_STOPPED_EVENT
    DELETED = api_pb2.CONTAINER_DELETED_EVENT


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    """What happened to a container (or, by its id, to a pod sandbox), and its pod
    as it was then: the sandbox's record (None if it is gone) and its containers'."""

    container_id: str
    kind: EventType
    created_at: int  # ns since the epoch: kubelet keys its pod cache on it
    sandbox: SandboxRecord | None
    containers: tuple[ContainerRecord, ...]


Snapshot = Callable[[], tuple[SandboxRecord | None, tuple[ContainerRecord, ...]]]


def event(container_id: str, kind: EventType, snapshot: Snapshot) -> ContainerEvent:
    # The time first, then the records: what is reported is at least as new as the
    # time, which is what kubelet's cache assumes of a timestamped status.
    created_at = time.time_ns()
    sandbox, containers = snapshot()
    return ContainerEvent(container_id, kind, created_at, sandbox, containers)


# Each is the encoding of a one-field ContainerEventResponse, so that an event is the
# concatenation of its parts (protobuf merges concatenated messages).
_sandbox_part: cri.EncodedList[SandboxRecord] = cri.EncodedList(
    lambda r: api_pb2.ContainerEventResponse(pod_sandbox_status=cri.pod_sandbox_status(r)).SerializeToString()
)
_container_parts: cri.EncodedList[ContainerRecord] = cri.EncodedList(
    lambda r: api_pb2.ContainerEventResponse(
        containers_statuses=[cri.container_status(r)]
    ).SerializeToString()
)


def encode(event: ContainerEvent) -> bytes:
    """The ContainerEventResponse of an event, serialized."""
    head = api_pb2.ContainerEventResponse(
        container_id=event.container_id,
        container_event_type=event.kind.value,
        created_at=event.created_at,
    ).SerializeToString()
    sandbox = _sandbox_part((event.sandbox,)) if event.sandbox is not None else b""
    return head + sandbox + _container_parts(event.containers)


@dataclass(eq=False)
class Subscription:
    """One stream's queue. Its condition shares the bus lock: a publisher appends and
    wakes the reader in one short critical section."""

    number: int
    cond: threading.Condition
    capacity: int
    on_drop: Callable[[], None]
    queue: collections.deque[ContainerEvent] = field(default_factory=collections.deque)
    dropped: bool = False
    closed: bool = False

    def next(self, timeout: float) -> ContainerEvent | None:
        """The next event; None after `timeout` seconds without one or once closed.
        A dropped subscription raises SubscriberDropped once its queue is read."""
        with self.cond:
            if not self.queue and not self.closed and not self.dropped:
                self.cond.wait(timeout)
            if self.queue:
                return self.queue.popleft()
            if self.dropped:
                raise SubscriberDropped(
                    f"this event stream fell {self.capacity} events behind and was dropped; "
                    "relist and subscribe again"
                )
            return None


class EventBus:
    def __init__(self, max_subscribers: int = MAX_SUBSCRIBERS, queue_length: int = QUEUE_LENGTH) -> None:
        if max_subscribers < 1 or queue_length < 1:
            raise ValueError("event subscribers and queue length must be at least 1")
        self.max_subscribers = max_subscribers
        self.queue_length = queue_length
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []
        self._backlog: collections.deque[tuple[float, ContainerEvent]] = collections.deque(
            maxlen=queue_length
        )
        self._numbers = itertools.count(1)
        self._closed = False

    # ---- publishing ------------------------------------------------------------------

    def emit(self, container_id: str, kind: EventType, snapshot: Snapshot) -> None:
        """Build and publish an event; never raises into the lifecycle that calls it.
        `snapshot` gives the pod's sandbox record (None if gone) and its containers'."""
        try:
            self.publish(event(container_id, kind, snapshot))
        except Exception:
            log.exception("event=container_event_lost container=%s type=%s", container_id, kind.name)

    def publish(self, item: ContainerEvent) -> None:
        dropped: list[Subscription] = []
        with self._lock:
            if self._closed:
                return
            if not self._subscribers:
                self._backlog.append((time.monotonic(), item))
                return
            for sub in self._subscribers:
                if len(sub.queue) >= sub.capacity:
                    sub.dropped = True
                    dropped.append(sub)
                else:
                    sub.queue.append(item)
                sub.cond.notify()
            if dropped:
                self._subscribers = [s for s in self._subscribers if not s.dropped]
                if not self._subscribers:  # kept for whoever subscribes next, as any unheard event
                    self._backlog.append((time.monotonic(), item))
        # Outside the lock: the hook may run gRPC's termination callbacks, which unsubscribe.
        for sub in dropped:
            log.warning(
                "event=event_subscriber_dropped subscriber=%d queued=%d detail=it did not read its events",
                sub.number,
                len(sub.queue),
            )
            try:
                sub.on_drop()
            except Exception:
                log.exception("event=event_subscriber_drop_failed subscriber=%d", sub.number)

    # ---- subscribing -----------------------------------------------------------------

    def subscribe(self, on_drop: Callable[[], None] = lambda: None) -> Subscription:
        """A new subscription; `on_drop` runs (outside every lock) if it falls behind."""
        with self._lock:
            if self._closed:
                raise Unavailable("pyshim is shutting down: no new event streams")
            if len(self._subscribers) >= self.max_subscribers:
                raise ResourceExhausted(
                    f"{len(self._subscribers)} event streams are open, the most pyshim serves "
                    "(each holds a request thread); close one first"
                )
            cond = threading.Condition(self._lock)
            sub = Subscription(next(self._numbers), cond, self.queue_length, on_drop)
            sub.queue.extend(self._take_backlog())
            self._subscribers.append(sub)
        log.info("event=event_subscribed subscriber=%d replayed=%d", sub.number, len(sub.queue))
        return sub

    def _take_backlog(self) -> list[ContainerEvent]:
        horizon = time.monotonic() - BACKLOG_AGE
        kept = [item for at, item in self._backlog if at >= horizon]
        self._backlog.clear()
        return kept

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub.closed:
                return
            sub.closed = True
            sub.queue.clear()
            if sub in self._subscribers:
                self._subscribers.remove(sub)
            sub.cond.notify()
        log.debug("event=event_unsubscribed subscriber=%d", sub.number)

    def stream(self, sub: Subscription, still_wanted: Callable[[], bool]) -> Iterator[bytes]:
        """The encoded events of `sub` as they come, until it is closed or its client
        goes; a dropped subscription ends with SubscriberDropped."""
        try:
            while True:
                item = sub.next(_POLL)
                if item is not None:
                    yield encode(item)
                elif sub.closed or not still_wanted():
                    return
        finally:
            self.unsubscribe(sub)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def close(self) -> None:
        """Shutting down: every stream ends (OK) and no new one is taken."""
        with self._lock:
            self._closed = True
            subs, self._subscribers = self._subscribers, []
            for sub in subs:
                sub.closed = True
                sub.cond.notify()
