"""A client for OCI distribution registries (HTTP API v2), pull side only.

Anonymous, basic and bearer-token auth (the WWW-Authenticate challenge flow),
the CRI's AuthConfig (username/password, identity token, registry token), all
four manifest media types, and blobs streamed to a file while their digest is
checked. Plain HTTP only for registries marked insecure (loopback by default).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import logging
import platform
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from shim.errors import DataLoss, NotFound, Unauthenticated, Unavailable
from shim.images.reference import DIGEST

log = logging.getLogger(__name__)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
# The registry answers 404 unless Accept lists the manifest's type: always send all four.
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
LISTS = (OCI_INDEX, DOCKER_LIST)
MAX_MANIFEST = 4 * 1024 * 1024
CHUNK = 1024 * 1024
TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""


def is_loopback(host: str) -> bool:
    name = (
        host.rsplit(":", 1)[0].strip("[]") if not host.startswith("[") or "]:" in host else host.strip("[]")
    )
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _NoAuthAcrossHosts(urllib.request.HTTPRedirectHandler):
    """Follow redirects (blob storage), but never carry credentials to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if (
            new is not None
            and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc
        ):
            new.remove_header("Authorization")
        return new


class RegistryClient:
    def __init__(
        self, base_url: str, repository: str, credentials: Credentials, tls: ssl.SSLContext | None = None
    ) -> None:
        self.host = urllib.parse.urlsplit(base_url).netloc
        self.repository = repository
        self.credentials = credentials
        self.base = f"{base_url}/v2/{repository}"
        self._opener = urllib.request.build_opener(
            _NoAuthAcrossHosts, urllib.request.HTTPSHandler(context=tls)
        )
        self._authorization: str | None = None
        if credentials.registry_token:
            self._authorization = f"Bearer {credentials.registry_token}"

    # ---- requests ---------------------------------------------------------------------

    def _open(self, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        for attempt in range(2):
            request = urllib.request.Request(url, headers=headers)
            if self._authorization:
                request.add_header("Authorization", self._authorization)
            try:
                response: http.client.HTTPResponse = self._opener.open(request, timeout=TIMEOUT)
                return response
            except urllib.error.HTTPError as err:
                if err.code == 401 and attempt == 0:
                    self._authorization = self._answer_challenge(err.headers.get("WWW-Authenticate", ""))
                    err.close()
                    continue
                body = err.read(4096).decode(errors="replace")
                err.close()
                raise self._http_error(err.code, url, body) from None
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                raise Unavailable(f"registry {self.host} unreachable: {reason}") from None
        raise Unauthenticated(f"registry {self.host} refused the credentials for {self.repository}")

    def _http_error(self, code: int, url: str, body: str) -> Exception:
        if code in (401, 403):
            return Unauthenticated(f"registry {self.host} denied access to {self.repository} ({code})")
        if code == 404:
            return NotFound(f"{url.split('/v2/', 1)[1]} not found on {self.host}")
        return Unavailable(f"registry {self.host} answered {code} for {url}: {body[:200]}")

    def _answer_challenge(self, challenge: str) -> str:
        scheme, _, params = challenge.partition(" ")
        c = self.credentials
        if scheme.lower() == "basic":
            if not c.username:
                raise Unauthenticated(f"registry {self.host} wants a username and password")
            return "Basic " + base64.b64encode(f"{c.username}:{c.password}".encode()).decode()
        if scheme.lower() != "bearer":
            raise Unauthenticated(f"registry {self.host}: unsupported auth challenge {challenge[:80]!r}")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.get("realm")
        if not realm:
            raise Unauthenticated(f"registry {self.host}: bearer challenge without a realm")
        realm_url = urllib.parse.urlsplit(realm)
        if realm_url.scheme not in ("http", "https") or not realm_url.netloc:
            raise Unauthenticated(f"registry {self.host}: token realm {realm[:100]!r} is not an http(s) URL")
        sends_secret = bool(c.identity_token or c.username)
        if (
            sends_secret
            and realm_url.scheme == "http"
            and not (self.base.startswith("http://") or is_loopback(realm_url.netloc))
        ):
            raise Unauthenticated(
                f"registry {self.host}: refusing to send credentials to {realm} over plain HTTP"
            )
        query = {
            "service": fields.get("service", ""),
            "scope": fields.get("scope") or f"repository:{self.repository}:pull",
        }
        token_request = urllib.request.Request(f"{realm}?{urllib.parse.urlencode(query)}")
        if c.identity_token:
            # An identity token is an OAuth2 refresh token.
            form = {
                **query,
                "grant_type": "refresh_token",
                "refresh_token": c.identity_token,
                "client_id": "pyshim",
            }
            token_request = urllib.request.Request(realm, data=urllib.parse.urlencode(form).encode())
        elif c.username:
            basic = base64.b64encode(f"{c.username}:{c.password}".encode()).decode()
            token_request.add_header("Authorization", f"Basic {basic}")
        try:
            # Through our opener: the endpoint's TLS settings, no credentials across redirects.
            with self._opener.open(token_request, timeout=TIMEOUT) as response:
                answer = json.loads(response.read(MAX_MANIFEST))
        except urllib.error.HTTPError as err:
            raise Unauthenticated(f"token server {realm} refused ({err.code})") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise Unavailable(f"token server {realm}: {err}") from None
        token = answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
        if not token:
            raise Unauthenticated(f"token server {realm} gave no token")
        return f"Bearer {token}"

    # ---- content ----------------------------------------------------------------------

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest by tag or digest."""
        with self._open(f"{self.base}/manifests/{reference}", {"Accept": ACCEPT}) as response:
            body = response.read(MAX_MANIFEST + 1)
            media_type = (response.headers.get("Content-Type") or "").split(";")[0].strip()
        if len(body) > MAX_MANIFEST:
            raise DataLoss(f"manifest {reference} on {self.host} is larger than {MAX_MANIFEST} bytes")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise DataLoss(f"manifest {reference} on {self.host} has digest {digest}")
        if not media_type or media_type == "application/json":
            media_type = json.loads(body).get("mediaType", "")
        return body, media_type, digest

    def open_blob(self, digest: str) -> http.client.HTTPResponse:
        """The blob's body, to be read as a stream (the store checks the digest)."""
        return self._open(f"{self.base}/blobs/{digest}", {})


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


def choose_platform(index: dict[str, Any]) -> str:
    """The digest of the index entry for this node's platform (a matching variant
    first, then any entry of the architecture)."""
    arch, variant = node_platform()
    candidates = [
        e
        for e in index.get("manifests", [])
        if isinstance(e, dict)
        and isinstance(e.get("platform"), dict)
        and e["platform"].get("os") == "linux"
        and e["platform"].get("architecture") == arch
    ]
    candidates.sort(key=lambda e: e["platform"].get("variant", "") != variant)
    for entry in candidates:
        digest = str(entry.get("digest", ""))
        if DIGEST.match(digest):
            return digest
    raise NotFound(f"no linux/{arch} image in the index")
