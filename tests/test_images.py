"""The CRI ImageService against a real registry (Debian's docker-registry on
127.0.0.1, storage in the test's temp dir), with images built and pushed here."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from badregistry import BadRegistry
from conftest import Daemon
from containertools import static_busybox
from imagetools import (
    Registry,
    daemon_with_hosts,
    free_port,
    layer_tar,
    oci_layout,
    push,
    pushed_digest,
    start_registry,
)

from shim._proto import api_pb2

pytestmark = pytest.mark.root

# bcrypt of "s3cret-pw", made once for these tests.
HTPASSWD = "tester:$2b$12$ZcRr/DeQ2L668PAeoZyv1emAKTtv48cD0CGYYaWFHoB64E1wb9sT6\n"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = start_registry(tmp_path / "registry")
    yield reg
    reg.stop()


@pytest.fixture
def image(tmp_path: Path, registry: Registry) -> dict[str, str]:
    layout = tmp_path / "layout"
    digests = oci_layout(
        layout,
        "1.0",
        [layer_tar({"bin/": None, "bin/hello": b"#!/bin/sh\necho hi\n"}), layer_tar({"etc/motd": b"hi\n"})],
    )
    push(layout, "1.0", registry, "library/test")
    digests["manifest"] = pushed_digest(registry, "library/test", "1.0")
    return {**digests, "ref": f"{registry.host}/library/test:1.0"}


def pull(daemon: Daemon, ref: str, auth: api_pb2.AuthConfig | None = None) -> str:
    request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref), auth=auth)
    return str(daemon.images.PullImage(request, timeout=60).image_ref)


def image_status(daemon: Daemon, ref: str, verbose: bool = False) -> api_pb2.ImageStatusResponse:
    request = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref), verbose=verbose)
    return daemon.images.ImageStatus(request, timeout=10)


def listed(daemon: Daemon) -> list[api_pb2.Image]:
    return list(daemon.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images)


def blobs(daemon: Daemon) -> set[str]:
    return {p.name for p in (daemon.root / "images" / "blobs" / "sha256").iterdir()}


def corrupt_layers(registry: Registry, newest_only: bool = False) -> None:
    """Flip one byte (same size) in the registry's stored layers (gzip, as skopeo pushes them)."""
    layers = sorted(
        (p for p in (registry.log.parent / "storage").rglob("data") if p.read_bytes()[:2] == b"\x1f\x8b"),
        key=lambda p: p.stat().st_mtime,
    )
    assert layers
    for path in layers[-1:] if newest_only else layers:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def test_pull_by_tag_list_status_remove(daemon: Daemon, image: dict[str, str]) -> None:
    image_id = pull(daemon, image["ref"])
    assert image_id == image["config"]
    (item,) = listed(daemon)
    assert list(item.repo_tags) == [image["ref"]]
    assert list(item.repo_digests) == [image["ref"].rsplit(":", 1)[0] + "@" + image["manifest"]]
    assert item.size > 0 and item.uid.value == 1000
    status = image_status(daemon, image["ref"], verbose=True)
    assert status.image.id == image_id
    info = json.loads(status.info["info"])
    assert info["config"]["config"]["Cmd"] == ["/bin/sh"] and len(info["manifest"]["layers"]) == 2
    assert image_status(daemon, image_id).image.id == image_id  # by id too
    assert image_status(daemon, image_id.removeprefix("sha256:")[:12]).image.id == image_id
    assert len(blobs(daemon)) == 4  # manifest, config, two layers
    fs = daemon.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10).image_filesystems[0]
    assert fs.used_bytes.value > 0
    # Pulling again changes nothing and downloads nothing.
    assert pull(daemon, image["ref"]) == image_id and len(listed(daemon)) == 1
    daemon.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image_id)), timeout=10)
    assert listed(daemon) == [] and blobs(daemon) == set()
    assert not image_status(daemon, image["ref"]).HasField("image")
    daemon.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image_id)), timeout=10)


