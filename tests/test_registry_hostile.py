"""PullImage against registries that misbehave (tests/badregistry.py), and the
image calls under hostile references (hypothesis): every answer is a clear
status, never INTERNAL or UNKNOWN, never a traceback in the daemon's log, and a
failed pull leaves nothing in the store.

PYSHIM_FUZZ_EXAMPLES=5000 runs the property tests longer, with a random seed
(the suite's run is derandomized: the same examples every time).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from badregistry import BadRegistry
from conftest import Daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagetools import daemon_with_hosts, free_port

from shim._proto import api_pb2

pytestmark = pytest.mark.root

CODES = grpc.StatusCode
# (fault, the code, words the message must hold besides the registry's host:port)
REGISTRY_FAULTS = [
    ("manifest_not_json", CODES.FAILED_PRECONDITION, "the manifest is not JSON"),
    ("manifest_untyped_list", CODES.FAILED_PRECONDITION, "the manifest is not a JSON object"),
    ("index_manifests_5", CODES.FAILED_PRECONDITION, "the index's manifests are 5"),
    ("config_entrypoint_5", CODES.FAILED_PRECONDITION, "Entrypoint is 5, not a list of strings"),
    ("long_header", CODES.UNAVAILABLE, "LineTooLong"),
    ("bad_status_line", CODES.UNAVAILABLE, "BadStatusLine"),
    ("token_crlf", CODES.FAILED_PRECONDITION, "not a token an HTTP header can carry"),
    ("realm_not_a_url", CODES.UNAUTHENTICATED, "token realm 'http://[::1/token' is not an http(s) URL"),
    ("redirect_ftp", CODES.FAILED_PRECONDITION, "only http and https redirects are followed"),
    ("redirect_long_label", CODES.UNAVAILABLE, "label empty or too long"),
]


def pull(daemon: Daemon, ref: str, auth: api_pb2.AuthConfig | None = None) -> str:
    request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref), auth=auth)
    return str(daemon.images.PullImage(request, timeout=60).image_ref)


def pull_error(daemon: Daemon, ref: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        pull(daemon, ref)
    return err.value


def assert_clean_and_answering(daemon: Daemon) -> None:
    """No traceback logged, nothing in the store, and the daemon still serves."""
    assert "Traceback" not in daemon.log.read_text()
    images = daemon.root / "images"
    for kind in ("blobs/sha256", "records", "tmp"):
        assert list((images / kind).iterdir()) == [], f"a failed pull left something in {kind}"
    assert daemon.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "pyshim"
    assert list(daemon.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images) == []


@pytest.mark.parametrize(("fault", "code", "says"), REGISTRY_FAULTS, ids=[f[0] for f in REGISTRY_FAULTS])
def test_a_misbehaving_registry_gets_a_clear_status(
    daemon: Daemon, fault: str, code: grpc.StatusCode, says: str
) -> None:
    with BadRegistry(fault=fault) as registry:
        err = pull_error(daemon, registry.ref)
        details = err.details() or ""
        assert err.code() == code, details
        assert f"registry {registry.host}" in details and says in details, details
        assert registry.trap.connections == 0  # nothing went where a redirect to ftp:// pointed
    assert_clean_and_answering(daemon)


@pytest.mark.parametrize("fault", [f[0] for f in REGISTRY_FAULTS])
def test_a_misbehaving_mirror_hands_over_to_the_upstream(daemon_factory: type[Daemon], fault: str) -> None:
    with BadRegistry() as upstream, BadRegistry(fault=fault) as mirror:
        d = daemon_with_hosts(daemon_factory, upstream.host, f'[host."http://{mirror.host}"]\n')
        assert pull(d, upstream.ref) == upstream.image.config_digest
        assert len(mirror.requests) > 0  # the mirror was asked first
        assert mirror.trap.connections == 0
    log = d.log.read_text()
    assert f"event=mirror_skipped mirror=http://{mirror.host}" in log
    assert "Traceback" not in log


def test_a_host_label_over_63_characters_is_invalid_argument(daemon: Daemon) -> None:
    host = f"{'a' * 64}.example.com"
    err = pull_error(daemon, f"{host}/library/test:1.0")
    assert err.code() == CODES.INVALID_ARGUMENT and "bad registry host" in (err.details() or "")
    assert_clean_and_answering(daemon)


@pytest.mark.parametrize(
    "ref",
    [
        "127.0.0.1:5000/library/test:1.0\n",
        f"127.0.0.1:5000/library/test@sha256:{'a' * 64}\n",
        "registry.example\n/library/test:1.0",
        "127.0.0.1:5000/library/test\n:1.0",
        "127.0.0.1:5000/library/test\n",
    ],
    ids=["tag", "digest", "host", "repository-before-tag", "repository"],
)
def test_a_trailing_newline_is_invalid_argument(daemon: Daemon, ref: str) -> None:
    for call in (
        lambda: pull(daemon, ref),
        lambda: daemon.images.ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)), timeout=10
        ),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == CODES.INVALID_ARGUMENT, err.value.details()


def test_redirects_carry_credentials_to_their_own_origin_only(daemon: Daemon) -> None:
    creds = api_pb2.AuthConfig(username="puller", password="pull-secret")
    with (
        BadRegistry() as storage,
        BadRegistry(
            fault="redirect_away", auth=("puller", "pull-secret"), redirect_to=f"http://{storage.host}"
        ) as registry,
    ):
        assert pull(daemon, registry.ref, creds) == registry.image.config_digest
        # The blobs came from the other origin (same address, another port), without the secret.
        assert storage.blob_gets() == dict.fromkeys(registry.image.blobs, 1)
        assert all("Authorization" not in r.headers for r in storage.requests)
        assert all(r.headers.get("Authorization") for r in registry.requests if "/blobs/" in r.path)


def test_a_redirect_within_the_registry_keeps_the_credentials(daemon: Daemon) -> None:
    creds = api_pb2.AuthConfig(username="puller", password="pull-secret")
    with BadRegistry(fault="redirect_here", auth=("puller", "pull-secret")) as registry:
        assert pull(daemon, registry.ref, creds) == registry.image.config_digest
        stored = [r for r in registry.requests if r.path.startswith("/storage/")]
        assert len(stored) == len(registry.image.blobs)
        assert all(r.headers.get("Authorization", "").startswith("Basic ") for r in stored)


def test_a_registry_token_that_cannot_be_a_header_is_invalid_argument(daemon: Daemon) -> None:
    with BadRegistry() as registry:
        request = api_pb2.PullImageRequest(
            image=api_pb2.ImageSpec(image=registry.ref),
            auth=api_pb2.AuthConfig(registry_token="abc\r\nX-Injected: yes"),
        )
        with pytest.raises(grpc.RpcError) as err:
            daemon.images.PullImage(request, timeout=30)
        assert err.value.code() == CODES.INVALID_ARGUMENT
        assert registry.requests == []
    assert_clean_and_answering(daemon)


# ---- hostile references, generated ----------------------------------------------------

EXAMPLES = int(os.environ.get("PYSHIM_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize="PYSHIM_FUZZ_EXAMPLES" not in os.environ,
    deadline=None,
    database=None,  # nothing written under the source tree
    # The fixtures are a module-wide daemon and the per-test leak check, which is
    # meant to run once around all the examples.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

_NAMES = ["a", "b.c", "127.0.0.1:1", "[::1]:1", "localhost", "h:0", "h:99999", f"{'a' * 64}.example"]
_PIECES = ["..", ".", "", "/", "//", "~", "%2e%2e", "etc", "passwd", "sha256:", "@", ":", "a", "A", "-", "_"]
hostile_references = st.one_of(
    st.just(""),
    st.text(max_size=200),  # any unicode
    st.text(st.characters(max_codepoint=0x9F) | st.sampled_from("\u2028\u200b\ufeff"), max_size=80),
    st.lists(st.sampled_from(_PIECES), max_size=30).map("".join),  # path-like
    st.tuples(  # nearly valid: real names with a hostile end
        st.lists(st.sampled_from(_NAMES), min_size=1, max_size=6),
        st.sampled_from(["", ":t", "@sha256:" + "a" * 64, ":t\n", "\x00", "@x", ":" + "t" * 129]),
    ).map(lambda parts: "/".join(parts[0]) + parts[1]),
    st.text("0123456789abcdef", min_size=1, max_size=70).flatmap(
        lambda h: st.sampled_from([h, "sha256:" + h, h.upper()])
    ),
    st.integers(min_value=500, max_value=200_000).flatmap(
        lambda n: st.sampled_from(["a" * n, "a/" * (n // 2), f"{'a' * 64}.example.com/x:1" * (n // 100)])
    ),  # huge
)


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for all the examples. Its HTTP(S) proxy is a closed local port, so
    that no generated reference reaches any registry on the network."""
    proxy = f"http://127.0.0.1:{free_port()}"
    d = Daemon(
        base=tmp_path_factory.mktemp("hostile"),
        env={"http_proxy": proxy, "https_proxy": proxy, "no_proxy": "", "NO_PROXY": ""},
    )
    try:
        yield d.start()
    finally:
        d.cleanup()


