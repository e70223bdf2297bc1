"""A small registry that misbehaves on request, for tests: a stdlib HTTP server on
127.0.0.1, in a thread, serving one image built in memory (the OCI distribution
API's manifest and blob GETs) correctly, or wrongly in the one way a test asks
for. It records every request it answers, so tests can count downloads and see
which headers arrived.

    with BadRegistry(fault="bad_status_line") as reg:
        ... pull f"{reg.host}/library/test:1.0" ...

Faults (each breaks only the answers it names; everything else is served right):
    good                  nothing
    manifest_not_json     the manifest as application/json, body not JSON
    manifest_untyped_list the manifest without Content-Type, body [1,2]
    index_manifests_5     an OCI index whose "manifests" is 5
    config_entrypoint_5   an image whose config says "Entrypoint": 5
    long_header           a 70 KiB header line on the manifest (http.client LineTooLong)
    bad_status_line       the manifest answered with the status line "HTTP/1.1 abc"
    token_crlf            a bearer challenge whose token server hands out a token with CR LF
    realm_not_a_url       a bearer challenge whose realm is "http://[::1/token" (urlsplit raises)
    redirect_ftp          blobs redirected to ftp:// on a port that records connections
    redirect_long_label   blobs redirected to a host with a 64-character DNS label
    redirect_away         blobs redirected to `redirect_to` (another server: another origin)
    redirect_here         blobs redirected to /storage/<digest> on this server (same origin)
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

FAULTS = (
    "good",
    "manifest_not_json",
    "manifest_untyped_list",
    "index_manifests_5",
    "config_entrypoint_5",
    "long_header",
    "bad_status_line",
    "token_crlf",
    "realm_not_a_url",
    "redirect_ftp",
    "redirect_long_label",
    "redirect_away",
    "redirect_here",
)


def _layer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Image:
    """One image: a manifest, its config and two layers, all in memory."""

    manifest: bytes
    blobs: dict[str, bytes]  # digest -> content (config and layers)
    config_digest: str
    repository: str = "library/test"
    tag: str = "1.0"

    @property
    def manifest_digest(self) -> str:
        return _digest(self.manifest)


def build_image(config: dict[str, object] | None = None) -> Image:
    layers = [_layer({"hello": b"hi\n"}), _layer({"etc/motd": b"welcome\n"})]
    cfg = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": config if config is not None else {"Cmd": ["/hello"], "Env": ["PATH=/"]},
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer) for layer in layers]},
        }
    ).encode()
    blobs = {_digest(b): b for b in [cfg, *layers]}
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": _digest(cfg), "size": len(cfg)},
            "layers": [{"mediaType": OCI_LAYER, "digest": _digest(b), "size": len(b)} for b in layers],
        }
    ).encode()
    return Image(manifest=manifest, blobs=blobs, config_digest=_digest(cfg))


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


class _Trap:
    """A TCP port that only counts who connects (the target of a redirect to ftp://)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.sendall(b"220 trap\r\n")  # an FTP greeting: a client that goes on would log in next
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (closing alone does not)
        self.sock.close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


@dataclass
class BadRegistry:
    fault: str = "good"
    auth: tuple[str, str] | None = None  # require Basic auth with these credentials
    redirect_to: str = ""  # for redirect_away: the base URL blobs are sent to
    blob_delay: float = 0.0  # seconds before each blob is served
    image: Image = field(default_factory=build_image)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.fault in FAULTS, self.fault
        if self.fault == "config_entrypoint_5":
            self.image = build_image({"Entrypoint": 5})
        self.trap = _Trap()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ref(self) -> str:
        return f"{self.host}/{self.image.repository}:{self.image.tag}"

    def blob_gets(self) -> dict[str, int]:
        """How many times each blob was asked for."""
        counts: dict[str, int] = {}
        with self._lock:
            for r in self.requests:
                if "/blobs/" in r.path or r.path.startswith("/storage/"):
                    digest = r.path.rsplit("/", 1)[1]
                    counts[digest] = counts.get(digest, 0) + 1
        return counts

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
        self.trap.close()

    def __enter__(self) -> BadRegistry:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with registry._lock:
                    registry.requests.append(Request("GET", self.path, dict(self.headers.items())))
                registry._answer(self)

        return Handler

    # ---- answers ----------------------------------------------------------------------

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        if path == "/token":
            return self._send(
                h, 200, json.dumps({"token": "abc\r\nX-Injected: yes"}).encode(), "application/json"
            )
        if not self._authorized(h):
            return
        image = self.image
        prefix = f"/v2/{image.repository}/"
        if path == "/v2/":
            return self._send(h, 200, b"{}", "application/json")
        if path.startswith("/storage/"):
            return self._blob(h, path.rsplit("/", 1)[1])
        if path.startswith(prefix + "manifests/"):
            return self._manifest(h, path.removeprefix(prefix + "manifests/"))
        if path.startswith(prefix + "blobs/"):
            return self._redirect_or_blob(h, path.removeprefix(prefix + "blobs/"))
        return self._send(h, 404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}', "application/json")

    def _authorized(self, h: BaseHTTPRequestHandler) -> bool:
        if self.fault in ("token_crlf", "realm_not_a_url") and h.headers.get("Authorization", "") == "":
            realm = f"http://{self.host}/token" if self.fault == "token_crlf" else "http://[::1/token"
            challenge = f'Bearer realm="{realm}",service="bad",scope="repository:x:pull"'
            self._send(h, 401, b"{}", "application/json", {"WWW-Authenticate": challenge})
            return False
        if self.auth is not None:
            expected = "Basic " + base64.b64encode(":".join(self.auth).encode()).decode()
            if h.headers.get("Authorization", "") != expected:
                self._send(h, 401, b"{}", "application/json", {"WWW-Authenticate": 'Basic realm="bad"'})
                return False
        return True

    def _manifest(self, h: BaseHTTPRequestHandler, reference: str) -> None:
        image = self.image
        if reference not in (image.tag, image.manifest_digest):
            return self._send(h, 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}', "application/json")
        if self.fault == "manifest_not_json":
            return self._send(h, 200, b"{this is not json", "application/json")
        if self.fault == "manifest_untyped_list":
            return self._send(h, 200, b"[1,2]", None)
        if self.fault == "index_manifests_5":
            body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": 5}).encode()
            return self._send(h, 200, body, OCI_INDEX)
        if self.fault == "long_header":
            return self._send(h, 200, image.manifest, OCI_MANIFEST, {"X-Long": "a" * 70 * 1024})
        if self.fault == "bad_status_line":
            h.wfile.write(b"HTTP/1.1 abc\r\nContent-Length: 0\r\n\r\n")
            h.close_connection = True
            return None
        return self._send(
            h, 200, image.manifest, OCI_MANIFEST, {"Docker-Content-Digest": image.manifest_digest}
        )

    def _redirect_or_blob(self, h: BaseHTTPRequestHandler, digest: str) -> None:
        target = {
            "redirect_ftp": f"ftp://127.0.0.1:{self.trap.port}/x",
            "redirect_long_label": f"http://{'a' * 64}.example/{digest}",
            "redirect_away": f"{self.redirect_to}/storage/{digest}",
            "redirect_here": f"/storage/{digest}",
        }.get(self.fault)
        if target is not None:
            return self._send(h, 302, b"", None, {"Location": target})
        return self._blob(h, digest)

    def _blob(self, h: BaseHTTPRequestHandler, digest: str) -> None:
        blob = self.image.blobs.get(digest)
        if blob is None:
            return self._send(h, 404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}', "application/json")
        if self.blob_delay:
            time.sleep(self.blob_delay)
        return self._send(h, 200, blob, "application/octet-stream")

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler,
        code: int,
        body: bytes,
        content_type: str | None,
        headers: dict[str, str] | None = None,
    ) -> None:
        h.send_response(code)
        if content_type is not None:
            h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(body)