def test_pull_by_digest_and_survives_restart(daemon: Daemon, image: dict[str, str]) -> None:
    by_digest = image["ref"].rsplit(":", 1)[0] + "@" + image["manifest"]
    assert pull(daemon, by_digest) == image["config"]
    daemon.restart()
    assert image_status(daemon, by_digest).image.id == image["config"]


def test_manifest_list_resolves_to_this_platform(daemon: Daemon, registry: Registry, tmp_path: Path) -> None:
    layout = tmp_path / "multi"
    digests = oci_layout(layout, "multi", [layer_tar({"a": b"a"})], arches=("arm64", "amd64"))
    push(layout, "multi", registry, "team/multi")
    ref = f"{registry.host}/team/multi:multi"
    assert pull(daemon, ref) == digests["config"]
    (item,) = listed(daemon)
    index = pushed_digest(registry, "team/multi", "multi")
    assert list(item.repo_digests) == [f"{registry.host}/team/multi@{index}"]


def test_pull_errors_are_clear_and_leave_nothing(
    daemon: Daemon, registry: Registry, image: dict[str, str]
) -> None:
    cases = [
        (f"{registry.host}/library/nope:1", grpc.StatusCode.NOT_FOUND),
        (f"127.0.0.1:{free_port()}/library/test:1.0", grpc.StatusCode.UNAVAILABLE),
        ("Bad Ref!", grpc.StatusCode.INVALID_ARGUMENT),
        (f"{registry.host}/library/test@sha256:{'0' * 64}", grpc.StatusCode.NOT_FOUND),
    ]
    for ref, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            pull(daemon, ref)
        assert err.value.code() == code, (ref, err.value.details())
    assert listed(daemon) == [] and blobs(daemon) == set()


def test_corrupted_blob_is_rejected(daemon: Daemon, registry: Registry, image: dict[str, str]) -> None:
    corrupt_layers(registry)
    with pytest.raises(grpc.RpcError) as err:
        pull(daemon, image["ref"])
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "does not match its digest" in (err.value.details() or "")
    assert listed(daemon) == []
    assert list((daemon.root / "images" / "tmp").iterdir()) == []


