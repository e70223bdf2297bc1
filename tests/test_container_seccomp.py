"""Seccomp: Debian's containers-common profile converted for an architecture and a
capability set, profile choice from the security context, Localhost profile files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from spectools import SECCOMP_JSON, build, host_facts, make_rootfs

from shim._proto import api_pb2
from shim.containers import capabilities, seccomp
from shim.errors import FailedPrecondition

DEFAULT = frozenset(capabilities.DEFAULT)
ALL = frozenset(capabilities.NAMES)
needs_profile = pytest.mark.skipif(
    not SECCOMP_JSON.exists(), reason="golang-github-containers-common missing"
)
GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "s390x": "s390x", "ppc64le": "ppc64le"}


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return make_rootfs(tmp_path / "rootfs")


def real_profile() -> dict[str, Any]:
    return dict(json.loads(SECCOMP_JSON.read_text()))


def convert(
    profile: Any, caps: frozenset[str] = DEFAULT, arch: str = "x86_64", kernel: tuple[int, int] = (6, 1)
) -> Any:
    return seccomp.convert(profile, arch=arch, capabilities=caps, kernel=kernel)


def applies(group: dict[str, Any], caps: frozenset[str], go_arch: str) -> bool:
    """The rule of containers/common, written out for the real profile (no minKernel)."""
    inc, exc = group.get("includes") or {}, group.get("excludes") or {}
    return (
        all(c in caps for c in inc.get("caps", []))
        and not any(c in caps for c in exc.get("caps", []))
        and (not inc.get("arches") or go_arch in inc["arches"])
        and go_arch not in exc.get("arches", [])
    )


@needs_profile
@pytest.mark.parametrize("arch", sorted(GO_ARCH))
@pytest.mark.parametrize(
    "caps",
    [DEFAULT, frozenset(), ALL, DEFAULT | {"CAP_SYS_ADMIN"}, DEFAULT - {"CAP_AUDIT_WRITE", "CAP_SYS_CHROOT"}],
    ids=["default", "none", "all", "sys_admin", "no_audit_write"],
)
def test_every_group_of_the_real_profile_is_filtered(arch: str, caps: frozenset[str]) -> None:
    source = real_profile()
    out = convert(source, caps, arch)
    kept = [g for g in source["syscalls"] if applies(g, caps, GO_ARCH[arch])]
    assert len(out["syscalls"]) == len(kept)
    for converted, group in zip(out["syscalls"], kept, strict=True):
        assert converted["names"] == group["names"] and converted["action"] == group["action"]
        assert converted.get("args", []) == (group.get("args") or [])
        assert converted.get("errnoRet") == group.get("errnoRet")
        assert set(converted) <= {"names", "action", "args", "errnoRet"}  # no comment, includes, errno
    assert (out["defaultAction"], out["defaultErrnoRet"]) == ("SCMP_ACT_ERRNO", 38)
    json.dumps(out)  # plain JSON


def actions_for(out: dict[str, Any], name: str) -> list[str]:
    return [g["action"] for g in out["syscalls"] if name in g["names"]]


@needs_profile
def test_the_real_profile_on_this_arch_with_default_capabilities() -> None:
    out = convert(real_profile())
    assert out["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert actions_for(out, "arch_prctl") == ["SCMP_ACT_ALLOW"]  # amd64 only
    assert actions_for(out, "sync_file_range2") == []  # ppc64le only
    assert actions_for(out, "bpf") == ["SCMP_ACT_ERRNO"]  # CAP_SYS_ADMIN is not in the default set
    assert actions_for(out, "chroot") == ["SCMP_ACT_ALLOW"]  # CAP_SYS_CHROOT is
    assert [g.get("args") for g in out["syscalls"] if "socket" in g["names"]] == [
        None
    ]  # AUDIT_WRITE: any socket
    with_admin = convert(real_profile(), DEFAULT | {"CAP_SYS_ADMIN"})
    assert actions_for(with_admin, "bpf") == ["SCMP_ACT_ALLOW"]


@needs_profile
def test_the_real_profile_elsewhere() -> None:
    arm = convert(real_profile(), arch="aarch64")
    assert arm["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert actions_for(arm, "arm_fadvise64_64") == ["SCMP_ACT_ALLOW"] and actions_for(arm, "arch_prctl") == []
    assert "architectures" not in convert(real_profile(), arch="sparc64")  # libseccomp's native arch then


def test_kernel_versions_filter_groups() -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["new"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "5.10"}},
            {"names": ["old"], "action": "SCMP_ACT_ALLOW", "excludes": {"minKernel": "5.10"}},
        ],
    }
    assert [g["names"] for g in convert(profile, kernel=(6, 1))["syscalls"]] == [["new"]]
    assert [g["names"] for g in convert(profile, kernel=(4, 19))["syscalls"]] == [["old"]]
    assert seccomp.kernel_version("6.18.44-fc-v1252") == (6, 18)
    assert seccomp.kernel_version("weird") == (0, 0)


def test_an_oci_format_profile_passes_through() -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "flags": ["SECCOMP_FILTER_FLAG_LOG"],
        "syscalls": [
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {
                "names": ["personality"],
                "action": "SCMP_ACT_KILL",
                "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}],
            },
        ],
    }
    out = convert(profile)
    assert out == {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "flags": ["SECCOMP_FILTER_FLAG_LOG"],
        "syscalls": [
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {
                "names": ["personality"],
                "action": "SCMP_ACT_KILL",
                "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
            },
        ],
    }
    assert convert(
        {"defaultAction": "SCMP_ACT_LOG", "syscalls": [{"name": "x", "action": "SCMP_ACT_ALLOW"}]}
    )["syscalls"] == [{"names": ["x"], "action": "SCMP_ACT_ALLOW"}]


# ---- which profile -----------------------------------------------------------------------


def seccomp_of(rootfs: Path, sc: dict[str, Any], **host: Any) -> Any:
    return build(rootfs, sc=sc, host=host_facts(**host)).document["linux"].get("seccomp")


def profile(kind: int, ref: str = "") -> api_pb2.SecurityProfile:
    return api_pb2.SecurityProfile(profile_type=kind, localhost_ref=ref)


@needs_profile
@pytest.mark.parametrize(
    ("sc", "confined"),
    [
        ({}, False),  # no profile at all: unconfined, as the CRI means it
        ({"seccomp": api_pb2.SecurityProfile()}, True),  # kubelet's `seccomp: {}`: RuntimeDefault
        ({"seccomp": profile(api_pb2.SecurityProfile.Unconfined)}, False),
        ({"seccomp": api_pb2.SecurityProfile(), "privileged": True}, False),
        ({"seccomp_profile_path": "runtime/default"}, True),
        ({"seccomp_profile_path": "docker/default"}, True),
        ({"seccomp_profile_path": "unconfined"}, False),
        (
            {
                "seccomp": profile(api_pb2.SecurityProfile.Unconfined),
                "seccomp_profile_path": "runtime/default",
            },
            False,
        ),
    ],
)
def test_profile_choice(rootfs: Path, sc: dict[str, Any], confined: bool) -> None:
    found = seccomp_of(rootfs, sc)
    assert (found is not None) == confined
    if confined:
        assert found["defaultAction"] == "SCMP_ACT_ERRNO"


def test_runtime_default_without_the_profile(rootfs: Path) -> None:
    with pytest.raises(FailedPrecondition, match="golang-github-containers-common"):
        seccomp_of(rootfs, {"seccomp": api_pb2.SecurityProfile()}, seccomp_default=None)
    assert seccomp_of(rootfs, {}, seccomp_default=None) is None


@needs_profile
def test_the_containers_capabilities_decide_the_groups(rootfs: Path) -> None:
    sc = {
        "seccomp": api_pb2.SecurityProfile(),
        "capabilities": api_pb2.Capability(add_capabilities=["SYS_ADMIN"]),
    }
    assert actions_for(seccomp_of(rootfs, sc), "bpf") == ["SCMP_ACT_ALLOW"]
    # Clamped first: a capability the daemon lacks does not open its syscalls.
    lacking = host_facts(capabilities=frozenset(DEFAULT))
    assert actions_for(build(rootfs, sc=sc, host=lacking).document["linux"]["seccomp"], "bpf") == [
        "SCMP_ACT_ERRNO"
    ]


def test_localhost_profiles(rootfs: Path, tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}))
    local = {"seccomp": profile(api_pb2.SecurityProfile.Localhost, str(path))}
    assert seccomp_of(rootfs, local) == {"defaultAction": "SCMP_ACT_ALLOW"}
    assert seccomp_of(rootfs, {"seccomp_profile_path": f"localhost/{path}"}) == {
        "defaultAction": "SCMP_ACT_ALLOW"
    }
    # A rewritten file is read again (the parse cache is keyed by the file's identity).
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_LOG"}))
    os.utime(path, ns=(1, 1))
    assert seccomp_of(rootfs, local) == {"defaultAction": "SCMP_ACT_LOG"}


@needs_profile
def test_the_default_profile_is_parsed_once() -> None:
    assert seccomp.load(SECCOMP_JSON) is seccomp.load(SECCOMP_JSON)


SECRET = "s3cr3t-content"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        ("[]", "not a JSON object"),
        (json.dumps({"defaultAction": SECRET}), "defaultAction is not a supported seccomp action"),
        (json.dumps({"defaultAction": "SCMP_ACT_NOTIFY"}), "defaultAction is not a supported"),
        (json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": SECRET}), "listener"),
        (
            json.dumps(
                {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86"], "archMap": [{}]}
            ),
            "both architectures and archMap",
        ),
        (json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "architectures": [SECRET]}), "architectures\\[0\\]"),
        (json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}}), "syscalls is not a list"),
        (
            json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_ALLOW"}]}),
            "names no syscall",
        ),
        (
            json.dumps(
                {
                    "defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [{"names": [SECRET + "!"], "action": "SCMP_ACT_ALLOW"}],
                }
            ),
            "syscalls\\[0\\].names\\[0\\] is not a syscall name",
        ),
        (
            json.dumps(
                {
                    "defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [{"names": ["a"], "name": "b", "action": "SCMP_ACT_ALLOW"}],
                }
            ),
            "both name and names",
        ),
        (
            json.dumps(
                {
                    "defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [
                        {
                            "names": ["a"],
                            "action": "SCMP_ACT_ALLOW",
                            "args": [{"index": True, "op": "SCMP_CMP_EQ"}],
                        }
                    ],
                }
            ),
            "args\\[0\\].index is not a whole number",
        ),
        (
            json.dumps(
                {
                    "defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [
                        {"names": ["a"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "op": SECRET}]}
                    ],
                }
            ),
            "args\\[0\\].op is not a known comparison",
        ),
        (
            json.dumps(
                {
                    "defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [{"names": ["a"], "action": "SCMP_ACT_ALLOW", "errnoRet": -1}],
                }
            ),
            "errnoRet",
        ),
        (
            json.dumps(
                {
                    "defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [
                        {"names": ["a"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": SECRET}}
                    ],
                }
            ),
            "minKernel is not MAJOR.MINOR",
        ),
    ],
)
def test_bad_localhost_profiles_name_the_file_not_its_content(
    rootfs: Path, tmp_path: Path, content: str | bytes, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(FailedPrecondition, match=message) as caught:
        seccomp_of(rootfs, {"seccomp": profile(api_pb2.SecurityProfile.Localhost, str(path))})
    assert str(path) in str(caught.value) and SECRET not in str(caught.value)


def test_localhost_files_that_are_not_profiles(rootfs: Path, tmp_path: Path) -> None:
    def attempt(path: Path) -> None:
        seccomp_of(rootfs, {"seccomp": profile(api_pb2.SecurityProfile.Localhost, str(path))})

    with pytest.raises(FailedPrecondition, match="No such file"):
        attempt(tmp_path / "missing.json")
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        attempt(tmp_path)
    os.mkfifo(tmp_path / "fifo")  # must not block the daemon
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        attempt(tmp_path / "fifo")
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(seccomp.MAX_PROFILE_BYTES + 1)
    with pytest.raises(FailedPrecondition, match="the limit is"):
        attempt(big)
