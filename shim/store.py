"""Persistence shared by every kind of record: ids, atomic writes, a directory
of versioned JSON records, and the pod metadata that names things.

Nothing here knows about sandboxes, containers, networks or images, so that any
module may use it without an import cycle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

ID_RE = re.compile(r"[0-9a-f]{64}")


def is_id(value: str) -> bool:
    """A full id: 64 lowercase hex characters, nothing else (no trailing newline)."""
    return ID_RE.fullmatch(value) is not None


def new_id() -> str:
    return secrets.token_hex(32)


@dataclass(frozen=True, slots=True)
class Metadata:
    """A pod's metadata, as kubelet names it."""

    name: str
    uid: str
    namespace: str
    attempt: int

    @property
    def reservation(self) -> str:
        """The key that makes a sandbox unique, as kubelet means it."""
        return f"{self.name}_{self.namespace}_{self.uid}_{self.attempt}"


def write_atomically(path: Path, payload: bytes, durable: bool = True) -> None:
    """Temp file in the same dir, fsync, rename, fsync the dir: all or nothing.

    durable=False skips the fsyncs: for files on tmpfs, which a reboot clears anyway.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(payload)
        while view:  # a short write (e.g. a full disk) must never be renamed into place
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Typed reads of a record's JSON: a damaged file is refused (ValueError), never half-loaded.


def json_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    return value


def json_int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what} is not an integer in [{low}, {high}]")
    return value


def json_strings(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{what} is not a map of strings")
    return dict(value)


def json_str_list(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} is not a list of strings")
    return tuple(value)


class Record(Protocol):
    @property
    def id(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Record)


class RecordStore(Generic[R]):
    """One versioned JSON file per record: DIR/<id>.json, written atomically."""

    def __init__(self, directory: Path, from_json: Callable[[dict[str, Any]], R]) -> None:
        self.directory = directory
        self._from_json = from_json
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, record_id: str) -> Path:
        if not is_id(record_id):
            raise ValueError(f"not an id: {record_id!r}")
        return self.directory / f"{record_id}.json"

    def save(self, record: R, durable: bool = True) -> None:
        """Atomic always; durable=False skips the fsyncs, for a change that a machine
        crash makes moot anyway (a container's start or exit: no process outlives a reboot)."""
        payload = json.dumps(record.to_json(), separators=(",", ":")).encode()
        write_atomically(self.path(record.id), payload, durable)

    def delete(self, record_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(record_id).unlink()
            fsync_dir(self.directory)

    def ids(self) -> set[str]:
        """Ids of every record file, readable or not."""
        return {p.stem for p in self.directory.glob("*.json") if is_id(p.stem)}

    def load_all(self) -> list[R]:
        """Every readable record; a bad or future-versioned file is logged and left alone."""
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                data = json.loads(path.read_bytes())
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                record = self._from_json(data)
                if record.id != path.stem:
                    raise ValueError(f"the file holds id {record.id}")
                records.append(record)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("event=record_refused path=%s reason=%s", path, exc)
        for tmp in self.directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)  # a write that never got renamed
        return records
