"""A client for OCI distribution registries (HTTP API v2), pull side only.

Anonymous, basic and bearer-token auth (the WWW-Authenticate challenge flow),
the CRI's AuthConfig (username/password, identity token, registry token), all
four manifest media types, and blobs streamed to a file while their digest is
checked. Plain HTTP only for registries marked insecure (loopback by default).

A registry is untrusted: whatever it answers (a broken status line, a 70 KiB
header, a redirect to ftp://, a token with a line break) becomes a ShimError
that names it, UNAVAILABLE for a broken transport and FAILED_PRECONDITION for
content or redirects pyshim will not use; so a mirror that misbehaves hands
over to the next endpoint like one that is down.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import logging
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.message import Message
from types import TracebackType
from typing import IO

from shim import metrics
from shim.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, Unauthenticated, Unavailable
from shim.images import manifest as parse
from shim.images.manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST

log = logging.getLogger(__name__)

# The registry answers 404 unless Accept lists the manifest's type: always send all four.
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
MAX_MANIFEST = 4 * 1024 * 1024
TIMEOUT = 60.0
# What the standard library raises for an answer it cannot follow: OSError (and
# URLError) for the network, HTTPException for a broken status line or header
# (LineTooLong, BadStatusLine, IncompleteRead), ValueError for a URL or header it
# refuses (the idna codec's UnicodeError for a 64-character label, CR LF in a header).
_TRANSPORT = (OSError, http.client.HTTPException, ValueError)
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def check(self) -> None:
        """A registry token goes into a header as it is: refuse one that could not."""
        if self.registry_token and not parse.HEADER_TOKEN.fullmatch(self.registry_token):
            raise InvalidArgument("auth.registry_token is not a token an HTTP header can carry")


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


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port): what a redirect must keep to keep the credentials.
    ValueError for a port that is not one."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.hostname or "", parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects (blobs are often served from object storage), but only to
    http and https URLs, and never carry the registry's Authorization to another
    origin."""

    def __init__(self, registry: str) -> None:
        super().__init__()
        self.registry = registry

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        try:
            target = origin(newurl)
        except ValueError:
            target = ("", "", 0)
        if target[0] not in _DEFAULT_PORTS or not target[1]:
            fp.close()
            raise FailedPrecondition(
                f"{self.registry} redirected to {newurl[:200]!r}: only http and https redirects are followed"
            )
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and target != origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _opener(registry: str, tls: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    # Built by hand rather than with build_opener, which adds ftp:, file: and data:
    # handlers: nothing but HTTP(S) can be reached, whatever a registry answers.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(context=tls),
        urllib.request.HTTPDefaultErrorHandler(),
        _Redirects(registry),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


class Body:
    """A response body that reports a broken read as the registry's failure."""

    def __init__(self, response: IO[bytes], headers: Message, client: RegistryClient) -> None:
        self._response = response
        self.headers = headers
        self._client = client

    def read(self, size: int = -1, /) -> bytes:
        try:
            data = self._response.read(size)
        except _TRANSPORT as err:
            raise self._client.broken(err) from None
        metrics.IMAGE_PULL_BYTES.inc(len(data))
        return data

    def __enter__(self) -> Body:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._response.close()


class RegistryClient:
    def __init__(
        self, base_url: str, repository: str, credentials: Credentials, tls: ssl.SSLContext | None = None
    ) -> None:
        self.host = urllib.parse.urlsplit(base_url).netloc
        self.name = f"registry {self.host}"  # for messages: every error names the registry
        self.repository = repository
        self.credentials = credentials
        self.base = f"{base_url}/v2/{repository}"
        self._opener = _opener(self.name, tls)
        self._authorization: str | None = None
        if credentials.registry_token:
            self._authorization = f"Bearer {credentials.registry_token}"

    # ---- requests ---------------------------------------------------------------------

    def broken(self, err: Exception) -> Unavailable:
        if isinstance(err, urllib.error.URLError):
            return Unavailable(f"{self.name} unreachable: {err.reason}")
        if isinstance(err, OSError):
            return Unavailable(f"{self.name} unreachable: {err}")
        return Unavailable(
            f"{self.name} gave an answer HTTP cannot follow ({type(err).__name__}: {str(err)[:200]!r})"
        )

    def _open(self, url: str, headers: dict[str, str]) -> Body:
        for attempt in range(2):
            request = urllib.request.Request(url, headers=headers)
            if self._authorization:
                request.add_header("Authorization", self._authorization)
            try:
                response = self._opener.open(request, timeout=TIMEOUT)
                return Body(response, response.headers, self)
            except urllib.error.HTTPError as err:
                with Body(err, err.headers, self) as body:
                    if err.code == 401 and attempt == 0:
                        self._authorization = self._answer_challenge(err.headers.get("WWW-Authenticate", ""))
                        continue
                    text = body.read(4096).decode(errors="replace")
                raise self._http_error(err.code, url, text) from None
            except _TRANSPORT as err:
                raise self.broken(err) from None
        raise Unauthenticated(f"{self.name} refused the credentials for {self.repository}")

    def _http_error(self, code: int, url: str, body: str) -> Exception:
        if code in (401, 403):
            return Unauthenticated(f"{self.name} denied access to {self.repository} ({code})")
        if code == 404:
            return NotFound(f"{url.split('/v2/', 1)[1]} not found on {self.host}")
        return Unavailable(f"{self.name} answered {code} for {url}: {body[:200]!r}")

    def _answer_challenge(self, challenge: str) -> str:
        scheme, _, params = challenge.partition(" ")
        c = self.credentials
        if scheme.lower() == "basic":
            if not c.username:
                raise Unauthenticated(f"{self.name} wants a username and password")
            return "Basic " + base64.b64encode(f"{c.username}:{c.password}".encode()).decode()
        if scheme.lower() != "bearer":
            raise Unauthenticated(f"{self.name}: unsupported auth challenge {challenge[:80]!r}")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.get("realm")
        if not realm:
            raise Unauthenticated(f"{self.name}: bearer challenge without a realm")
        try:
            realm_url = urllib.parse.urlsplit(realm)
        except ValueError:  # an unclosed [IPv6 literal
            realm_url = urllib.parse.urlsplit("")
        if realm_url.scheme not in ("http", "https") or not realm_url.netloc:
            raise Unauthenticated(f"{self.name}: token realm {realm[:100]!r} is not an http(s) URL")
        sends_secret = bool(c.identity_token or c.username)
        if (
            sends_secret
            and realm_url.scheme == "http"
            and not (self.base.startswith("http://") or is_loopback(realm_url.netloc))
        ):
            raise Unauthenticated(f"{self.name}: refusing to send credentials to {realm!r} over plain HTTP")
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
        server = f"{self.name}'s token server {realm[:100]!r}"
        try:
            # Through our opener: the endpoint's TLS settings, no credentials across redirects.
            with self._opener.open(token_request, timeout=TIMEOUT) as response:
                answer = response.read(MAX_MANIFEST)
        except urllib.error.HTTPError as err:
            err.close()
            raise Unauthenticated(f"{server} refused ({err.code})") from None
        except _TRANSPORT as err:
            raise Unavailable(f"{server}: {getattr(err, 'reason', err)}") from None
        return f"Bearer {parse.token(answer, server)}"

    # ---- content ----------------------------------------------------------------------

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest by tag or digest."""
        with self._open(f"{self.base}/manifests/{reference}", {"Accept": ACCEPT}) as response:
            body = response.read(MAX_MANIFEST + 1)
            content_type = (response.headers.get("Content-Type") or "").split(";")[0].strip()
        if len(body) > MAX_MANIFEST:
            raise DataLoss(f"manifest {reference} on {self.host} is larger than {MAX_MANIFEST} bytes")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise DataLoss(f"manifest {reference} on {self.host} has digest {digest}")
        return body, parse.media_type(body, content_type, self.name), digest

    def open_blob(self, digest: str) -> Body:
        """The blob's body, to be read as a stream (the store checks the digest)."""
        return self._open(f"{self.base}/blobs/{digest}", {})
