"""The in-memory index that sandboxes and containers share: entries by id, names
reserved while an object is made, unique-prefix lookup, per-entry locks, and a
generation that moves on every change a list could show.

An entry is whatever the owning manager keeps in memory for one object (its
record plus process handles); the registry only needs its id, its reservation
name, a lock and a removed flag.
"""

from __future__ import annotations

import threading
import time
from typing import Generic, Protocol, TypeVar

from shim.errors import AlreadyExists, InvalidArgument, NotFound


class Entry(Protocol):
    lock: threading.Lock
    removed: bool

    @property
    def id(self) -> str: ...

    @property
    def reservation(self) -> str: ...


E = TypeVar("E", bound=Entry)


class Registry(Generic[E]):
    def __init__(self, kind: str) -> None:
        self.kind = kind  # "pod sandbox", "container": for messages
        self._lock = threading.Lock()
        self._entries: dict[str, E] = {}
        self._names: dict[str, str] = {}  # reservation name -> id
        self._pending: dict[str, threading.Event] = {}  # names whose create is in flight
        # Bumped after every change a list could show; lets callers cache a full list.
        self.generation = 0

    # ---- names -------------------------------------------------------------------------

    def reserve(self, name: str, wait: float) -> E | None:
        """Reserve `name` for an object about to be made: None once reserved (the
        caller then calls commit or release), or the entry that holds the name. A
        create of the same name in flight is waited for, at most `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                holder_id = self._names.get(name)
                if holder_id is not None:
                    return self._entries[holder_id]
                pending = self._pending.get(name)
                if pending is None:
                    self._pending[name] = threading.Event()
                    return None
            if not pending.wait(max(deadline - time.monotonic(), 0)):
                raise AlreadyExists(f"{self.kind} name {name!r} is still being created by another request")

    def commit(self, name: str, entry: E) -> None:
        """The reserved name's object exists: index it under its id and name."""
        with self._lock:
            self._entries[entry.id] = entry
            self._names[name] = entry.id
            self.generation += 1
            event = self._pending.pop(name, None)
        if event is not None:
            event.set()

    def release(self, name: str) -> None:
        """The reserved name's create failed and left nothing: free the name."""
        with self._lock:
            event = self._pending.pop(name, None)
        if event is not None:
            event.set()

    # ---- entries -----------------------------------------------------------------------

    def adopt(self, entry: E) -> None:
        """An entry loaded at start-up. Its name goes to the first entry that claims it."""
        with self._lock:
            self._entries[entry.id] = entry
            self._names.setdefault(entry.reservation, entry.id)
            self.generation += 1

    def discard(self, entry: E) -> None:
        with self._lock:
            self._entries.pop(entry.id, None)
            if self._names.get(entry.reservation) == entry.id:
                del self._names[entry.reservation]
            self.generation += 1

    def changed(self) -> None:
        with self._lock:
            self.generation += 1

    def find(self, id_or_prefix: str) -> E | None:
        """An entry by full id or unique prefix; None if none matches. A prefix that
        matches several is INVALID_ARGUMENT: the caller must give more of the id."""
        with self._lock:
            found = self._entries.get(id_or_prefix)
            if found is not None or not id_or_prefix:
                return found
            matches = [e for i, e in self._entries.items() if i.startswith(id_or_prefix)]
        if len(matches) > 1:
            raise InvalidArgument(
                f"{self.kind} id prefix {id_or_prefix!r} is ambiguous ({len(matches)} match); "
                "give more of the id"
            )
        return matches[0] if matches else None

    def get(self, id_or_prefix: str) -> E:
        found = self.find(id_or_prefix)
        if found is None:
            raise NotFound(f"{self.kind} {id_or_prefix!r} not found")
        return found

    def entries(self, id_prefix: str = "") -> list[E]:
        with self._lock:
            if not id_prefix:
                return list(self._entries.values())
            exact = self._entries.get(id_prefix)
            if exact is not None:
                return [exact]
            return [e for i, e in self._entries.items() if i.startswith(id_prefix)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
