"""Image references, normalised as containerd and the docker CLI do.

busybox                      -> docker.io/library/busybox:latest
quay.io/coreos/etcd:v3.5     -> quay.io/coreos/etcd:v3.5
127.0.0.1:5000/team/app@sha256:<64 hex>

Every pattern is matched whole (`fullmatch`): `re.match` with `$` would let a
trailing newline through.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from shim.errors import InvalidArgument

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
MAX_REFERENCE = 512
MAX_NAME = 255  # registry/repository, as the distribution project limits it
MAX_HOSTNAME = 253
MAX_LABEL = 63  # longer DNS labels make the idna codec raise before any lookup

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:]+\])(?::[0-9]{{1,5}})?")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
DIGEST = re.compile(r"sha256:[a-f0-9]{64}")


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str  # as named: docker.io, 127.0.0.1:5000
    repository: str  # library/busybox
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}"

    @property
    def api_host(self) -> str:
        """Where the registry API lives (Docker Hub's is not docker.io)."""
        return DOCKER_HUB_API if self.registry == DEFAULT_REGISTRY else self.registry


def is_digest(text: str) -> bool:
    """A sha256 digest, the only algorithm pyshim stores."""
    return DIGEST.fullmatch(text) is not None


def valid_host(host: str) -> bool:
    """host[:port] of a registry: DNS labels of at most 63 characters and 253 in all,
    or an IPv6 literal in brackets; a port from 1 to 65535."""
    if not _HOST.fullmatch(host):
        return False
    if host.startswith("["):
        name, _, port = host[1:].partition("]")
        port = port.removeprefix(":")
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return False
    else:
        name, _, port = host.partition(":")
        if len(name) > MAX_HOSTNAME or any(len(label) > MAX_LABEL for label in name.split(".")):
            return False
    return not port or 1 <= int(port) <= 65535


def parse(text: str) -> Reference:
    """A normalised reference, or InvalidArgument saying what is wrong."""
    if not text or len(text) > MAX_REFERENCE or any(c.isspace() for c in text):
        raise InvalidArgument(f"image reference {text[:80]!r} is empty, too long or has spaces")
    rest, digest = text, ""
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not is_digest(digest):
            raise InvalidArgument(f"image reference {text[:80]!r}: digest must be sha256:<64 hex>")
    tag = ""
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidArgument(f"image reference {text[:80]!r}: bad tag {tag[:80]!r}")
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, repository = first, remainder
        if not valid_host(registry):
            raise InvalidArgument(
                f"image reference {text[:80]!r}: bad registry host {registry[:80]!r} (DNS labels of at most"
                f" {MAX_LABEL} characters, {MAX_HOSTNAME} in all, a port from 1 to 65535)"
            )
    else:
        registry, repository = DEFAULT_REGISTRY, rest
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    if not _REPOSITORY.fullmatch(repository):
        raise InvalidArgument(f"image reference {text[:80]!r}: bad repository {repository[:80]!r}")
    if len(registry) + 1 + len(repository) > MAX_NAME:
        raise InvalidArgument(f"image reference {text[:80]!r}: the name is longer than {MAX_NAME} characters")
    if not tag and not digest:
        tag = "latest"
    return Reference(registry=registry, repository=repository, tag=tag if not digest else "", digest=digest)
