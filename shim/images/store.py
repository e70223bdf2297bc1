"""The image store: content-addressed blobs and image records, on disk.

    images/blobs/sha256/<hex>      manifests, configs, layers: verified before they land
    images/records/<hex>.json      one per image (named by its config digest)
    images/tmp/                    downloads in progress; emptied on start

A blob is written to tmp/, its digest checked, then renamed into blobs/: a
failed pull leaves nothing behind in blobs/ or records/. A blob no record uses
is deleted when its last image is removed.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from shim.errors import DataLoss
from shim.images.reference import is_digest
from shim.store import write_atomically

log = logging.getLogger(__name__)

RECORD_VERSION = 1


class Source(Protocol):
    """What a blob is copied from: a registry's response body, an archive member."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """What a container spec needs from the image's config (read by shim.images.manifest)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    stop_signal: int = 0  # the image's StopSignal as a number; 0: none given


@dataclass(frozen=True, slots=True)
class ImageRecord:
    id: str  # sha256:<config digest>
    manifest_digest: str
    layers: tuple[str, ...]  # layer blob digests, bottom first
    size: int  # config + layers, compressed, as the registry reports them
    repo_tags: tuple[str, ...] = ()
    repo_digests: tuple[str, ...] = ()
    config: ImageConfig = field(default_factory=ImageConfig)

    @property
    def blobs(self) -> set[str]:
        return {self.id, self.manifest_digest, *self.layers}

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "version": RECORD_VERSION,
            "id": self.id,
            "manifest_digest": self.manifest_digest,
            "layers": list(self.layers),
            "size": self.size,
            "repo_tags": list(self.repo_tags),
            "repo_digests": list(self.repo_digests),
            "config": {
                "entrypoint": list(c.entrypoint),
                "cmd": list(c.cmd),
                "env": list(c.env),
                "working_dir": c.working_dir,
                "user": c.user,
                "exposed_ports": list(c.exposed_ports),
                "volumes": list(c.volumes),
                "stop_signal": c.stop_signal,
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRecord:
        if data.get("version") != RECORD_VERSION:
            raise ValueError(f"image record version {data.get('version')!r} is not {RECORD_VERSION}")
        c = data["config"]
        return cls(
            id=data["id"],
            manifest_digest=data["manifest_digest"],
            layers=tuple(data["layers"]),
            size=int(data["size"]),
            repo_tags=tuple(data["repo_tags"]),
            repo_digests=tuple(data["repo_digests"]),
            config=ImageConfig(
                entrypoint=tuple(c["entrypoint"]),
                cmd=tuple(c["cmd"]),
                env=tuple(c["env"]),
                working_dir=c["working_dir"],
                user=c["user"],
                exposed_ports=tuple(c["exposed_ports"]),
                volumes=tuple(c["volumes"]),
                stop_signal=int(c.get("stop_signal", 0)),
            ),
        )


class ImageStore:
    def __init__(self, root: Path, owner: bool = True) -> None:
        """owner: this is the daemon (not `pyshim images import`): it cleans up at start."""
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.record_dir = root / "records"
        self.tmp_dir = root / "tmp"
        for d in (self.blob_dir, self.record_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._lockfile = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._images: dict[str, ImageRecord] = {}
        self._pins: collections.Counter[str] = collections.Counter()
        self._seen_mtime = -1
        with self._locked():
            self._load()
            if owner:
                self._sweep()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's threads and other processes (an import) change records one at a time."""
        with self._lock:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lockfile, fcntl.LOCK_UN)

    def _sweep(self) -> None:
        """Downloads a crash interrupted, and blobs no image uses (a failed pull's)."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(mode=0o700)
        used = {d.removeprefix("sha256:") for r in self._images.values() for d in r.blobs}
        for path in self.blob_dir.iterdir():
            if path.name not in used:
                path.unlink(missing_ok=True)

    def _refresh(self) -> None:
        """Reload when another process (`pyshim images import`) changed the records."""
        mtime = self.record_dir.stat().st_mtime_ns
        if mtime != self._seen_mtime:
            self._images.clear()
            self._load()

    def _load(self) -> None:
        self._seen_mtime = self.record_dir.stat().st_mtime_ns
        for path in sorted(self.record_dir.glob("*.json")):
            try:
                record = ImageRecord.from_json(json.loads(path.read_bytes()))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("event=image_record_refused path=%s reason=%s", path, exc)
                continue
            if all(self.has_blob(d) for d in record.blobs):
                self._images[record.id] = record
            else:
                log.error("event=image_incomplete image=%s", record.id)

    # ---- blobs -------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise DataLoss(f"not a sha256 digest: {digest[:80]!r}")
        return self.blob_dir / digest.removeprefix("sha256:")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    @contextlib.contextmanager
    def new_blob(self, digest: str):  # type: ignore[no-untyped-def]
        """A temp file to write a blob into; renamed into place only if the body succeeds
        (the writer checked the digest). Durable: fsynced before the rename."""
        target = self.blob_path(digest)
        fd, name = _mkstemp(self.tmp_dir)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as sink:
                yield sink
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def put_blob_stream(self, digest: str, source: Source, limit: int, origin: str = "") -> None:
        """Copy a blob from a stream, checking size and digest on the way; nothing
        lands in the store unless both hold."""
        hasher = hashlib.sha256()
        size = 0
        with self.new_blob(digest) as sink:
            while chunk := source.read(1024 * 1024):
                size += len(chunk)
                if size > limit:
                    raise DataLoss(
                        f"blob {digest}{origin} is larger than its descriptor says ({limit} bytes)"
                    )
                hasher.update(chunk)
                sink.write(chunk)
            if "sha256:" + hasher.hexdigest() != digest:
                raise DataLoss(f"blob {digest}{origin} does not match its digest")

    def put_blob(self, digest: str, data: bytes) -> None:
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise DataLoss(f"content does not match {digest}")
        with self.new_blob(digest) as sink:
            sink.write(data)

    # ---- records -----------------------------------------------------------------------

    def images(self) -> list[ImageRecord]:
        with self._lock:
            self._refresh()
            return list(self._images.values())

    def get(self, image_id: str) -> ImageRecord | None:
        with self._lock:
            self._refresh()
            return self._images.get(image_id)

    def pin(self, digest: str) -> None:
        """Keep a blob from being deleted while a pull that needs it is running."""
        with self._lock:
            self._pins[digest] += 1

    def unpin(self, digests: list[str], drop_unused: bool) -> None:
        """Release pins; with drop_unused (a failed pull), delete those blobs no image uses."""
        with self._locked():
            for digest in digests:
                self._pins[digest] -= 1
                if self._pins[digest] <= 0:
                    del self._pins[digest]
            if drop_unused:
                used = set().union(*(r.blobs for r in self._images.values())) if self._images else set()
                for digest in set(digests) - used - set(self._pins):
                    self.blob_path(digest).unlink(missing_ok=True)

    def commit(self, record: ImageRecord) -> ImageRecord:
        """Add or merge an image; its tags move here from any other image."""
        missing = [d for d in record.blobs if not self.has_blob(d)]
        if missing:
            raise DataLoss(f"image {record.id}: blob {missing[0]} vanished before the image was recorded")
        with self._locked():
            self._refresh()
            existing = self._images.get(record.id)
            if existing is not None:
                record = replace(
                    existing,
                    repo_tags=_union(existing.repo_tags, record.repo_tags),
                    repo_digests=_union(existing.repo_digests, record.repo_digests),
                )
            for other in list(self._images.values()):
                if other.id != record.id and set(other.repo_tags) & set(record.repo_tags):
                    moved = replace(
                        other, repo_tags=tuple(t for t in other.repo_tags if t not in record.repo_tags)
                    )
                    self._save(moved)
            self._save(record)
            return record

    def untag(self, image_id: str, tag: str) -> None:
        with self._locked():
            self._refresh()
            record = self._images.get(image_id)
            if record is not None:
                self._save(replace(record, repo_tags=tuple(t for t in record.repo_tags if t != tag)))

    def delete(self, image_id: str) -> None:
        """Drop the record and every blob no other image uses."""
        with self._locked():
            self._refresh()
            record = self._images.pop(image_id, None)
            if record is None:
                return
            (self.record_dir / f"{image_id.removeprefix('sha256:')}.json").unlink(missing_ok=True)
            self._seen_mtime = self.record_dir.stat().st_mtime_ns
            still_used = set().union(*(r.blobs for r in self._images.values())) if self._images else set()
            for digest in record.blobs - still_used - set(self._pins):
                self.blob_path(digest).unlink(missing_ok=True)

    def _save(self, record: ImageRecord) -> None:
        path = self.record_dir / f"{record.id.removeprefix('sha256:')}.json"
        write_atomically(path, json.dumps(record.to_json(), separators=(",", ":")).encode())
        self._images[record.id] = record
        self._seen_mtime = self.record_dir.stat().st_mtime_ns  # our own change: no reload


def signal_number(value: object) -> int:
    """An image's StopSignal ("SIGTERM", "TERM", "15") as a number; 0 if none or unknown."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        return 0
    text = str(value).strip().upper()
    if text.isdigit():
        return int(text) if 0 < int(text) < 65 else 0
    name = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        return 0


def _union(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*a, *b]))


def _mkstemp(directory: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(dir=directory, prefix="blob-")
