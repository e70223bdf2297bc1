"""Importing images from files, for air-gapped nodes: an OCI image layout in a
tar, or what `docker save` writes. The result is indistinguishable from a pull.

    pyshim images import busybox.tar [--name registry.k8s.io/pause:3.10]
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from shim.errors import FailedPrecondition, InvalidArgument
from shim.images.reference import DIGEST, parse
from shim.images.registry import DOCKER_MANIFEST, LISTS, choose_platform
from shim.images.store import ImageConfig, ImageRecord, ImageStore

log = logging.getLogger(__name__)

MAX_JSON = 16 * 1024 * 1024
MAX_BLOB = 64 * 1024 * 1024 * 1024
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"


class _Archive:
    def __init__(self, path: Path) -> None:
        try:
            self.tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - kept open for the import, closed in import_file
        except (tarfile.TarError, OSError) as exc:
            raise InvalidArgument(f"{path}: not a readable tar: {exc}") from None
        self.members = {
            str(PurePosixPath(m.name.lstrip("./"))): m for m in self.tar.getmembers() if m.isreg()
        }

    def has(self, name: str) -> bool:
        return name in self.members

    def json(self, name: str) -> Any:
        member = self.members.get(name)
        if member is None or member.size > MAX_JSON:
            raise InvalidArgument(f"the archive has no usable {name}")
        source = self.tar.extractfile(member)
        assert source is not None
        return json.loads(source.read())

    def copy_blob(self, store: ImageStore, name: str, digest: str) -> int:
        member = self.members.get(name)
        if member is None:
            raise InvalidArgument(f"the archive lacks {name}")
        if not store.has_blob(digest):
            source = self.tar.extractfile(member)
            assert source is not None
            store.put_blob_stream(digest, source, MAX_BLOB)
        return member.size

    def digest_of(self, name: str) -> str:
        source = self.tar.extractfile(self.members[name])
        assert source is not None
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


def _blob_name(digest: str) -> str:
    if not DIGEST.match(digest):
        raise FailedPrecondition(f"unsupported digest {digest[:80]!r}")
    return f"blobs/sha256/{digest.removeprefix('sha256:')}"


def _import_oci(store: ImageStore, archive: _Archive, name: str) -> list[ImageRecord]:
    records = []
    for entry in archive.json("index.json").get("manifests", []):
        annotations = entry.get("annotations") or {}
        ref_name = name or annotations.get("io.containerd.image.name", "")
        tag_only = annotations.get("org.opencontainers.image.ref.name", "")
        if not ref_name and tag_only:
            if "/" not in tag_only:
                raise InvalidArgument(
                    f"the archive names its image only by the tag {tag_only!r}: pass --name NAME:TAG"
                )
            ref_name = tag_only
        digest = str(entry.get("digest", ""))
        manifest_body_name = _blob_name(digest)
        if entry.get("mediaType") in LISTS:
            digest = choose_platform(archive.json(manifest_body_name))
            manifest_body_name = _blob_name(digest)
        manifest = archive.json(manifest_body_name)
        archive.copy_blob(store, manifest_body_name, digest)
        config_digest = manifest["config"]["digest"]
        archive.copy_blob(store, _blob_name(config_digest), config_digest)
        layers = []
        for layer in manifest.get("layers", []):
            archive.copy_blob(store, _blob_name(layer["digest"]), layer["digest"])
            layers.append(layer["digest"])
        records.append(_commit(store, ref_name, digest, config_digest, tuple(layers), manifest))
    return records


def _import_docker(store: ImageStore, archive: _Archive, name: str) -> list[ImageRecord]:
    records = []
    for entry in archive.json("manifest.json"):
        config_name = entry["Config"]
        config_digest = archive.digest_of(config_name)
        config_size = archive.copy_blob(store, config_name, config_digest)
        layer_descs: list[dict[str, Any]] = []
        for layer_name in entry["Layers"]:
            digest = archive.digest_of(layer_name)
            size = archive.copy_blob(store, layer_name, digest)
            layer_descs.append({"mediaType": DOCKER_LAYER, "digest": digest, "size": size})
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest, "size": config_size},
            "layers": layer_descs,
        }
        body = json.dumps(manifest, separators=(",", ":")).encode()
        manifest_digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if not store.has_blob(manifest_digest):
            store.put_blob(manifest_digest, body)
        tags = [name] if name else list(entry.get("RepoTags") or [])
        layers = tuple(str(d["digest"]) for d in layer_descs)
        for tag in tags or [""]:
            records.append(_commit(store, tag, manifest_digest, config_digest, layers, manifest))
    return records


def _commit(
    store: ImageStore,
    ref_name: str,
    manifest_digest: str,
    config_digest: str,
    layers: tuple[str, ...],
    manifest: dict[str, Any],
) -> ImageRecord:
    tags: tuple[str, ...] = ()
    if ref_name:
        ref = parse(ref_name)
        if not ref.tag:
            raise InvalidArgument(f"{ref_name!r}: an imported image is named by a tag (name:tag)")
        tags = (str(ref),)
    config = json.loads(store.read_blob(config_digest))
    record = ImageRecord(
        id=config_digest,
        manifest_digest=manifest_digest,
        layers=layers,
        size=int(manifest["config"].get("size", 0))
        + sum(int(x.get("size", 0)) for x in manifest.get("layers", [])),
        repo_tags=tags,
        config=ImageConfig.from_config(config),
    )
    record = store.commit(record)
    log.info("event=image_imported image=%s tags=%s", record.id, ",".join(tags) or "-")
    return record
