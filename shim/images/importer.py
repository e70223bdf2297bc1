"""Importing images from files, for air-gapped nodes: an OCI image layout in a
tar, or what `docker save` writes. The result is indistinguishable from a pull.

    pyshim images import busybox.tar [--name registry.k8s.io/pause:3.10]

An archive is read like a registry's answer: every JSON value's type is checked
(shim.images.manifest), and a broken archive is a ShimError naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from shim.errors import FailedPrecondition, InvalidArgument
from shim.images import manifest as parse_content
from shim.images.manifest import DOCKER_MANIFEST, LISTS, Descriptor, Manifest
from shim.images.reference import is_digest, parse
from shim.images.store import ImageRecord, ImageStore

log = logging.getLogger(__name__)

MAX_JSON = 16 * 1024 * 1024
MAX_BLOB = 64 * 1024 * 1024 * 1024
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
# What reading a truncated or corrupt (gzip) tar raises.
_ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class _Member:
    """An archive member's content; a read that fails names the archive."""

    def __init__(self, source: IO[bytes], archive: str) -> None:
        self._source = source
        self._archive = archive

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self._source.read(size)
        except _ARCHIVE_ERRORS as exc:
            raise InvalidArgument(f"{self._archive}: cannot be read: {exc}") from None


class _Archive:
    def __init__(self, path: Path) -> None:
        self.source = f"archive {path}"
        try:
            self.tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - kept open for the import, closed in import_file
            members = self.tar.getmembers()
        except _ARCHIVE_ERRORS as exc:
            raise InvalidArgument(f"{path}: not a readable tar: {exc}") from None
        self.members = {str(PurePosixPath(m.name.lstrip("./"))): m for m in members if m.isreg()}

    def has(self, name: str) -> bool:
        return name in self.members

    def open(self, name: str) -> _Member:
        member = self.members.get(name)
        if member is None:
            raise InvalidArgument(f"{self.source} lacks {name[:200]!r}")
        try:
            source = self.tar.extractfile(member)
        except _ARCHIVE_ERRORS as exc:
            raise InvalidArgument(f"{self.source}: cannot read {name!r}: {exc}") from None
        assert source is not None  # a regular file always has content
        return _Member(source, self.source)

    def read(self, name: str) -> bytes:
        member = self.members.get(name)
        if member is not None and member.size > MAX_JSON:
            raise InvalidArgument(f"{self.source}: {name!r} is larger than {MAX_JSON} bytes")
        return self.open(name).read()

    def copy_blob(self, store: ImageStore, name: str, digest: str) -> int:
        source = self.open(name)
        if not store.has_blob(digest):
            store.put_blob_stream(digest, source, MAX_BLOB, f" in {self.source}")
        return self.members[name].size

    def digest_of(self, name: str) -> str:
        source = self.open(name)
        hasher = hashlib.sha256()
        while chunk := source.read(1024 * 1024):
            hasher.update(chunk)
        return "sha256:" + hasher.hexdigest()


def import_file(store: ImageStore, path: Path, name: str = "") -> list[ImageRecord]:
    archive = _Archive(path)
    try:
        if archive.has("index.json") and archive.has("oci-layout"):
            return _import_oci(store, archive, name)
        if archive.has("manifest.json"):
            return _import_docker(store, archive, name)
        raise InvalidArgument(f"{path}: neither an OCI image layout nor a docker save archive")
    finally:
        archive.tar.close()


def _blob_name(digest: str, source: str) -> str:
    if not is_digest(digest):
        raise FailedPrecondition(f"{source}: unsupported digest {digest[:80]!r} (only sha256)")
    return f"blobs/sha256/{digest.removeprefix('sha256:')}"


def _import_oci(store: ImageStore, archive: _Archive, name: str) -> list[ImageRecord]:
    source = archive.source
    records = []
    for entry in parse_content.index(archive.read("index.json"), source):
        ref_name = name or entry.annotation("io.containerd.image.name")
        tag_only = entry.annotation("org.opencontainers.image.ref.name")
        if not ref_name and tag_only:
            if "/" not in tag_only:
                raise InvalidArgument(
                    f"the archive names its image only by the tag {tag_only!r}: pass --name NAME:TAG"
                )
            ref_name = tag_only
        if entry.media_type in LISTS:
            entries = parse_content.index(archive.read(_blob_name(entry.digest, source)), source)
            entry = parse_content.choose_platform(entries, source)
        manifest_name = _blob_name(entry.digest, source)
        manifest = parse_content.manifest(archive.read(manifest_name), source)
        archive.copy_blob(store, manifest_name, entry.digest)
        for blob in (manifest.config, *manifest.layers):
            archive.copy_blob(store, _blob_name(blob.digest, source), blob.digest)
        records.append(_commit(store, ref_name, entry.digest, manifest, source))
    return records


def _docker_entries(archive: _Archive) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(Config, Layers, RepoTags) of each image in a `docker save` manifest.json."""
    source = archive.source
    data = parse_content.json_value(archive.read("manifest.json"), "manifest.json", source)
    if not isinstance(data, list):
        raise FailedPrecondition(f"{source}: manifest.json is not a list of images")
    entries = []
    for i, entry in enumerate(data):
        what = f"manifest.json entry {i}"
        if not isinstance(entry, dict):
            raise FailedPrecondition(f"{source}: {what} is not an object")
        config = parse_content.optional_str(entry, "Config", what, source)
        if not config:
            raise FailedPrecondition(f"{source}: {what} names no Config")
        layers = parse_content.str_list(entry, "Layers", what, source)
        tags = parse_content.str_list(entry, "RepoTags", what, source)
        entries.append((config, layers, tags))
    return entries


def _import_docker(store: ImageStore, archive: _Archive, name: str) -> list[ImageRecord]:
    records = []
    for config_name, layer_names, repo_tags in _docker_entries(archive):
        config_digest = archive.digest_of(config_name)
        config_size = archive.copy_blob(store, config_name, config_digest)
        layers = []
        for layer_name in layer_names:
            digest = archive.digest_of(layer_name)
            size = archive.copy_blob(store, layer_name, digest)
            layers.append(Descriptor(digest=digest, size=size, media_type=DOCKER_LAYER))
        manifest = Manifest(Descriptor(config_digest, config_size, DOCKER_CONFIG), tuple(layers))
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": _descriptor_json(manifest.config),
                "layers": [_descriptor_json(d) for d in manifest.layers],
            },
            separators=(",", ":"),
        ).encode()
        manifest_digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if not store.has_blob(manifest_digest):
            store.put_blob(manifest_digest, body)
        for tag in [name] if name else list(repo_tags) or [""]:
            records.append(_commit(store, tag, manifest_digest, manifest, archive.source))
    return records


def _descriptor_json(d: Descriptor) -> dict[str, object]:
    return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}


def _commit(
    store: ImageStore, ref_name: str, manifest_digest: str, manifest: Manifest, source: str
) -> ImageRecord:
    tags: tuple[str, ...] = ()
    if ref_name:
        ref = parse(ref_name)
        if not ref.tag:
            raise InvalidArgument(f"{ref_name!r}: an imported image is named by a tag (name:tag)")
        tags = (str(ref),)
    record = ImageRecord(
        id=manifest.config.digest,
        manifest_digest=manifest_digest,
        layers=tuple(d.digest for d in manifest.layers),
        size=manifest.size,
        repo_tags=tags,
        config=parse_content.image_config(store.read_blob(manifest.config.digest), source),
    )
    record = store.commit(record)
    log.info("event=image_imported image=%s tags=%s", record.id, ",".join(tags) or "-")
    return record
