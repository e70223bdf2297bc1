"""Registry hosts configuration, as node operators know it from containerd's
`certs.d/<host>/hosts.toml`: per registry host, mirrors to try in order, TLS
settings, and (a pyshim addition) credentials.

    # /etc/pyshim/certs.d/registry.k8s.io/hosts.toml
    server = "https://registry.k8s.io"     # the upstream; default https://<host>
    skip_upstream = false                  # true: mirrors only (air-gapped nodes)

    [host."http://10.0.0.5:5000"]          # mirrors, tried in file order
      capabilities = ["pull", "resolve"]
      skip_verify = false                  # https without certificate checks
      ca = "/etc/pyshim/certs.d/registry.k8s.io/ca.crt"
      username = "puller"                  # used when the pull request brings none
      password = "..."

An image pulled through a mirror keeps its own name. A file with a value of the
wrong type or a URL that is not http(s)://host[:port][/path] is refused whole
(logged), so a typo never half-applies.
"""

from __future__ import annotations

import logging
import ssl
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from shim.images.reference import Reference, valid_host
from shim.images.registry import Credentials, is_loopback

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str  # scheme://host[:port][/prefix], without /v2
    skip_verify: bool = False
    ca: str = ""
    credentials: Credentials | None = None
    mirror: bool = False
    can_resolve: bool = True  # may resolve tags (capability "resolve")

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https://"):
            return None
        if self.skip_verify:
            return ssl._create_unverified_context()  # the operator asked for it, per host
        return ssl.create_default_context(cafile=self.ca or None)


@dataclass(frozen=True, slots=True)
class HostConfig:
    mirrors: tuple[Endpoint, ...] = ()
    server: str = ""
    skip_upstream: bool = False
    skip_verify: bool = False
    ca: str = ""


def load(config_dir: Path) -> dict[str, HostConfig]:
    """Every `<dir>/<host>/hosts.toml`; a broken file is logged and ignored."""
    hosts: dict[str, HostConfig] = {}
    if not config_dir.is_dir():
        return hosts
    for path in sorted(config_dir.glob("*/hosts.toml")):
        try:
            hosts[path.parent.name] = parse(tomllib.loads(path.read_text()))
        except (ValueError, OSError) as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
            log.error("event=hosts_config_refused path=%s reason=%s", path, exc)
    return hosts


def _get(table: dict[str, Any], key: str, kind: type[T], default: T, where: str) -> T:
    value = table.get(key, default)
    if not isinstance(value, kind):
        raise ValueError(f"{where}{key} must be a {kind.__name__}, not {value!r:.80}")
    return value


def _url(url: str, what: str) -> str:
    """http(s)://host[:port][/path], without a trailing slash."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not valid_host(parts.netloc):
        raise ValueError(f"{what} {url!r:.120} is not http(s)://host[:port][/path]")
    if parts.query or parts.fragment or any(c.isspace() or not c.isprintable() for c in parts.path):
        raise ValueError(f"{what} {url!r:.120} may have only a path after the host")
    return url.rstrip("/")


def parse(data: dict[str, Any]) -> HostConfig:
    """A parsed hosts.toml; ValueError saying what is wrong."""
    mirrors = []
    table = _get(data, "host", dict, {}, "")
    for url, settings in table.items():
        if not isinstance(settings, dict):
            raise ValueError(f"mirror {url!r:.120} must be a table")
        where = f"mirror {url!r:.120}: "
        caps = _get(settings, "capabilities", list, ["pull", "resolve"], where)
        if not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{where}capabilities must be a list of strings")
        endpoint_url = _url(url, "mirror")
        if "pull" not in caps:
            continue
        username = _get(settings, "username", str, "", where)
        password = _get(settings, "password", str, "", where)
        mirrors.append(
            Endpoint(
                url=endpoint_url,
                skip_verify=_get(settings, "skip_verify", bool, False, where),
                ca=_get(settings, "ca", str, "", where),
                credentials=Credentials(username=username, password=password) if username else None,
                mirror=True,
                can_resolve="resolve" in caps,
            )
        )
    server = _get(data, "server", str, "", "")
    return HostConfig(
        mirrors=tuple(mirrors),
        server=_url(server, "server") if server else "",
        skip_upstream=_get(data, "skip_upstream", bool, False, ""),
        skip_verify=_get(data, "skip_verify", bool, False, ""),
        ca=_get(data, "ca", str, "", ""),
    )


def endpoints(
    ref: Reference, hosts: dict[str, HostConfig], insecure_hosts: tuple[str, ...]
) -> list[Endpoint]:
    """Where to pull `ref` from, in order: its mirrors, then its upstream."""
    config = hosts.get(ref.registry) or HostConfig()
    result = list(config.mirrors)
    if not config.skip_upstream:
        host = ref.api_host
        plain = host in insecure_hosts or is_loopback(host)
        server = config.server or f"{'http' if plain else 'https'}://{host}"
        result.append(Endpoint(url=server, skip_verify=config.skip_verify, ca=config.ca))
    return result
