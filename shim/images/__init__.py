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

from shim import metrics
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
from shim.images import manifest as parse_content
from shim.images.hosts import Endpoint, HostConfig
from shim.images.layers import LayerStore
from shim.images.manifest import LISTS, MANIFESTS, Descriptor
from shim.images.reference import Reference, is_digest, parse
from shim.images.registry import Credentials, RegistryClient
from shim.images.store import ImageRecord, ImageStore

log = logging.getLogger(__name__)

MAX_CONFIG = 16 * 1024 * 1024
MAX_LAYER = 64 * 1024 * 1024 * 1024
MIN_ID_PREFIX = 12
# What an endpoint that is down, incomplete or misbehaving raises (RegistryClient
# and shim.images.manifest): a mirror failing so hands over to the next endpoint.
_ENDPOINT_FAILURES = (NotFound, Unavailable, Unauthenticated, DataLoss, FailedPrecondition)


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

    @metrics.image_pull
    def pull(self, text: str, credentials: Credentials) -> ImageRecord:
        """From the first endpoint (mirrors in order, then the upstream) that serves
        the whole image; a mirror that fails midway, or answers what pyshim will not
        use, hands over to the next endpoint, which does not fetch again what was
        already verified."""
        ref = parse(text)
        credentials.check()
        pinned: list[str] = []
        errors: list[ShimError] = []
        record = None
        try:
            for endpoint, client in self._clients(ref, credentials):
                try:
                    record = self._pull_from(ref, client, pinned)
                    break
                except _ENDPOINT_FAILURES as exc:
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
        manifest_digest = top_digest
        if media_type in LISTS:
            chosen = parse_content.choose_platform(parse_content.index(body, client.name), client.name)
            body, media_type, manifest_digest = client.manifest(_sha256(chosen, client))
        if media_type not in MANIFESTS:
            raise FailedPrecondition(
                f"{client.name}: manifest type {media_type[:100]!r} of {ref} is not supported (schema 1?)"
            )
        manifest = parse_content.manifest(body, client.name)
        config_digest = self._fetch(client, manifest.config, MAX_CONFIG, pinned)
        # Read before any layer is fetched: a config pyshim cannot use fails the pull at once.
        config = parse_content.image_config(self.store.read_blob(config_digest), client.name)
        layers = tuple(self._fetch(client, d, MAX_LAYER, pinned) for d in manifest.layers)
        self.store.pin(manifest_digest)
        pinned.append(manifest_digest)
        if not self.store.has_blob(manifest_digest):
            self.store.put_blob(manifest_digest, body)
        record = ImageRecord(
            id=config_digest,
            manifest_digest=manifest_digest,
            layers=layers,
            size=manifest.size,
            repo_tags=(str(ref),) if ref.tag else (),
            repo_digests=(f"{ref.name}@{top_digest}",),
            config=config,
        )
        return self.store.commit(record)

    def _fetch(self, client: RegistryClient, descriptor: Descriptor, limit: int, pinned: list[str]) -> str:
        digest = _sha256(descriptor, client)
        size = limit if descriptor.size is None else descriptor.size
        self.store.pin(digest)
        pinned.append(digest)
        if size > limit:
            raise FailedPrecondition(f"{client.name}: blob {digest} is {size} bytes, the limit is {limit}")
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
        """By id (sha256:<hex>, bare hex, or a unique prefix of at least 12 hex digits
        of either), or by reference. An ambiguous prefix is INVALID_ARGUMENT, as for
        every other kind of id."""
        if not text:
            raise InvalidArgument("image is required")
        matches = self._by_id_prefix(text)
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InvalidArgument(
                f"image id prefix {text!r} is ambiguous ({len(matches)} match); give more of the id"
            )
        return self._by_reference(parse(text))

    def get(self, text: str) -> ImageRecord:
        record = self.find(text)
        if record is None:
            raise NotFound(f"image {text[:200]!r} not found")
        return record

    def matching(self, text: str) -> list[ImageRecord]:
        """ListImages' filter: every image whose id starts with it, or the one it names;
        a filter that cannot name an image matches none (a list never fails)."""
        if not text:
            return self.store.images()
        matches = self._by_id_prefix(text)
        if matches:
            return matches
        try:
            found = self._by_reference(parse(text))
        except InvalidArgument:
            return []
        return [found] if found else []

    def _by_id_prefix(self, text: str) -> list[ImageRecord]:
        if not _looks_like_id(text):
            return []
        hex_part = text.removeprefix("sha256:")
        return [r for r in self.store.images() if r.id.removeprefix("sha256:").startswith(hex_part)]

    def _by_reference(self, ref: Reference) -> ImageRecord | None:
        wanted = str(ref)
        for record in self.store.images():
            if wanted in record.repo_tags or wanted in record.repo_digests:
                return record
        return None

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
        source = f"image {record.id} in the store"
        info = {
            "manifest": parse_content.json_object(
                self.store.read_blob(record.manifest_digest), "manifest", source
            ),
            "config": parse_content.json_object(self.store.read_blob(record.id), "image config", source),
        }
        return {"info": json.dumps(info, sort_keys=True)}


def _sha256(descriptor: Descriptor, client: RegistryClient) -> str:
    if not is_digest(descriptor.digest):
        raise FailedPrecondition(f"{client.name}: digest {descriptor.digest[:80]!r} is not sha256")
    return descriptor.digest


def _looks_like_id(text: str) -> bool:
    hex_part = text.removeprefix("sha256:")
    return MIN_ID_PREFIX <= len(hex_part) <= 64 and all(c in "0123456789abcdef" for c in hex_part)
