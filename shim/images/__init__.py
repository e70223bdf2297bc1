"""Images: pull from registries into the content store, find, list, remove.

PullImage resolves a reference to a manifest (an index or list resolves to this
node's platform), fetches the config and layers into the store (verified; a
blob already there is not fetched again; concurrent pulls of one blob share one
download), and records the image under its config digest.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

from shim.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ShimError,
    Unauthenticated,
    Unavailable,
)
from shim.images import hosts as hosts_config
from shim.images.hosts import Endpoint, HostConfig
from shim.images.layers import LayerStore
from shim.images.reference import DIGEST, Reference, parse
from shim.images.registry import (
    DOCKER_MANIFEST,
    LISTS,
    OCI_MANIFEST,
    Credentials,
    RegistryClient,
    choose_platform,
)
from shim.images.store import ImageConfig, ImageRecord, ImageStore

log = logging.getLogger(__name__)

MAX_CONFIG = 16 * 1024 * 1024
MAX_LAYER = 64 * 1024 * 1024 * 1024
MAX_LAYERS = 256


class Images:
    def __init__(
        self,
        store: ImageStore,
        layers: LayerStore | None = None,
        insecure_hosts: tuple[str, ...] = (),
        hosts: dict[str, HostConfig] | None = None,
    ) -> None:
        self.store = store
        self.layers = layers
        self.hosts = hosts or {}
        self.insecure_hosts = insecure_hosts
        self._blob_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    # ---- pull --------------------------------------------------------------------------

    def pull(self, text: str, credentials: Credentials) -> ImageRecord:
        """From the first endpoint (mirrors in order, then the upstream) that serves
        the whole image; a mirror that fails midway hands over to the next endpoint,
        which does not fetch again what was already verified."""
        ref = parse(text)
        pinned: list[str] = []
        errors: list[ShimError] = []
        record = None
        try:
            for endpoint, client in self._clients(ref, credentials):
                try:
                    record = self._pull_from(ref, client, pinned)
                    break
                except (NotFound, Unavailable, Unauthenticated, DataLoss) as exc:
                    if not endpoint.mirror:
                        raise
                    log.info("event=mirror_skipped mirror=%s ref=%s reason=%r", endpoint.url, ref, str(exc))
                    errors.append(exc)
        finally:
            # A failed pull leaves no blob behind that no image uses.
            self.store.unpin(pinned, drop_unused=record is None)
        if record is None:
            if not errors:
                raise FailedPrecondition(f"no endpoint to pull {ref} from (skip_upstream and no mirror)")
            raise errors[-1]
        log.info("event=image_pulled image=%s ref=%s layers=%d", record.id, ref, len(record.layers))
        return record

    def _clients(self, ref: Reference, credentials: Credentials) -> Iterator[tuple[Endpoint, RegistryClient]]:
        for endpoint in hosts_config.endpoints(ref, self.hosts, self.insecure_hosts):
            if endpoint.mirror and not ref.digest and not endpoint.can_resolve:
                continue  # a pull-only mirror may not say what a tag means
            # The pull's own credentials are for the upstream registry only; a mirror
            # gets those configured for it.
            creds = (endpoint.credentials or Credentials()) if endpoint.mirror else credentials
            yield endpoint, RegistryClient(endpoint.url, ref.repository, creds, endpoint.ssl_context())

    def _pull_from(self, ref: Reference, client: RegistryClient, pinned: list[str]) -> ImageRecord:
        body, media_type, top_digest = client.manifest(ref.digest or ref.tag)
        if media_type in LISTS:
            chosen = choose_platform(_json(body, "image index"))
            body, media_type, manifest_digest = client.manifest(chosen)
        else:
            manifest_digest = top_digest
        if media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
            raise FailedPrecondition(f"{ref}: manifest type {media_type!r} is not supported (schema 1?)")
        manifest = _json(body, "manifest")
        config_desc, layer_descs = manifest.get("config") or {}, manifest.get("layers") or []
        if not isinstance(layer_descs, list) or len(layer_descs) > MAX_LAYERS:
            raise FailedPrecondition(f"{ref}: the manifest's layers are not a list of at most {MAX_LAYERS}")
        config_digest = self._fetch(client, config_desc, MAX_CONFIG, pinned)
        layers = tuple(self._fetch(client, d, MAX_LAYER, pinned) for d in layer_descs)
        self.store.pin(manifest_digest)
        pinned.append(manifest_digest)
        if not self.store.has_blob(manifest_digest):
            self.store.put_blob(manifest_digest, body)
        return self._record(ref, top_digest, manifest_digest, config_digest, layers, config_desc, layer_descs)

    def _record(
        self,
        ref: Reference,
        top_digest: str,
        manifest_digest: str,
        config_digest: str,
        layers: tuple[str, ...],
        config_desc: dict[str, Any],
        layer_descs: list[dict[str, Any]],
    ) -> ImageRecord:
        config = _json(self.store.read_blob(config_digest), "image config")
        record = ImageRecord(
            id=config_digest,
            manifest_digest=manifest_digest,
            layers=layers,
            size=_size(config_desc) + sum(_size(d) for d in layer_descs),
            repo_tags=(str(ref),) if ref.tag else (),
            repo_digests=(f"{ref.name}@{top_digest}",),
            config=ImageConfig.from_config(config),
        )
        return self.store.commit(record)

    def _fetch(self, client: RegistryClient, descriptor: Any, limit: int, pinned: list[str]) -> str:
        if not isinstance(descriptor, dict):
            raise FailedPrecondition("a manifest descriptor is not a JSON object")
        digest = str(descriptor.get("digest", ""))
        if not DIGEST.match(digest):
            raise FailedPrecondition(f"unsupported or malformed digest {digest[:80]!r}")
        size = _size(descriptor, default=limit)
        self.store.pin(digest)
        pinned.append(digest)
        if size > limit:
            raise FailedPrecondition(f"blob {digest} is {size} bytes, the limit is {limit}")
        with self._blob_lock(digest):  # a second pull of this blob waits, then finds it
            if not self.store.has_blob(digest):
                with client.open_blob(digest) as body:
                    self.store.put_blob_stream(digest, body, size, f" from {client.host}")
        return digest

    def _blob_lock(self, digest: str) -> threading.Lock:
        with self._locks_lock:
            return self._blob_locks.setdefault(digest, threading.Lock())

    # ---- lookup ------------------------------------------------------------------------

    def find(self, text: str) -> ImageRecord | None:
        """By id (sha256:<hex>, bare hex, or a unique prefix of either), or by reference."""
        if not text:
            raise InvalidArgument("image is required")
        hex_part = text.removeprefix("sha256:")
        if len(hex_part) >= 12 and all(c in "0123456789abcdef" for c in hex_part):
            matches = [r for r in self.store.images() if r.id.removeprefix("sha256:").startswith(hex_part)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise InvalidArgument(f"image id prefix {text!r} is ambiguous ({len(matches)} images)")
        ref: Reference = parse(text)
        wanted = str(ref)
        for record in self.store.images():
            if wanted in record.repo_tags or wanted in record.repo_digests:
                return record
        return None

    def get(self, text: str) -> ImageRecord:
        record = self.find(text)
        if record is None:
            raise NotFound(f"image {text!r} not found")
        return record

    def remove(self, text: str) -> None:
        """Idempotent. A tag of an image with other names only loses that tag."""
        record = self.find(text)
        if record is None:
            return
        tag = str(parse(text)) if not _looks_like_id(text) else ""
        if tag in record.repo_tags and (len(record.repo_tags) > 1):
            self.store.untag(record.id, tag)
            log.info("event=image_untagged image=%s tag=%s", record.id, tag)
            return
        self.store.delete(record.id)
        if self.layers is not None:
            self.layers.remove_unused(self.live_layers())
        log.info("event=image_removed image=%s", record.id)

    def live_layers(self) -> set[str]:
        """Layers of every image in the store."""
        return {d for r in self.store.images() for d in r.layers}

    def verbose_info(self, record: ImageRecord) -> dict[str, str]:
        info = {
            "manifest": _json(self.store.read_blob(record.manifest_digest), "manifest"),
            "config": _json(self.store.read_blob(record.id), "image config"),
        }
        return {"info": json.dumps(info, sort_keys=True)}


def _size(descriptor: dict[str, Any], default: int = 0) -> int:
    size = descriptor.get("size", default)
    if not isinstance(size, int) or size < 0:
        raise FailedPrecondition(f"descriptor size {str(size)[:40]!r} is not a byte count")
    return size


def _looks_like_id(text: str) -> bool:
    hex_part = text.removeprefix("sha256:")
    return len(hex_part) >= 12 and all(c in "0123456789abcdef" for c in hex_part)


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        raise FailedPrecondition(f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise FailedPrecondition(f"the {what} is not a JSON object")
    return value
