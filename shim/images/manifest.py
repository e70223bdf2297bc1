"""What registries and image archives say about an image, read with the type of
every value checked: manifests, indexes, descriptors, image configs and token
server answers.

These come from outside (a registry, a mirror, an archive copied onto the node),
so a value of the wrong type is a FailedPrecondition that names where it came
from and what is wrong, never a TypeError or AttributeError deep in the daemon.
`source` is that origin as it should read in a message: "registry 10.0.0.5:5000".
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from typing import Any

from shim.errors import FailedPrecondition, NotFound, Unauthenticated
from shim.images.store import ImageConfig, signal_number

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
LISTS = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
MAX_LAYERS = 256
MAX_INDEX_ENTRIES = 1024

# The OCI digest grammar: an index may list content under other algorithms (sha512)
# for other platforms; only what pyshim fetches must be sha256.
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]{1,256}")
# A bearer token goes into a header as it is: visible ASCII only (no CR LF injection).
HEADER_TOKEN = re.compile(r"[\x21-\x7e]{1,65536}")


@dataclass(frozen=True, slots=True)
class Platform:
    os: str = ""
    architecture: str = ""
    variant: str = ""


@dataclass(frozen=True, slots=True)
class Descriptor:
    digest: str
    size: int | None = None  # None: the descriptor gave none
    media_type: str = ""
    platform: Platform | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def annotation(self, key: str) -> str:
        return dict(self.annotations).get(key, "")


@dataclass(frozen=True, slots=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def size(self) -> int:
        """Config and layers, compressed, as the descriptors give them."""
        return sum(d.size or 0 for d in (self.config, *self.layers))


def _bad(source: str, what: str) -> FailedPrecondition:
    return FailedPrecondition(f"{source}: {what}")


def _show(value: object) -> str:
    return repr(value)[:80]


def json_value(body: bytes, what: str, source: str) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise _bad(source, f"the {what} is not JSON") from None


def json_object(body: bytes, what: str, source: str) -> dict[str, Any]:
    value = json_value(body, what, source)
    if not isinstance(value, dict):
        raise _bad(source, f"the {what} is not a JSON object")
    return value


def optional_str(data: dict[str, Any], key: str, what: str, source: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(source, f"{what}: {key} is {_show(value)}, not a string")
    return value


def str_list(data: dict[str, Any], key: str, what: str, source: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(source, f"{what}: {key} is {_show(value)}, not a list of strings")
    return tuple(value)


def _object_keys(data: dict[str, Any], key: str, what: str, source: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _bad(source, f"{what}: {key} is {_show(value)}, not an object")
    return tuple(sorted(value))


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def descriptor(value: object, what: str, source: str) -> Descriptor:
    if not isinstance(value, dict):
        raise _bad(source, f"{what} is {_show(value)}, not a descriptor object")
    digest = value.get("digest")
    if not isinstance(digest, str) or not _ANY_DIGEST.fullmatch(digest):
        raise _bad(source, f"{what} has a malformed digest {_show(digest)}")
    size = value.get("size")
    if size is not None and not _is_count(size):
        raise _bad(source, f"{what}: size {_show(size)} is not a byte count")
    annotations = value.get("annotations")
    if annotations is None:
        annotations = {}
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        raise _bad(source, f"{what}: annotations are not an object of strings")
    return Descriptor(
        digest=digest,
        size=size,
        media_type=optional_str(value, "mediaType", what, source),
        platform=_platform(value, what, source),
        annotations=tuple(sorted(annotations.items())),
    )


def _platform(data: dict[str, Any], what: str, source: str) -> Platform | None:
    value = data.get("platform")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(source, f"{what}: platform is {_show(value)}, not an object")
    return Platform(
        os=optional_str(value, "os", f"{what}'s platform", source),
        architecture=optional_str(value, "architecture", f"{what}'s platform", source),
        variant=optional_str(value, "variant", f"{what}'s platform", source),
    )


def media_type(body: bytes, content_type: str, source: str) -> str:
    """A manifest's media type: its Content-Type, or (none, or plain JSON) its own
    `mediaType`, or else what its fields say it is, as containerd guesses."""
    if content_type and content_type != "application/json":
        return content_type
    data = json_object(body, "manifest", source)
    declared = optional_str(data, "mediaType", "the manifest", source)
    if declared:
        return declared
    if "manifests" in data:
        return OCI_INDEX
    return OCI_MANIFEST if "config" in data else ""


def index(body: bytes, source: str) -> tuple[Descriptor, ...]:
    data = json_object(body, "image index", source)
    entries = data.get("manifests")
    if not isinstance(entries, list) or len(entries) > MAX_INDEX_ENTRIES:
        raise _bad(source, f"the index's manifests are {_show(entries)}, not a list of descriptors")
    return tuple(descriptor(e, f"index entry {i}", source) for i, e in enumerate(entries))


def manifest(body: bytes, source: str) -> Manifest:
    data = json_object(body, "manifest", source)
    if "config" not in data:
        raise _bad(source, "the manifest has no config")
    layers = data.get("layers", [])
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise _bad(source, f"the manifest's layers are {_show(layers)}, not a list of at most {MAX_LAYERS}")
    return Manifest(
        config=descriptor(data["config"], "the manifest's config", source),
        layers=tuple(descriptor(d, f"layer {i}", source) for i, d in enumerate(layers)),
    )


def image_config(body: bytes, source: str) -> ImageConfig:
    """What a container needs from the image's config; null fields are empty."""
    data = json_object(body, "image config", source)
    c = data.get("config")
    if c is None:
        return ImageConfig()
    if not isinstance(c, dict):
        raise _bad(source, f"the image config's config is {_show(c)}, not an object")
    what = "the image config"
    return ImageConfig(
        entrypoint=str_list(c, "Entrypoint", what, source),
        cmd=str_list(c, "Cmd", what, source),
        env=str_list(c, "Env", what, source),
        working_dir=optional_str(c, "WorkingDir", what, source),
        user=optional_str(c, "User", what, source),
        exposed_ports=_object_keys(c, "ExposedPorts", what, source),
        volumes=_object_keys(c, "Volumes", what, source),
        stop_signal=signal_number(optional_str(c, "StopSignal", what, source)),
    )


def token(body: bytes, source: str) -> str:
    """The bearer token in a token server's answer (`token`, or OAuth2's `access_token`)."""
    data = json_object(body, "token answer", source)
    for key in ("token", "access_token"):
        value = data.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str) or not HEADER_TOKEN.fullmatch(value):
            raise _bad(source, f"the {key} is {_show(value)}, not a token an HTTP header can carry")
        return value
    raise Unauthenticated(f"{source} gave no token")


_ARCHES = {
    "x86_64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


def node_platform() -> tuple[str, str]:
    """This node's (architecture, variant) in OCI terms."""
    machine = platform.machine()
    return _ARCHES.get(machine, (machine, ""))


def choose_platform(entries: tuple[Descriptor, ...], source: str) -> Descriptor:
    """The index entry for this node's platform: a matching variant first, then any
    entry of the architecture."""
    arch, variant = node_platform()
    candidates = [
        e for e in entries if e.platform and e.platform.os == "linux" and e.platform.architecture == arch
    ]
    if not candidates:
        raise NotFound(f"{source}: no linux/{arch} image in the index")
    return min(candidates, key=lambda e: e.platform is None or e.platform.variant != variant)
