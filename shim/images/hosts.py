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

An image pulled through a mirror keeps its own name.
"""

from __future__ import annotations

import logging
import ssl
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.images.reference import Reference
from shim.images.registry import Credentials, is_loopback

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str  # scheme://host[:port][/prefix], without /v2
    skip_verify: bool = False
    ca: str = ""
    credentials: Credentials | None = None
    mirror: bool = False
    can_resolve: bool = True  # may resolve tags (capability "resolve")

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).netloc

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
            hosts[path.parent.name] = _parse(tomllib.loads(path.read_text()))
        except (tomllib.TOMLDecodeError, ValueError, TypeError, AttributeError, OSError) as exc:
            log.error("event=hosts_config_refused path=%s reason=%s", path, exc)
    return hosts


def _parse(data: dict[str, Any]) -> HostConfig:
    mirrors = []
    table = data.get("host") or {}
    if not isinstance(table, dict):
        raise ValueError("host must be a table of mirrors")
    for url, settings in table.items():
        if not isinstance(settings, dict):
            raise ValueError(f"mirror {url!r} must be a table")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"mirror {url!r} must start with http:// or https://")
        caps = settings.get("capabilities", ["pull", "resolve"])
        if "pull" not in caps:
            continue
        creds = None
        if settings.get("username"):
            creds = Credentials(
                username=str(settings["username"]), password=str(settings.get("password", ""))
            )
        mirrors.append(
            Endpoint(
                url=url.rstrip("/"),
                skip_verify=bool(settings.get("skip_verify", False)),
                ca=str(settings.get("ca", "")),
                credentials=creds,
                mirror=True,
                can_resolve="resolve" in caps,
            )
        )
    return HostConfig(
        mirrors=tuple(mirrors),
        server=str(data.get("server", "")).rstrip("/"),
        skip_upstream=bool(data.get("skip_upstream", False)),
        skip_verify=bool(data.get("skip_verify", False)),
        ca=str(data.get("ca", "")),
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
