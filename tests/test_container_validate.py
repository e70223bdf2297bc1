"""CreateContainer requests are checked whole before anything is made: each bad field
is INVALID_ARGUMENT naming it (UNIMPLEMENTED for what pyshim does not do), hostile
strings never pass, and a trailing newline never slips through a pattern."""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spectools import SANDBOX_ID, container_config, request

from shim._proto import api_pb2
from shim.containers import validate
from shim.errors import InvalidArgument, ShimError, Unimplemented


def check(config: api_pb2.ContainerConfig | None = None, **fields: Any) -> Any:
    return validate.container_spec(request(config, **fields))


def sc(**fields: Any) -> dict[str, Any]:
    return {"sc": fields}


def mount(container_path: str = "/data", host_path: str = "/srv/data", **fields: Any) -> api_pb2.Mount:
    return api_pb2.Mount(container_path=container_path, host_path=host_path, **fields)


def profile(kind: int, ref: str = "") -> api_pb2.SecurityProfile:
    return api_pb2.SecurityProfile(profile_type=kind, localhost_ref=ref)


def env(key: str, value: bytes = b"v") -> dict[str, Any]:
    return {"envs": [api_pb2.KeyValue(key=key, value=value)]}


def test_a_good_request_gives_its_spec() -> None:
    config = container_config(
        labels={"io.kubernetes.pod.name": "p"},
        annotations={"a": "b"},
        log_path="app/0.log",
        mounts=[mount()],
        devices=[api_pb2.Device(container_path="/dev/fuse", host_path="/dev/fuse", permissions="mrw")],
    )
    spec = check(config)
    assert (spec.sandbox_id, spec.name, spec.attempt, spec.image) == (
        SANDBOX_ID,
        "app",
        0,
        "docker.io/library/busybox:latest",
    )
    assert (spec.labels, spec.annotations, spec.log_path) == (
        {"io.kubernetes.pod.name": "p"},
        {"a": "b"},
        "app/0.log",
    )
    assert spec.config == config
    assert api_pb2.ContainerConfig.FromString(spec.config_bytes) == config


