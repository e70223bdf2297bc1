"""shim.images.reference: normalisation and every rejection."""

from __future__ import annotations

import pytest

from shim.errors import InvalidArgument
from shim.images.reference import Reference, is_digest, parse, valid_host

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", Reference("docker.io", "library/busybox", tag="latest")),
        ("busybox:1.36", Reference("docker.io", "library/busybox", tag="1.36")),
        ("docker.io/busybox", Reference("docker.io", "library/busybox", tag="latest")),
        ("team/app", Reference("docker.io", "team/app", tag="latest")),
        ("quay.io/coreos/etcd:v3.5", Reference("quay.io", "coreos/etcd", tag="v3.5")),
        ("localhost/app", Reference("localhost", "app", tag="latest")),
        (f"127.0.0.1:5000/team/app@{DIGEST}", Reference("127.0.0.1:5000", "team/app", digest=DIGEST)),
        (f"r.example/app:1@{DIGEST}", Reference("r.example", "app", digest=DIGEST)),  # the digest wins
        ("[::1]:5000/app:v", Reference("[::1]:5000", "app", tag="v")),
        (
            "Registry.Example/a_b/c__d/e-f:T_1.0-x",
            Reference("Registry.Example", "a_b/c__d/e-f", tag="T_1.0-x"),
        ),
        (f"{'a' * 63}.example/x", Reference(f"{'a' * 63}.example", "x", tag="latest")),
    ],
)
def test_references_are_normalised(text: str, expected: Reference) -> None:
    assert parse(text) == expected


def test_str_and_api_host() -> None:
    assert str(parse("busybox")) == "docker.io/library/busybox:latest"
    assert str(parse(f"r.example/app@{DIGEST}")) == f"r.example/app@{DIGEST}"
    assert parse("busybox").api_host == "registry-1.docker.io"
    assert parse("quay.io/a/b").api_host == "quay.io"


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "busy box",
        "a" * 513,
        "Busybox",  # repositories are lowercase
        "a:",
        "a:-x",
        "a:" + "t" * 129,
        "a@sha256:abc",
        f"a@sha512:{'a' * 128}",
        f"a@{DIGEST.upper()}",
        "a@b@c",
        "/a",
        "a//b",
        "a/../b",
        "a/./b",
        "ünicode",
        "a\x00b",
        "a\x7f",
        f"{'a' * 64}.example.com/x:1",  # a label over 63: the idna codec would raise later
        f"{'a.' * 127}ab/x",  # a host over 253 characters
        "h.example:0/x",
        "h.example:65536/x",
        "h.example:/x",
        "[::zz]:5000/x",
        "[1.2.3.4]/x",
        "[::1/x",
        "-h.example/x",
        f"r.example/{'a' * 250}",  # the name is over 255
        "127.0.0.1:5000/library/test:1.0\n",  # a trailing newline, anywhere
        f"127.0.0.1:5000/library/test@{DIGEST}\n",
        "registry.example\n/library/test:1.0",
        "127.0.0.1:5000/library/test\n:1.0",
        "127.0.0.1:5000/library/test\n",
    ],
)
def test_bad_references_are_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse(text)
    assert str(err.value).startswith(f"image reference {text[:80]!r}")  # it shows what was refused


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("r.example", True),
        ("r.example:5000", True),
        ("localhost:1", True),
        ("h:65535", True),
        ("[::1]", True),
        ("[::1]:5000", True),
        ("a" * 63 + ".b", True),
        ("a" * 64 + ".b", False),
        ("r.example\n", False),
        ("r.example:5000\n", False),
        ("[::1]\n", False),
        ("h:0", False),
        ("h:65536", False),
        ("h:", False),
        ("h..example", False),
        ("[::1]:", False),
        ("[fe80::1%eth0]", False),
        ("", False),
    ],
)
def test_valid_host(host: str, ok: bool) -> None:
    assert valid_host(host) is ok


def test_valid_host_total_length() -> None:
    name = ".".join(["a" * 63] * 3 + ["a" * 61])  # 253 characters
    assert len(name) == 253 and valid_host(name)
    assert not valid_host(name + "a")


def test_is_digest_matches_whole_strings_only() -> None:
    assert is_digest(DIGEST)
    assert not is_digest(DIGEST + "\n")
    assert not is_digest(DIGEST + "a")
    assert not is_digest(" " + DIGEST)
    assert not is_digest("sha256:" + "A" * 64)
