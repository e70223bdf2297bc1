"""shim.images.importer: an archive's JSON is checked like a registry's answer;
a broken archive is a ShimError naming it, never a KeyError or TypeError."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from shim.errors import ShimError
from shim.images.importer import import_file
from shim.images.store import ImageStore

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as out:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            out.addfile(info, io.BytesIO(content))
    return path


def blob(data: bytes) -> tuple[str, str, bytes]:
    d = digest(data)
    return d, f"blobs/sha256/{d.removeprefix('sha256:')}", data


def oci_files(
    config: object = None, manifest_edit: object = None, index_edit: object = None
) -> dict[str, bytes]:
    """An OCI layout with one image; the edits replace whole JSON documents."""
    layer = b"layer-bytes"
    cfg = json.dumps({"config": config if config is not None else {"Cmd": ["/x"]}}).encode()
    layer_d, layer_name, _ = blob(layer)
    cfg_d, cfg_name, _ = blob(cfg)
    manifest = json.dumps(
        manifest_edit
        if manifest_edit is not None
        else {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"digest": cfg_d, "size": len(cfg)},
            "layers": [{"digest": layer_d, "size": len(layer)}],
        }
    ).encode()
    man_d, man_name, _ = blob(manifest)
    index = (
        index_edit
        if index_edit is not None
        else {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": man_d,
                    "size": len(manifest),
                    "annotations": {"io.containerd.image.name": "r.example/app:1"},
                }
            ],
        }
    )
    return {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": json.dumps(index).encode(),
        man_name: manifest,
        cfg_name: cfg,
        layer_name: layer,
    }


def docker_files(manifest: object) -> dict[str, bytes]:
    return {
        "manifest.json": json.dumps(manifest).encode(),
        "c.json": json.dumps({"config": {"Env": ["A=1"]}}).encode(),
        "l/layer.tar": b"layer",
    }


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images", owner=False)


def test_good_archives_import(tmp_path: Path, store: ImageStore) -> None:
    (oci,) = import_file(store, tar(tmp_path / "oci.tar", oci_files()))
    assert oci.repo_tags == ("r.example/app:1",) and oci.config.cmd == ("/x",)
    good = [{"Config": "c.json", "Layers": ["l/layer.tar"], "RepoTags": ["r.example/d:2"]}]
    (docker,) = import_file(store, tar(tmp_path / "docker.tar", docker_files(good)))
    assert docker.repo_tags == ("r.example/d:2",) and docker.config.env == ("A=1",)


@pytest.mark.parametrize(
    ("files", "words"),
    [
        (oci_files(index_edit={"manifests": 5}), "the index's manifests are 5"),
        (oci_files(index_edit=[1, 2]), "index is not a JSON object"),
        (oci_files(index_edit={"manifests": [{"digest": 5}]}), "index entry 0 has a malformed digest 5"),
        (
            oci_files(index_edit={"manifests": [{"digest": "sha256:" + "0" * 64, "annotations": 5}]}),
            "annotations",
        ),
        (oci_files(index_edit={"manifests": [{"digest": "sha512:" + "0" * 128}]}), "only sha256"),
        (oci_files(index_edit={"manifests": [{"digest": "sha256:" + "0" * 64}]}), "lacks"),
        (oci_files(manifest_edit={"config": 5}), "the manifest's config is 5"),
        (oci_files(manifest_edit={"config": {"digest": "sha256:" + "0" * 64}, "layers": 5}), "layers are 5"),
        (oci_files(config={"Entrypoint": 5}), "Entrypoint is 5"),
        (oci_files(config={"User": 0}), "User is 0"),
        (docker_files({"Config": "c.json"}), "manifest.json is not a list of images"),
        (docker_files([5]), "manifest.json entry 0 is not an object"),
        (docker_files([{"Config": 5, "Layers": []}]), "Config is 5"),
        (docker_files([{"Layers": []}]), "names no Config"),
        (docker_files([{"Config": "c.json", "Layers": 5}]), "Layers is 5"),
        (docker_files([{"Config": "c.json", "Layers": [5]}]), "Layers is [5]"),
        (docker_files([{"Config": "c.json", "Layers": ["l/layer.tar"], "RepoTags": "r/x:1"}]), "RepoTags"),
        (docker_files([{"Config": "missing.json", "Layers": []}]), "lacks 'missing.json'"),
        (docker_files([{"Config": "c.json", "Layers": ["../../etc/passwd"]}]), "lacks"),
        ({"manifest.json": b"{not json"}, "manifest.json is not JSON"),
    ],
)
def test_a_malformed_archive_is_a_clear_error(
    tmp_path: Path, store: ImageStore, files: dict[str, bytes], words: str
) -> None:
    path = tar(tmp_path / "bad.tar", files)
    with pytest.raises(ShimError) as err:
        import_file(store, path)
    assert str(path) in str(err.value) and words in str(err.value), str(err.value)
    assert store.images() == []


def test_a_truncated_compressed_archive_is_a_clear_error(tmp_path: Path, store: ImageStore) -> None:
    whole = gzip.compress((tar(tmp_path / "whole.tar", oci_files())).read_bytes())
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ShimError) as err:
        import_file(store, path)
    assert str(path) in str(err.value)
    assert store.images() == []