def test_what_kubelet_sends_passes() -> None:
    # As kubelet v1.32 sends it (conformance/kubelet.md): image by id, masked paths, hugepages...
    config = container_config(
        image=api_pb2.ImageSpec(image="sha256:" + "1" * 64, user_specified_image="busybox"),
        command=["sleep", "3600"],
        mounts=[
            mount("/etc/hosts", "/var/lib/kubelet/pods/u/etc-hosts"),
            mount("/dev/termination-log", "/x/y"),
        ],
        log_path="app/0.log",
        resources={
            "cpu_shares": 2,
            "oom_score_adj": 1000,
            "hugepage_limits": [
                api_pb2.HugepageLimit(page_size="2MB"),
                api_pb2.HugepageLimit(page_size="1GB"),
            ],
        },
        sc={
            "masked_paths": ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/interrupts"],
            "readonly_paths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
            "seccomp": profile(api_pb2.SecurityProfile.Unconfined),
            "run_as_user": api_pb2.Int64Value(value=0),
            "namespace_options": api_pb2.NamespaceOption(pid=api_pb2.CONTAINER),
        },
    )
    check(config)


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("no metadata", {"metadata": None}, "config.metadata is required"),
    ("empty name", {"metadata": api_pb2.ContainerMetadata(name="")}, "config.metadata.name is required"),
    ("underscore", {"metadata": api_pb2.ContainerMetadata(name="a_b")}, "config.metadata.name 'a_b'"),
    ("slash", {"metadata": api_pb2.ContainerMetadata(name="../x")}, "config.metadata.name"),
    ("long name", {"metadata": api_pb2.ContainerMetadata(name="a" * 254)}, "at most 253"),
    ("no image", {"image": None}, "config.image.image is required"),
    ("image space", {"image": api_pb2.ImageSpec(image="busy box")}, "config.image.image"),
    ("image newline", {"image": api_pb2.ImageSpec(image="busybox\n")}, "config.image.image"),
    ("long image", {"image": api_pb2.ImageSpec(image="a" * 5000)}, "config.image.image"),
    (
        "bad user image",
        {"image": api_pb2.ImageSpec(image="b", user_specified_image="x\ny")},
        "user_specified_image",
    ),
    ("NUL arg", {"command": ["sh", "a\0b"]}, "config.command holds a NUL"),
    ("NUL args", {"args": ["a\0"]}, "config.args holds a NUL"),
    ("huge arg", {"args": ["x" * (128 * 1024)]}, "the limit is 131071"),
    ("ARG_MAX", {"args": ["x" * 100_000] * 25}, "command, args and envs take"),
    ("too many args", {"args": ["x"] * 70000}, "the limit is 65536"),
    ("empty env key", env(""), "empty name"),
    ("env key =", env("A=B"), "must not contain '='"),
    ("env key newline", env("A\n"), "must not contain '='"),
    ("env NUL value", env("A", b"x\0y"), "NUL"),
    ("env not UTF-8", env("A", b"\xff"), "not UTF-8"),
    ("huge env", env("A", b"x" * (128 * 1024)), "the limit is"),
    ("relative working dir", {"working_dir": "srv"}, "config.working_dir 'srv' must be an absolute path"),
    ("NUL working dir", {"working_dir": "/a\0"}, "config.working_dir"),
    ("relative mount", {"mounts": [mount("data")]}, "mount container_path 'data' must be an absolute path"),
    ("dotdot mount", {"mounts": [mount("/a/../etc")]}, "must not contain '..'"),
    ("NUL mount", {"mounts": [mount("/a\0")]}, "NUL"),
    ("relative host path", {"mounts": [mount(host_path="srv")]}, "host_path 'srv' must be an absolute path"),
    ("bad propagation", {"mounts": [mount(propagation=7)]}, "propagation 7"),
    ("duplicate mounts", {"mounts": [mount("/d"), mount("/d/")]}, "two mounts at the same container path"),
    (
        "duplicate spelling",
        {"mounts": [mount("/d/e"), mount("//d/./e")]},
        "two mounts at the same container path",
    ),
    ("rro not ro", {"mounts": [mount(recursive_read_only=True)]}, "recursive_read_only needs readonly"),
    (
        "rro shared",
        {
            "mounts": [
                mount(readonly=True, recursive_read_only=True, propagation=api_pb2.PROPAGATION_BIDIRECTIONAL)
            ]
        },
        "needs PRIVATE",
    ),
    ("too many mounts", {"mounts": [mount(f"/m{i}") for i in range(1025)]}, "more than 1024 mounts"),
    ("sub path alone", {"mounts": [mount(image_sub_path="x")]}, "image_sub_path needs an image"),
    (
        "relative device",
        {"devices": [api_pb2.Device(container_path="dev/x", host_path="/dev/null")]},
        "device container_path",
    ),
    (
        "device perms",
        {"devices": [api_pb2.Device(container_path="/dev/x", host_path="/dev/null", permissions="rwx")]},
        "permissions",
    ),
    (
        "device perms twice",
        {"devices": [api_pb2.Device(container_path="/d", host_path="/d", permissions="rr")]},
        "permissions",
    ),
    (
        "device perms newline",
        {"devices": [api_pb2.Device(container_path="/d", host_path="/d", permissions="r\n")]},
        "permissions",
    ),
    ("many labels", {"labels": {f"k{i}": "v" for i in range(300)}}, "300 labels"),
    ("big label", {"labels": {"k": "v" * 5000}}, "label 'k'"),
    ("empty label key", {"labels": {"": "v"}}, "label key ''"),
    ("big annotations", {"annotations": {"a": "x" * (300 * 1024)}}, "annotations take"),
    ("absolute log path", {"log_path": "/var/log/x.log"}, "config.log_path"),
    ("escaping log path", {"log_path": "a/../../x.log"}, "config.log_path"),
    ("log path newline", {"log_path": "a\n.log"}, "config.log_path"),
    ("log path dir", {"log_path": "a/"}, "config.log_path"),
    ("long log path", {"log_path": "a" * 5000}, "config.log_path is longer"),
    ("stop signal", {"stop_signal": 99}, "config.stop_signal 99"),
    ("cpu period", {"resources": {"cpu_period": 10}}, "cpu_period 10"),
    ("cpu quota", {"resources": {"cpu_quota": -5}}, "cpu_quota -5"),
    ("cpu shares", {"resources": {"cpu_shares": 1}}, "cpu_shares 1"),
    (
        "negative memory",
        {"resources": {"memory_limit_in_bytes": -1}},
        "memory_limit_in_bytes must not be negative",
    ),
    (
        "swap below memory",
        {"resources": {"memory_limit_in_bytes": 100 << 20, "memory_swap_limit_in_bytes": 1 << 20}},
        "below",
    ),
    ("negative swap", {"resources": {"memory_swap_limit_in_bytes": -2}}, "memory_swap_limit_in_bytes"),
    ("oom", {"resources": {"oom_score_adj": 1001}}, "oom_score_adj 1001"),
    ("cpuset syntax", {"resources": {"cpuset_cpus": "0-"}}, "cpuset_cpus '0-'"),
    ("cpuset newline", {"resources": {"cpuset_cpus": "0-1\n"}}, "cpuset_cpus"),
    ("cpuset reversed", {"resources": {"cpuset_mems": "3-1"}}, "cpuset_mems"),
    (
        "page size",
        {"resources": {"hugepage_limits": [api_pb2.HugepageLimit(page_size="2M")]}},
        "hugepage size '2M'",
    ),
    (
        "page size newline",
        {"resources": {"hugepage_limits": [api_pb2.HugepageLimit(page_size="2MB\n")]}},
        "hugepage size",
    ),
    (
        "page size twice",
        {"resources": {"hugepage_limits": [api_pb2.HugepageLimit(page_size="2MB")] * 2}},
        "limited twice",
    ),
    ("unified key", {"resources": {"unified": {"../memory.max": "1"}}}, "unified"),
    ("unified newline", {"resources": {"unified": {"memory.high\n": "1"}}}, "unified"),
    ("unified value", {"resources": {"unified": {"memory.high": "1\nmemory.max 0"}}}, "printable line"),
    (
        "unknown cap",
        sc(capabilities=api_pb2.Capability(add_capabilities=["CAP_FLY"])),
        "'CAP_FLY' is not a Linux capability",
    ),
    ("cap newline", sc(capabilities=api_pb2.Capability(drop_capabilities=["CHOWN\n"])), "drop_capabilities"),
    (
        "ambient all",
        sc(capabilities=api_pb2.Capability(add_ambient_capabilities=["ALL"])),
        "add_ambient_capabilities",
    ),
    ("uid", sc(run_as_user=api_pb2.Int64Value(value=-1)), "run_as_user -1"),
    (
        "gid",
        sc(run_as_user=api_pb2.Int64Value(value=1), run_as_group=api_pb2.Int64Value(value=2**32)),
        "run_as_group",
    ),
    ("group alone", sc(run_as_group=api_pb2.Int64Value(value=1)), "run_as_group needs run_as_user"),
    ("username", sc(run_as_username="a b"), "run_as_username 'a b'"),
    ("username newline", sc(run_as_username="app\n"), "run_as_username"),
    ("groups", sc(supplemental_groups=[-3]), "supplemental_groups: -3"),
    ("group policy", sc(supplemental_groups_policy=5), "supplemental_groups_policy 5"),
    ("masked path", sc(masked_paths=["proc/kcore"]), "masked_paths entry"),
    ("readonly path", sc(readonly_paths=["/proc/../etc"]), "readonly_paths entry"),
    ("seccomp type", sc(seccomp=profile(9)), "seccomp.profile_type 9"),
    (
        "seccomp no ref",
        sc(seccomp=profile(api_pb2.SecurityProfile.Localhost)),
        "Localhost needs localhost_ref",
    ),
    (
        "seccomp relative",
        sc(seccomp=profile(api_pb2.SecurityProfile.Localhost, "p.json")),
        "localhost_ref 'p.json'",
    ),
    ("old seccomp", sc(seccomp_profile_path="default"), "seccomp_profile_path 'default'"),
    ("old seccomp relative", sc(seccomp_profile_path="localhost/p.json"), "seccomp_profile_path"),
    ("apparmor type", sc(apparmor=profile(7)), "apparmor.profile_type 7"),
    ("apparmor no ref", sc(apparmor=profile(api_pb2.SecurityProfile.Localhost)), "apparmor: Localhost needs"),
    (
        "apparmor newline",
        sc(apparmor=profile(api_pb2.SecurityProfile.Localhost, "p\n")),
        "apparmor: Localhost",
    ),
    ("old apparmor", sc(apparmor_profile="p"), "apparmor_profile 'p'"),
    ("ns mode", sc(namespace_options=api_pb2.NamespaceOption(pid=9)), "namespace_options.pid 9"),
    (
        "net container",
        sc(namespace_options=api_pb2.NamespaceOption(network=api_pb2.CONTAINER)),
        "network CONTAINER",
    ),
    (
        "target no id",
        sc(namespace_options=api_pb2.NamespaceOption(pid=api_pb2.TARGET)),
        "TARGET needs target_id",
    ),
    (
        "target bad id",
        sc(namespace_options=api_pb2.NamespaceOption(pid=api_pb2.TARGET, target_id="ab\n")),
        "target_id 'ab\\\\n'",
    ),
    (
        "too big",
        {
            "labels": {f"k{i}": "v" * 4096 for i in range(200)},
            "annotations": {"a": "x" * 250_000, "b": "y" * 250_000},
        },
        "annotations take",
    ),
    (
        "config too big",
        {"args": ["x" * 100_000] * 20, "labels": {f"k{i}": "v" * 4096 for i in range(200)}},
        "config is",
    ),
]