def test_concurrent_pulls_share_the_work(daemon: Daemon) -> None:
    # Each blob takes a while to serve, so that all six pulls are in flight together.
    with BadRegistry(blob_delay=0.3) as registry:
        results: list[str] = []
        threads = [
            threading.Thread(target=lambda: results.append(pull(daemon, registry.ref))) for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [registry.image.config_digest] * 6
        assert registry.blob_gets() == dict.fromkeys(registry.image.blobs, 1)  # one download each
    assert len(listed(daemon)) == 1 and len(blobs(daemon)) == 4


def test_registry_with_password(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "htpasswd").write_text(HTPASSWD)
    reg = start_registry(
        tmp_path / "authreg", f"auth:\n  htpasswd:\n    realm: test\n    path: {tmp_path / 'htpasswd'}\n"
    )
    try:
        layout = tmp_path / "private"
        digests = oci_layout(layout, "v1", [layer_tar({"secret": b"x"})])
        push(layout, "v1", reg, "private/app", creds="tester:s3cret-pw")
        ref = f"{reg.host}/private/app:v1"
        with pytest.raises(grpc.RpcError) as err:
            pull(daemon, ref)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            pull(daemon, ref, api_pb2.AuthConfig(username="tester", password="wrong"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (
            pull(daemon, ref, api_pb2.AuthConfig(username="tester", password="s3cret-pw"))
            == digests["config"]
        )
    finally:
        reg.stop()


def test_tags_move_and_untag(daemon: Daemon, registry: Registry, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    a = oci_layout(first, "v", [layer_tar({"a": b"1"})])
    b = oci_layout(second, "v", [layer_tar({"a": b"2"})])
    push(first, "v", registry, "library/moving")
    ref = f"{registry.host}/library/moving:v"
    pull(daemon, ref)
    push(second, "v", registry, "library/moving")
    pull(daemon, ref)
    by_id = {i.id: list(i.repo_tags) for i in listed(daemon)}
    assert by_id == {a["config"]: [], b["config"]: [ref]}


def test_pull_through_a_mirror_keeps_the_original_name(
    daemon_factory: type[Daemon], registry: Registry, image: dict[str, str], tmp_path: Path
) -> None:
    # A dead mirror first, the live one second; never the upstream (it does not exist).
    hosts = (
        f'skip_upstream = true\n[host."http://127.0.0.1:{free_port()}"]\n[host."http://{registry.host}"]\n'
    )
    d = daemon_with_hosts(daemon_factory, "registry.example.internal", hosts)
    ref = "registry.example.internal/library/test:1.0"
    assert pull(d, ref) == image["config"]
    (item,) = listed(d)
    assert list(item.repo_tags) == [ref]
    assert image_status(d, ref).image.id == image["config"]
    assert "mirror_skipped" in d.log.read_text()


def test_import_oci_layout_and_docker_save_archives(daemon: Daemon, tmp_path: Path) -> None:
    import subprocess
    import sys
    import tarfile

    layout = tmp_path / "oci"
    digests = oci_layout(layout, "3.10", [layer_tar({"pause": b"#!/bin/true\n"})])
    oci_tar = tmp_path / "pause-oci.tar"
    with tarfile.open(oci_tar, "w") as tar:
        tar.add(layout, arcname=".")
    docker_tar = tmp_path / "app-docker.tar"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            f"oci:{layout}:3.10",
            f"docker-archive:{docker_tar}:example.com/team/app:v2",
        ],
        check=True,
    )
    cli = [sys.executable, "-m", "shim", "images", "import", "--root", str(daemon.root)]
    out = subprocess.run(
        [*cli, str(oci_tar), "--name", "registry.k8s.io/pause:3.10"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [digests["config"], "registry.k8s.io/pause:3.10"]
    out = subprocess.run([*cli, str(docker_tar)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # The running daemon serves both as if pulled.
    assert image_status(daemon, "registry.k8s.io/pause:3.10").image.id == digests["config"]
    assert image_status(daemon, "example.com/team/app:v2").image.id == digests["config"]
    (item,) = listed(daemon)
    assert sorted(item.repo_tags) == ["example.com/team/app:v2", "registry.k8s.io/pause:3.10"]
    bad = subprocess.run([*cli, str(tmp_path / "missing.tar")], capture_output=True, text=True)
    assert bad.returncode == 1 and "import failed" in bad.stderr


def test_registry_with_token_auth(daemon: Daemon, tmp_path: Path) -> None:
    from tokenserver import TokenServer

    tokens = TokenServer(tmp_path / "tokens", "tester", "s3cret-pw")
    reg = start_registry(tmp_path / "tokenreg", tokens.registry_config())
    try:
        layout = tmp_path / "tok"
        digests = oci_layout(layout, "v1", [layer_tar({"t": b"token"})])
        push(layout, "v1", reg, "private/tok", creds="tester:s3cret-pw")
        ref = f"{reg.host}/private/tok:v1"
        with pytest.raises(grpc.RpcError) as err:
            pull(daemon, ref)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        issued = tokens.issued
        assert (
            pull(daemon, ref, api_pb2.AuthConfig(username="tester", password="s3cret-pw"))
            == digests["config"]
        )
        assert tokens.issued > issued  # the challenge flow went through the token server
        # The same credentials as the CRI's base64 `auth` field.
        daemon.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=10)
        auth = base64.b64encode(b"tester:s3cret-pw").decode()
        assert pull(daemon, ref, api_pb2.AuthConfig(auth=auth)) == digests["config"]
    finally:
        reg.stop()
        tokens.stop()


def test_pulled_busybox_image_becomes_a_working_rootfs(
    daemon: Daemon, registry: Registry, tmp_path: Path
) -> None:
    import os
    import subprocess

    from shim.images.layers import LayerStore
    from shim.images.store import ImageStore

    busybox = static_busybox().read_bytes()
    base = layer_tar({"bin/": None, "etc/": None, "etc/old": b"old\n", "opt/": None, "opt/a": b"a\n"})
    base_bin = layer_tar({"bin/busybox": busybox}, mode=0o755)
    top = layer_tar({"etc/.wh.old": b"", "opt/.wh..wh..opq": b"", "opt/b": b"b\n"})
    layout = tmp_path / "bb"
    digests = oci_layout(layout, "bb", [base, base_bin, top], config={"Cmd": ["/bin/busybox", "sh"]})
    push(layout, "bb", registry, "library/busybox")
    image_id = pull(daemon, f"{registry.host}/library/busybox:bb")
    assert image_id == digests["config"]
    store = ImageStore(daemon.root / "images")
    layers = LayerStore(store, daemon.root / "images" / "layers", tmp_path / "rootfs")
    record = store.get(image_id)
    assert record is not None and record.config.cmd == ("/bin/busybox", "sh")
    rootfs = layers.prepare("c-busybox", record)
    try:
        run = subprocess.run(
            ["chroot", str(rootfs), "/bin/busybox", "sh", "-c", "ls /etc /opt; echo made > /made"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert run.stdout.split() == ["/etc:", "/opt:", "b"]  # /etc/old whited out; /opt opaque: only b
        assert (rootfs / "made").read_text() == "made\n"
        assert os.access(rootfs / "bin/busybox", os.X_OK)
    finally:
        layers.release("c-busybox")
    assert not (tmp_path / "rootfs" / "c-busybox").exists()


def test_pull_only_mirror_is_not_asked_for_tags_and_gets_no_pull_secret(
    daemon_factory: type[Daemon], registry: Registry, image: dict[str, str]
) -> None:
    hosts = f'skip_upstream = true\n[host."http://{registry.host}"]\n  capabilities = ["pull"]\n'
    d = daemon_with_hosts(daemon_factory, "registry.example.internal", hosts)
    with pytest.raises(grpc.RpcError) as err:  # a tag needs "resolve": no endpoint left
        pull(d, "registry.example.internal/library/test:1.0")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    by_digest = f"registry.example.internal/library/test@{image['manifest']}"
    # By digest, the pull-only mirror serves; the request's secret is not sent to it.
    secret = api_pb2.AuthConfig(username="upstream-user", password="upstream-secret")
    assert pull(d, by_digest, secret) == image["config"]


def test_failed_pull_leaves_no_blobs(daemon: Daemon, registry: Registry, tmp_path: Path) -> None:
    layout = tmp_path / "half"
    oci_layout(layout, "h", [layer_tar({"ok": b"fine"}), layer_tar({"bad": b"will be corrupted"})])
    push(layout, "h", registry, "library/half")
    corrupt_layers(registry, newest_only=True)  # the second layer: the first lands, then the pull fails
    with pytest.raises(grpc.RpcError):
        pull(daemon, f"{registry.host}/library/half:h")
    assert blobs(daemon) == set() and listed(daemon) == []


def test_a_mirror_failing_midway_hands_over_to_the_upstream(
    daemon_factory: type[Daemon], registry: Registry, image: dict[str, str], tmp_path: Path
) -> None:
    mirror = start_registry(tmp_path / "mirror")
    try:
        layout = tmp_path / "layout-m"
        oci_layout(
            layout,
            "1.0",
            [
                layer_tar({"bin/": None, "bin/hello": b"#!/bin/sh\necho hi\n"}),
                layer_tar({"etc/motd": b"hi\n"}),
            ],
        )
        push(layout, "1.0", mirror, "library/test")
        corrupt_layers(mirror)  # the mirror's layers go bad
        d = daemon_with_hosts(daemon_factory, registry.host, f'[host."http://{mirror.host}"]\n')
        assert pull(d, image["ref"]) == image["config"]
        assert "mirror_skipped" in d.log.read_text()
        assert len(blobs(d)) == 4
    finally:
        mirror.stop()
