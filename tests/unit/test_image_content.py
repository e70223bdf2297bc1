"""shim.images.manifest: the type of every value read from a registry's or an
archive's JSON is checked, and a wrong one is FAILED_PRECONDITION naming its
source; plus the small pure parts of the registry client."""

from __future__ import annotations

import json

import pytest

from shim.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from shim.images import manifest as m
from shim.images.registry import Credentials, origin
from shim.images.store import ImageConfig

SRC = "registry r.example:5000"
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def j(value: object) -> bytes:
    return json.dumps(value).encode()


def refused(call: object, *words: str) -> None:
    with pytest.raises(FailedPrecondition) as err:
        call()  # type: ignore[operator]
    message = str(err.value)
    assert message.startswith(f"{SRC}: "), message
    for word in words:
        assert word in message, message


# ---- media types --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"anything", m.OCI_MANIFEST, m.OCI_MANIFEST),  # the header wins
        (j({"mediaType": m.DOCKER_LIST}), "application/json", m.DOCKER_LIST),
        (j({"mediaType": m.DOCKER_MANIFEST}), "", m.DOCKER_MANIFEST),
        (j({"manifests": []}), "", m.OCI_INDEX),
        (j({"config": {}}), "", m.OCI_MANIFEST),
        (j({"fsLayers": []}), "", ""),  # schema 1: refused by the caller
    ],
)
def test_media_type(body: bytes, content_type: str, expected: str) -> None:
    assert m.media_type(body, content_type, SRC) == expected


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{this is not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1,2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),  # deeper than the parser goes
        (j({"mediaType": 5}), "mediaType is 5"),
    ],
)
def test_a_manifest_without_a_type_that_is_not_an_object_is_refused(body: bytes, words: str) -> None:
    refused(lambda: m.media_type(body, "application/json", SRC), words)
    refused(lambda: m.media_type(body, "", SRC), words)


# ---- descriptors, indexes, manifests ----------------------------------------------------


def test_a_good_descriptor() -> None:
    d = m.descriptor(
        {
            "digest": D1,
            "size": 12,
            "mediaType": m.OCI_MANIFEST,
            "platform": {"os": "linux", "architecture": "amd64"},
            "annotations": {"org.opencontainers.image.ref.name": "1.0"},
        },
        "entry",
        SRC,
    )
    assert d.digest == D1 and d.size == 12 and d.platform == m.Platform("linux", "amd64")
    assert d.annotation("org.opencontainers.image.ref.name") == "1.0" and d.annotation("x") == ""
    assert (
        m.descriptor({"digest": "sha512:" + "a" * 128}, "entry", SRC).size is None
    )  # other algorithms parse


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (5, "entry is 5, not a descriptor object"),
        ([D1], "not a descriptor object"),
        ({}, "malformed digest None"),
        ({"digest": 5}, "malformed digest 5"),
        ({"digest": D1 + "\n"}, "malformed digest"),
        ({"digest": "sha256:"}, "malformed digest"),
        ({"digest": "../../etc/passwd"}, "malformed digest"),
        ({"digest": D1, "size": -1}, "size -1 is not a byte count"),
        ({"digest": D1, "size": True}, "size True"),
        ({"digest": D1, "size": "12"}, "size '12'"),
        ({"digest": D1, "size": 1.5}, "size 1.5"),
        ({"digest": D1, "mediaType": 5}, "mediaType is 5"),
        ({"digest": D1, "annotations": []}, "annotations"),
        ({"digest": D1, "annotations": {"a": 5}}, "annotations"),
        ({"digest": D1, "platform": "linux/amd64"}, "platform is 'linux/amd64'"),
        ({"digest": D1, "platform": {"os": 5}}, "os is 5"),
        ({"digest": D1, "platform": {"os": "linux", "architecture": ["amd64"]}}, "architecture is ['amd64']"),
    ],
)
def test_bad_descriptors(value: object, words: str) -> None:
    refused(lambda: m.descriptor(value, "entry", SRC), words)


@pytest.mark.parametrize(
    ("index", "words"),
    [
        ({"manifests": 5}, "the index's manifests are 5"),
        ({}, "the index's manifests are None"),
        ({"manifests": {"a": 1}}, "manifests are {'a': 1}"),
        ({"manifests": [5]}, "index entry 0 is 5"),
        ({"manifests": [{"digest": D1}, {"digest": 1}]}, "index entry 1 has a malformed digest 1"),
        ({"manifests": [{"digest": D1}] * (m.MAX_INDEX_ENTRIES + 1)}, "not a list of descriptors"),
    ],
)
def test_bad_indexes(index: object, words: str) -> None:
    refused(lambda: m.index(j(index), SRC), words)


@pytest.mark.parametrize(
    ("manifest", "words"),
    [
        ({"layers": []}, "has no config"),
        ({"config": 5, "layers": []}, "the manifest's config is 5"),
        ({"config": None}, "config is None"),
        ({"config": {"digest": D1}, "layers": "x"}, "layers are 'x'"),
        ({"config": {"digest": D1}, "layers": None}, "layers are None"),
        ({"config": {"digest": D1}, "layers": [{"digest": D2}, 7]}, "layer 1 is 7"),
        ({"config": {"digest": D1}, "layers": [{"digest": D2}] * (m.MAX_LAYERS + 1)}, "at most"),
    ],
)
def test_bad_manifests(manifest: object, words: str) -> None:
    refused(lambda: m.manifest(j(manifest), SRC), words)