@pytest.mark.parametrize(("fields", "message"), [pytest.param(f, m, id=i) for i, f, m in BAD])
def test_bad_requests(fields: dict[str, Any], message: str) -> None:
    fields = dict(fields)
    if "sc" in fields or "resources" in fields:
        config = container_config(
            sc=fields.pop("sc", None), resources=fields.pop("resources", None), **fields
        )
    else:
        config = container_config(**{k: v for k, v in fields.items() if v is not None})
        for key in (k for k, v in fields.items() if v is None):
            config.ClearField(key)
    with pytest.raises(InvalidArgument, match=message):
        check(config)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mounts": [mount(image=api_pb2.ImageSpec(image="busybox"))]}, "image volume"),
        (
            {"mounts": [mount(uidMappings=[api_pb2.IDMapping(host_id=1, container_id=0, length=1)])]},
            "id-mapped",
        ),
        ({"mounts": [mount(mount_options=["noexec"])]}, "mount_options"),
        ({"CDI_devices": [api_pb2.CDIDevice(name="vendor.com/gpu=0")]}, "CDI"),
        (
            sc(
                namespace_options=api_pb2.NamespaceOption(
                    userns_options=api_pb2.UserNamespace(mode=api_pb2.POD, uids=[api_pb2.IDMapping(length=1)])
                )
            ),
            "user namespaces",
        ),
    ],
)
def test_unimplemented(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(Unimplemented, match=message):
        check(container_config(sc=fields.pop("sc", None), **fields))


@pytest.mark.parametrize(
    ("sandbox_id", "message"),
    [
        ("", "pod sandbox id is required"),
        ("AB", "lowercase hex"),
        ("a" * 65, "1-64"),
        ("ab\n", "lowercase hex"),
    ],
)
def test_sandbox_ids(sandbox_id: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate.container_spec(
            api_pb2.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=container_config())
        )
    assert validate.container_spec(
        api_pb2.CreateContainerRequest(pod_sandbox_id="abc", config=container_config())
    )


def test_no_config() -> None:
    with pytest.raises(InvalidArgument, match="config is required"):
        validate.container_spec(api_pb2.CreateContainerRequest(pod_sandbox_id=SANDBOX_ID))


@pytest.mark.parametrize(
    "fields",
    [
        sc(
            capabilities=api_pb2.Capability(
                add_capabilities=["all", "cap_net_admin", "SYS_TIME"], drop_capabilities=["ALL"]
            )
        ),
        sc(seccomp_profile_path="localhost//var/lib/kubelet/seccomp/p.json"),
        sc(seccomp=profile(api_pb2.SecurityProfile.Localhost, "/var/lib/kubelet/seccomp/p.json")),
        sc(apparmor=profile(api_pb2.SecurityProfile.Localhost, "k8s-apparmor-example")),
        sc(run_as_username="machine$", run_as_group=api_pb2.Int64Value(value=5)),
        sc(namespace_options=api_pb2.NamespaceOption(pid=api_pb2.TARGET, target_id="ef" * 32)),
        sc(supplemental_groups=[0, 4294967294], supplemental_groups_policy=api_pb2.Strict),
        {
            "resources": {
                "cpu_quota": -1,
                "memory_swap_limit_in_bytes": -1,
                "cpuset_cpus": "0,2-3,7",
                "unified": {"memory.high": "max"},
            }
        },
        {
            "mounts": [
                mount(readonly=True, recursive_read_only=True),
                mount("/b", propagation=api_pb2.PROPAGATION_BIDIRECTIONAL),
            ]
        },
        {"working_dir": "/a/../b", "log_path": "dir/x.log", "tty": True, "stdin": True, "stdin_once": True},
        {"envs": [api_pb2.KeyValue(key="A", value="é=ü".encode())], "stop_signal": api_pb2.SIGNAL_SIGKILL},
    ],
)
def test_good_requests(fields: dict[str, Any]) -> None:
    fields = dict(fields)
    check(container_config(sc=fields.pop("sc", None), resources=fields.pop("resources", None), **fields))


# ---- hostile strings (hypothesis) -------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
NAME_CHARS = set(string.ascii_letters + string.digits + ".-")


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_names(name: str) -> None:
    config = container_config(metadata=api_pb2.ContainerMetadata(name=name))
    ok = bool(name) and set(name) <= NAME_CHARS and name[0] not in ".-"
    try:
        check(config)
    except InvalidArgument:
        assert not ok
    else:
        assert ok


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b.log", "..", ".", "", "/", "\n", "\0", "\t", "é"]), max_size=6).map(
        "".join
    )
)
def test_log_paths_never_leave_the_pod_directory(log_path: str) -> None:
    try:
        spec = check(log_path=log_path)
    except InvalidArgument:
        return
    parts = spec.log_path.split("/")
    assert not spec.log_path.startswith("/") and ".." not in parts and "." not in parts
    assert spec.log_path.isprintable() and ("" not in parts or spec.log_path == "")


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT)
def test_mount_paths(container_path: str, host_path: str) -> None:
    try:
        spec = check(mounts=[mount(container_path, host_path)])
    except InvalidArgument:
        return
    m = spec.config.mounts[0]
    for path in (m.container_path, m.host_path):
        assert path.startswith("/") and "\0" not in path
    assert ".." not in m.container_path.split("/")


