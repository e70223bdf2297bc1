"""shim.images.hosts: hosts.toml parsing (mirror order, capabilities, credentials,
bad files) and the endpoints a pull tries."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.images import hosts
from shim.images.reference import parse
from shim.images.registry import Credentials


def write(base: Path, host: str, text: str) -> None:
    (base / host).mkdir(parents=True)
    (base / host / "hosts.toml").write_text(text)


def test_mirrors_in_file_order_with_their_settings(tmp_path: Path) -> None:
    write(
        tmp_path,
        "registry.k8s.io",
        """
server = "https://registry.k8s.io/"
[host."http://10.0.0.5:5000"]
  capabilities = ["pull"]
[host."https://mirror.internal/prefix/"]
  skip_verify = true
  ca = "/etc/ca.crt"
  username = "puller"
  password = "pw"
[host."https://push-only.internal"]
  capabilities = ["push"]
""",
    )
    config = hosts.load(tmp_path)["registry.k8s.io"]
    first, second = config.mirrors
    assert first == hosts.Endpoint(url="http://10.0.0.5:5000", mirror=True, can_resolve=False)
    assert second == hosts.Endpoint(
        url="https://mirror.internal/prefix",
        skip_verify=True,
        ca="/etc/ca.crt",
        credentials=Credentials(username="puller", password="pw"),
        mirror=True,
        can_resolve=True,
    )
    assert config.server == "https://registry.k8s.io" and not config.skip_upstream


def test_endpoints_mirrors_then_upstream() -> None:
    config = hosts.parse({"host": {"http://10.0.0.5:5000": {}}})
    urls = [
        e.url for e in hosts.endpoints(parse("registry.k8s.io/pause:3.10"), {"registry.k8s.io": config}, ())
    ]
    assert urls == ["http://10.0.0.5:5000", "https://registry.k8s.io"]
    air_gapped = hosts.parse({"skip_upstream": True, "host": {"http://10.0.0.5:5000": {}}})
    ref = parse("registry.k8s.io/pause:3.10")
    assert [e.url for e in hosts.endpoints(ref, {"registry.k8s.io": air_gapped}, ())] == [
        "http://10.0.0.5:5000"
    ]


@pytest.mark.parametrize(
    ("ref", "insecure", "url"),
    [
        ("busybox", (), "https://registry-1.docker.io"),
        ("127.0.0.1:5000/a", (), "http://127.0.0.1:5000"),
        ("localhost:5000/a", (), "http://localhost:5000"),
        ("[::1]:5000/a", (), "http://[::1]:5000"),
        ("r.example:5000/a", ("r.example:5000",), "http://r.example:5000"),
        ("r.example:5000/a", (), "https://r.example:5000"),
    ],
)
def test_upstream_scheme(ref: str, insecure: tuple[str, ...], url: str) -> None:
    (endpoint,) = hosts.endpoints(parse(ref), {}, insecure)
    assert endpoint.url == url and not endpoint.mirror


@pytest.mark.parametrize(
    "text",
    [
        "this is = not toml [",
        "host = 5",
        'host = "http://m"',
        '[host]\n"http://m" = 5',
        '[host."ftp://m.example"]',
        '[host."m.example"]',
        f'[host."http://{"a" * 64}.example"]',  # a label the idna codec would refuse
        '[host."http://m.example:99999"]',
        '[host."http://m.example/?x=1"]',
        '[host."http://user:pw@m.example"]',
        '[host."http://m.example"]\ncapabilities = "pull"',
        '[host."http://m.example"]\ncapabilities = ["pull", 5]',
        '[host."http://m.example"]\nskip_verify = "false"',
        '[host."http://m.example"]\nusername = 5',
        '[host."http://m.example"]\nca = ["a", "b"]',
        'server = "ftp://r.example"',
        "server = 5",
        'skip_upstream = "yes"',
        "skip_verify = 1",
        "ca = false",
    ],
)
def test_a_bad_file_is_refused_whole_and_the_others_still_load(tmp_path: Path, text: str) -> None:
    write(tmp_path, "bad.example", text)
    write(tmp_path, "good.example", '[host."http://10.0.0.5:5000"]\n')
    loaded = hosts.load(tmp_path)
    assert set(loaded) == {"good.example"}


def test_no_config_dir_is_no_config(tmp_path: Path) -> None:
    assert hosts.load(tmp_path / "absent") == {}


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.example").mkdir()
    (tmp_path / "bad.example" / "hosts.toml").write_bytes(b'server = "\xff"')
    assert hosts.load(tmp_path) == {}
