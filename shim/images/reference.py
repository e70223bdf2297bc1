"""Image references, normalised as containerd and the docker CLI do.

busybox                      -> docker.io/library/busybox:latest
quay.io/coreos/etcd:v3.5     -> quay.io/coreos/etcd:v3.5
127.0.0.1:5000/team/app@sha256:<64 hex>
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shim.errors import InvalidArgument

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
MAX_REFERENCE = 512

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_HOST = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?$"
)
_TAG = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


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

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag=tag)


def parse(text: str) -> Reference:
    """A normalised reference, or InvalidArgument saying what is wrong."""
    if not text or len(text) > MAX_REFERENCE or any(c.isspace() for c in text):
        raise InvalidArgument(f"image reference {text[:80]!r} is empty, too long or has spaces")
    rest, digest = text, ""
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not DIGEST.match(digest):
            raise InvalidArgument(f"image reference {text[:80]!r}: digest must be sha256:<64 hex>")
    tag = ""
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidArgument(f"image reference {text[:80]!r}: bad tag {tag!r}")
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, repository = first, remainder
        if not _HOST.match(registry):
            raise InvalidArgument(f"image reference {text[:80]!r}: bad registry host {registry!r}")
    else:
        registry, repository = DEFAULT_REGISTRY, rest
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    if not _REPOSITORY.match(repository):
        raise InvalidArgument(f"image reference {text[:80]!r}: bad repository {repository!r}")
    if not tag and not digest:
        tag = "latest"
    return Reference(registry=registry, repository=repository, tag=tag if not digest else "", digest=digest)
