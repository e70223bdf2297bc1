"""Test images and a real registry: Debian's docker-registry on 127.0.0.1 with
its storage in the test's temp dir, images built here as OCI layouts and pushed
with skopeo."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import tarfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from conftest import Daemon

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def start_registry(base: Path, extra_config: str = "") -> Registry:
    port = free_port()
    base.mkdir(parents=True, exist_ok=True)
    config = base / "config.yml"
    config.write_text(
        f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {base / "storage"}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
{extra_config}"""
    )
    log = base / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=out, stderr=out)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
            break
        except urllib.error.HTTPError:
            break  # 401: up, with auth
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"registry did not start: {log.read_text()}") from None
            time.sleep(0.05)
    return Registry(proc, port, log)


def layer_tar(files: dict[str, bytes | None], mode: int = 0o644) -> bytes:
    """An uncompressed layer: path -> content (None makes a directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content in files.items():
            info = tarfile.TarInfo(path)
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), mode
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _put(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def oci_layout(
    layout: Path,
    tag: str,
    layers: list[bytes],
    config: dict[str, object] | None = None,
    arches: tuple[str, ...] = (),
) -> dict[str, str]:
    """An OCI image layout with one image (or, with `arches`, an index of one per
    architecture). Returns {"manifest": digest, "config": digest, "index": digest?}."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    out: dict[str, str] = {}

    def one(arch: str) -> dict[str, object]:
        cfg = {
            "architecture": arch,
            "os": "linux",
            "config": config or {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "User": "1000"},
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(lay).hexdigest() for lay in layers],
            },
        }
        cfg_desc = {"mediaType": OCI_CONFIG, **_put(layout, json.dumps(cfg).encode())}
        layer_descs = [{"mediaType": OCI_LAYER, **_put(layout, lay)} for lay in layers]
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg_desc, "layers": layer_descs}
        desc = {"mediaType": OCI_MANIFEST, **_put(layout, json.dumps(manifest).encode())}
        if arch == "amd64":
            out["manifest"], out["config"] = str(desc["digest"]), str(cfg_desc["digest"])
        return {**desc, "platform": {"architecture": arch, "os": "linux"}}

    if arches:
        manifests = [one(a) for a in arches]
        index_body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
        top = {"mediaType": OCI_INDEX, **_put(layout, index_body)}
        out["index"] = str(top["digest"])
    else:
        top = one("amd64")
        top.pop("platform")
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return out


def push(layout: Path, tag: str, registry: Registry, repository: str, creds: str = "") -> None:
    argv = ["skopeo", "copy", "--all", "--dest-tls-verify=false", "--quiet"]
    if creds:
        argv += ["--dest-creds", creds]
    subprocess.run([*argv, f"oci:{layout}:{tag}", f"docker://{registry.host}/{repository}:{tag}"], check=True)


def pushed_digest(registry: Registry, repository: str, tag: str) -> str:
    """The manifest digest the registry serves for a tag (skopeo may re-serialise)."""
    accept = (
        f"{OCI_INDEX}, {OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json, "
        "application/vnd.docker.distribution.manifest.list.v2+json"
    )
    request = urllib.request.Request(
        f"http://{registry.host}/v2/{repository}/manifests/{tag}", method="HEAD", headers={"Accept": accept}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.headers["Docker-Content-Digest"])


def daemon_with_hosts(daemon_factory: type[Daemon], host: str, hosts_toml: str) -> Daemon:
    """A daemon whose registry config has a hosts.toml for `host`."""
    d = daemon_factory(start=False)  # type: ignore[call-arg]
    host_dir = d.base / "certs.d" / host
    host_dir.mkdir(parents=True)
    (host_dir / "hosts.toml").write_text(hosts_toml)
    return d.start()