@settings(max_examples=300, deadline=None)
@given(TEXT, st.binary(max_size=20))
def test_env(key: str, value: bytes) -> None:
    try:
        check(envs=[api_pb2.KeyValue(key=key, value=value)])
    except InvalidArgument:
        assert not key or "=" in key or not key.isprintable() or b"\0" in value or not _utf8(value)
    else:
        assert key and "=" not in key and key.isprintable() and b"\0" not in value


def _utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


# Every field checked with a pattern, with a value that passes: + "\n" must not.
PATTERNED: list[tuple[str, Any]] = [
    ("name", lambda v: container_config(metadata=api_pb2.ContainerMetadata(name=v))),
    ("app", lambda v: container_config(image=api_pb2.ImageSpec(image=v))),
    ("0-1", lambda v: container_config(resources={"cpuset_cpus": v})),
    ("2MB", lambda v: container_config(resources={"hugepage_limits": [api_pb2.HugepageLimit(page_size=v)]})),
    ("memory.high", lambda v: container_config(resources={"unified": {v: "1"}})),
    ("CHOWN", lambda v: container_config(sc={"capabilities": api_pb2.Capability(add_capabilities=[v])})),
    (
        "rw",
        lambda v: container_config(
            devices=[api_pb2.Device(container_path="/d", host_path="/d", permissions=v)]
        ),
    ),
    ("app", lambda v: container_config(sc={"run_as_username": v})),
    ("prof", lambda v: container_config(sc={"apparmor": profile(api_pb2.SecurityProfile.Localhost, v)})),
    ("localhost/prof", lambda v: container_config(sc={"apparmor_profile": v})),
    (
        "ef" * 32,
        lambda v: container_config(
            sc={"namespace_options": api_pb2.NamespaceOption(pid=api_pb2.TARGET, target_id=v)}
        ),
    ),
    ("a.log", lambda v: container_config(log_path=v)),
]


@pytest.mark.parametrize(("good", "make"), PATTERNED)
@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\0", "\t"])
def test_no_trailing_newline_passes(good: str, make: Any, suffix: str) -> None:
    check(make(good))
    with pytest.raises(InvalidArgument):
        check(make(good + suffix))


@settings(max_examples=200, deadline=None)
@given(TEXT, TEXT, TEXT, TEXT)
def test_hostile_strings_give_only_request_errors(
    cap: str, cpuset: str, username: str, profile_ref: str
) -> None:
    config = container_config(
        resources={"cpuset_cpus": cpuset},
        sc={
            "capabilities": api_pb2.Capability(add_capabilities=[cap]),
            "run_as_username": username,
            "seccomp": profile(api_pb2.SecurityProfile.Localhost, profile_ref),
        },
    )
    try:
        check(config)
    except ShimError as exc:
        assert isinstance(exc, InvalidArgument)