def test_a_good_manifest() -> None:
    parsed = m.manifest(j({"config": {"digest": D1, "size": 10}, "layers": [{"digest": D2, "size": 5}]}), SRC)
    assert parsed.config.digest == D1 and [d.digest for d in parsed.layers] == [D2] and parsed.size == 15
    assert m.manifest(j({"config": {"digest": D1}}), SRC).layers == ()


def test_choose_platform_prefers_the_variant() -> None:
    arch, variant = m.node_platform()

    def entry(digest: str, os: str, architecture: str, v: str = "") -> m.Descriptor:
        return m.Descriptor(digest=digest, platform=m.Platform(os, architecture, v))

    entries = (
        entry("sha256:" + "0" * 64, "windows", arch),
        entry(D1, "linux", arch, "other"),
        entry(D2, "linux", arch, variant),
        m.Descriptor(digest="sha256:" + "3" * 64),  # no platform
    )
    assert m.choose_platform(entries, SRC).digest == D2
    assert m.choose_platform(entries[:2], SRC).digest == D1  # no variant matches: any of the architecture
    with pytest.raises(NotFound) as err:
        m.choose_platform(entries[:1], SRC)
    assert str(err.value).startswith(SRC)


# ---- image configs ------------------------------------------------------------------


def test_a_good_image_config() -> None:
    config = m.image_config(
        j(
            {
                "config": {
                    "Entrypoint": ["/bin/sh", "-c"],
                    "Cmd": ["echo hi"],
                    "Env": ["PATH=/bin"],
                    "WorkingDir": "/srv",
                    "User": "1000:1000",
                    "ExposedPorts": {"80/tcp": {}, "53/udp": {}},
                    "Volumes": {"/data": {}},
                    "Labels": 5,  # not read: not checked
                }
            }
        ),
        SRC,
    )
    assert config == ImageConfig(
        entrypoint=("/bin/sh", "-c"),
        cmd=("echo hi",),
        env=("PATH=/bin",),
        working_dir="/srv",
        user="1000:1000",
        exposed_ports=("53/udp", "80/tcp"),
        volumes=("/data",),
    )


def test_null_fields_are_empty() -> None:
    nulls = dict.fromkeys(["Entrypoint", "Cmd", "Env", "WorkingDir", "User", "ExposedPorts", "Volumes"])
    assert m.image_config(j({"config": nulls}), SRC) == ImageConfig()
    assert m.image_config(j({"config": None}), SRC) == ImageConfig()
    assert m.image_config(j({}), SRC) == ImageConfig()


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"config": 5}, "the image config's config is 5"),
        ({"config": {"Entrypoint": 5}}, "Entrypoint is 5, not a list of strings"),
        ({"config": {"Entrypoint": "/bin/sh"}}, "Entrypoint is '/bin/sh'"),
        ({"config": {"Cmd": ["sh", 1]}}, "Cmd is ['sh', 1]"),
        ({"config": {"Env": {"PATH": "/bin"}}}, "Env is"),
        ({"config": {"WorkingDir": ["/"]}}, "WorkingDir is ['/'], not a string"),
        ({"config": {"User": 0}}, "User is 0, not a string"),
        ({"config": {"ExposedPorts": ["80/tcp"]}}, "ExposedPorts is ['80/tcp'], not an object"),
        ({"config": {"Volumes": "/data"}}, "Volumes is '/data', not an object"),
    ],
)
def test_bad_image_configs(config: object, words: str) -> None:
    refused(lambda: m.image_config(j(config), SRC), words)
    refused(lambda: m.image_config(b"[]", SRC), "not a JSON object")


# ---- token answers ------------------------------------------------------------------


def test_token_answers() -> None:
    assert m.token(j({"token": "abc.def-_~+/="}), SRC) == "abc.def-_~+/="
    assert m.token(j({"token": "", "access_token": "xyz"}), SRC) == "xyz"
    for answer in ({}, {"token": None}, {"token": ""}):
        with pytest.raises(Unauthenticated):
            m.token(j(answer), SRC)


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        ({"token": "abc\r\nX-Injected: yes"}, "not a token an HTTP header can carry"),
        ({"token": "a b"}, "not a token"),
        ({"token": "é"}, "not a token"),
        ({"token": 5}, "the token is 5"),
        ({"token": ["a"]}, "the token is ['a']"),
        ({"access_token": {"a": 1}}, "the access_token is"),
    ],
)
def test_bad_token_answers(answer: object, words: str) -> None:
    refused(lambda: m.token(j(answer), SRC), words)
    refused(lambda: m.token(b"<html>", SRC), "not JSON")


# ---- the registry client's pure parts -------------------------------------------------


def test_origin_is_scheme_host_and_port() -> None:
    assert origin("http://r.example/v2/x") == origin("http://R.example:80/other")
    assert origin("https://r.example/x") == ("https", "r.example", 443)
    assert origin("http://r.example:5000/x") != origin("http://r.example:5001/x")
    assert origin("http://r.example/x") != origin("https://r.example/x")
    assert origin("http://[::1]:5000/x") == ("http", "::1", 5000)
    with pytest.raises(ValueError):
        origin("http://r.example:99999/x")


def test_a_registry_token_must_fit_a_header() -> None:
    Credentials(registry_token="abc.def").check()
    Credentials(username="user\r\n", password="pw\r\n").check()  # base64 in the header: harmless
    for bad in ("abc\r\nX-Injected: yes", "a b", "é"):
        with pytest.raises(InvalidArgument):
            Credentials(registry_token=bad).check()