# What each call may answer a hostile reference: PullImage's requests all go to a
# closed proxy; a list filter that names nothing lists nothing.
ALLOWED = {
    "PullImage": {CODES.INVALID_ARGUMENT, CODES.UNAVAILABLE},
    "ImageStatus": {CODES.OK, CODES.INVALID_ARGUMENT},
    "RemoveImage": {CODES.OK, CODES.INVALID_ARGUMENT},
    "ListImages": {CODES.OK},
}


def _answer(daemon: Daemon, method: str, ref: str) -> grpc.StatusCode:
    spec = api_pb2.ImageSpec(image=ref)
    request = {
        "PullImage": api_pb2.PullImageRequest(image=spec),
        "ImageStatus": api_pb2.ImageStatusRequest(image=spec),
        "RemoveImage": api_pb2.RemoveImageRequest(image=spec),
        "ListImages": api_pb2.ListImagesRequest(filter=api_pb2.ImageFilter(image=spec)),
    }[method]
    try:
        getattr(daemon.images, method)(request, timeout=30)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return CODES.OK


@FUZZ
@given(ref=hostile_references)
def test_image_calls_answer_hostile_references_clearly(shared_daemon: Daemon, ref: str) -> None:
    for method, allowed in ALLOWED.items():
        code = _answer(shared_daemon, method, ref)
        assert code in allowed, (method, code, ref[:200])
    assert shared_daemon.proc is not None and shared_daemon.proc.poll() is None


def test_the_hostile_references_left_no_trace(shared_daemon: Daemon) -> None:
    """Runs after the property test (file order): the same daemon, still clean."""
    assert_clean_and_answering(shared_daemon)
