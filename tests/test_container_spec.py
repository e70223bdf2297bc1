"""spec.build without root: every rule of "The OCI spec pyshim writes", on a fake root
filesystem in tmp_path (its own /etc/passwd and /etc/group, hostile symlinks)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from spectools import (
    CONTAINER_ID,
    SANDBOX_ID,
    SECCOMP_JSON,
    build,
    container,
    container_config,
    host_facts,
    make_rootfs,
    pod_context,
)

from shim._proto import api_pb2
from shim.containers import capabilities, mounts, rootpath, spec, users
from shim.containers.host import status_masks
from shim.containers.process import DEFAULT_PATH
from shim.errors import FailedPrecondition, InvalidArgument
from shim.images.store import ImageConfig
from shim.sandbox_record import NamespaceMode

POD, CONTAINER, NODE, TARGET = (
    NamespaceMode.POD,
    NamespaceMode.CONTAINER,
    NamespaceMode.NODE,
    NamespaceMode.TARGET,
)


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return make_rootfs(tmp_path / "rootfs")


def doc(built: spec.BuiltSpec) -> dict[str, Any]:
    return built.document


def destinations(built: spec.BuiltSpec) -> list[str]:
    return [m["destination"] for m in built.document["mounts"]]


def mount_at(built: spec.BuiltSpec, destination: str) -> dict[str, Any]:
    (found,) = [m for m in built.document["mounts"] if m["destination"] == destination]
    return found


# ---- the document as a whole -------------------------------------------------------------


def test_document_is_json_with_the_fixed_parts(rootfs: Path) -> None:
    built = build(rootfs)
    document = json.loads(json.dumps(built.document))  # plain JSON: no tuples, paths or bytes
    assert document == built.document
    assert document["ociVersion"] == "1.0.2"
    assert document["root"] == {"path": str(rootfs), "readonly": False}
    assert document["linux"]["cgroupsPath"] == f"/kubepods/pod-x/{CONTAINER_ID}"
    assert document["annotations"]["io.kubernetes.cri.sandbox-id"] == SANDBOX_ID
    assert "sysctl" not in document["linux"]  # the pod's (the pause set them)
    assert "umask" not in document["process"]["user"]


def test_request_annotations_never_reach_the_runtime(rootfs: Path) -> None:
    # crun acts on run.oci.* annotations: a request must not be able to set them.
    built = build(rootfs, annotations={"run.oci.keep_original_groups": "1"})
    assert "run.oci.keep_original_groups" not in built.document["annotations"]


def test_readonly_rootfs(rootfs: Path) -> None:
    assert build(rootfs, sc={"readonly_rootfs": True}).document["root"]["readonly"] is True


def test_no_hostname_anywhere(rootfs: Path) -> None:
    # The UTS namespace is the pod's: a hostname in the spec would rename the pod.
    for mode in (POD, NODE):
        document = build(rootfs, pod=pod_context(network=mode)).document
        assert "hostname" not in document
        assert "hostname" not in json.dumps(document["process"])


# ---- namespaces -----------------------------------------------------------------------------


def ns(built: spec.BuiltSpec) -> dict[str, str | None]:
    return {n["type"]: n.get("path") for n in built.document["linux"]["namespaces"]}


def namespace_options(**modes: int) -> dict[str, Any]:
    return {"namespace_options": api_pb2.NamespaceOption(**modes)}


def test_pod_namespaces_are_joined_by_their_pins(rootfs: Path) -> None:
    built = build(rootfs, sc=namespace_options(pid=api_pb2.POD))
    assert ns(built) == {
        "mount": None,
        "network": "/run/pods/x/net",
        "ipc": "/run/pods/x/ipc",
        "uts": "/run/pods/x/uts",
        "pid": "/run/pods/x/pid",
    }


def test_container_pid_mode_gets_a_new_pid_namespace(rootfs: Path) -> None:
    namespaces = ns(
        build(rootfs, pod=pod_context(pid=CONTAINER), sc=namespace_options(pid=api_pb2.CONTAINER))
    )
    assert "pid" in namespaces and namespaces["pid"] is None


def test_node_modes_join_nothing(rootfs: Path) -> None:
    pod = pod_context(network=NODE, ipc=NODE, pid=NODE)
    built = build(rootfs, pod=pod, sc=namespace_options(network=NODE, ipc=NODE, pid=api_pb2.NODE))
    assert ns(built) == {"mount": None}


def test_pod_pid_mode_in_a_host_pid_pod_is_the_node(rootfs: Path) -> None:
    assert "pid" not in ns(build(rootfs, pod=pod_context(pid=NODE), sc=namespace_options(pid=api_pb2.POD)))


def test_pod_pid_mode_in_a_pod_that_shares_none_is_a_new_one(rootfs: Path) -> None:
    built = build(rootfs, pod=pod_context(pid=CONTAINER), sc=namespace_options(pid=api_pb2.POD))
    assert {"type": "pid"} in built.document["linux"]["namespaces"]


def test_target_pid_mode_joins_the_target(rootfs: Path) -> None:
    ctr = container(rootfs, target_pid_namespace="/proc/4242/ns/pid")
    sc = namespace_options(pid=api_pb2.TARGET, target_id="ef" * 32)
    assert ns(build(rootfs, ctr=ctr, pod=pod_context(pid=CONTAINER), sc=sc))["pid"] == "/proc/4242/ns/pid"
    with pytest.raises(FailedPrecondition, match="TARGET"):
        build(rootfs, pod=pod_context(pid=CONTAINER), sc=sc)


@pytest.mark.parametrize(
    ("pod", "sc", "message"),
    [
        (pod_context(pid=POD), namespace_options(pid=api_pb2.NODE), "node's pid namespace"),
        (pod_context(namespaces={}), {}, "no pinned net namespace"),
        (pod_context(namespaces={"net": "/n", "ipc": "/i", "pid": "/p"}), {}, "no pinned uts namespace"),
        (pod_context(namespaces={"net": "/n", "uts": "/u", "pid": "/p"}), {}, "no pinned ipc namespace"),
    ],
)
def test_namespaces_the_pod_does_not_have(
    rootfs: Path, pod: spec.PodContext, sc: dict[str, Any], message: str
) -> None:
    with pytest.raises(FailedPrecondition, match=message):
        build(rootfs, pod=pod, sc=sc)


def test_the_pod_decides_network_and_ipc(rootfs: Path) -> None:
    # A container config saying NODE cannot take a container out of its pod's network.
    built = build(rootfs, sc=namespace_options(network=NODE, ipc=NODE))
    assert ns(built)["network"] == "/run/pods/x/net" and ns(built)["ipc"] == "/run/pods/x/ipc"


def test_cgroup_namespace_on_cgroup_v2_only(rootfs: Path) -> None:
    assert "cgroup" not in ns(build(rootfs))
    assert "cgroup" in ns(build(rootfs, host=host_facts(cgroup_v2=True)))


# ---- process: args, env, cwd ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "entrypoint", "cmd", "expected"),
    [
        ([], [], ("/entry",), ("cmd1", "cmd2"), ["/entry", "cmd1", "cmd2"]),
        (["/bin/x"], [], ("/entry",), ("cmd1",), ["/bin/x"]),  # the image's Cmd is dropped too
        (["/bin/x"], ["a"], ("/entry",), ("cmd1",), ["/bin/x", "a"]),
        ([], ["a", "b"], ("/entry",), ("cmd1",), ["/entry", "a", "b"]),
        ([], ["a"], (), ("cmd1",), ["a"]),
        ([], [], (), ("sh", "-c", "x"), ["sh", "-c", "x"]),
        ([], [], ("",), ("sh",), ["sh"]),  # Entrypoint [""] means none
        ([], [], ("/entry",), (), ["/entry"]),
    ],
)
def test_args_merge_with_the_image(
    rootfs: Path,
    command: list[str],
    args: list[str],
    entrypoint: tuple[str, ...],
    cmd: tuple[str, ...],
    expected: list[str],
) -> None:
    built = build(rootfs, command=command, args=args, image=ImageConfig(entrypoint=entrypoint, cmd=cmd))
    assert built.document["process"]["args"] == expected


def test_nothing_to_run(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="no command"):
        build(rootfs, command=[], image=ImageConfig())


def env_of(built: spec.BuiltSpec) -> list[str]:
    return list(built.document["process"]["env"])


@pytest.mark.parametrize(
    ("image_env", "envs", "expected"),
    [
        (
            (),
            {},
            [DEFAULT_PATH, "HOSTNAME=pod-host"],
        ),
        (("PATH=/opt/bin", "A=1"), {}, ["PATH=/opt/bin", "A=1", "HOSTNAME=pod-host"]),
        (
            ("PATH=/opt/bin", "A=1"),
            {"A": b"2", "B": b"x=y"},
            ["PATH=/opt/bin", "A=2", "HOSTNAME=pod-host", "B=x=y"],
        ),
        (("A=1",), {"PATH": b"/mine"}, ["PATH=/mine", "A=1", "HOSTNAME=pod-host"]),
        (("A=1", "A"), {}, [DEFAULT_PATH, "HOSTNAME=pod-host"]),  # "A" alone unsets A
        (("HOSTNAME=image",), {"HOSTNAME": b"mine"}, [DEFAULT_PATH, "HOSTNAME=mine"]),
        (("E=",), {"F": b""}, [DEFAULT_PATH, "E=", "HOSTNAME=pod-host", "F="]),
    ],
)
def test_env_merges_image_and_container(
    rootfs: Path, image_env: tuple[str, ...], envs: dict[str, bytes], expected: list[str]
) -> None:
    config = container_config(envs=[api_pb2.KeyValue(key=k, value=v) for k, v in envs.items()])
    assert env_of(build(rootfs, config, image=ImageConfig(env=image_env))) == expected


def test_hostname_env_of_a_host_network_pod_is_the_node(rootfs: Path) -> None:
    built = build(rootfs, pod=pod_context(network=NODE, hostname=""))
    assert f"HOSTNAME={os.uname().nodename}" in env_of(built)


@pytest.mark.parametrize(
    ("working_dir", "image_dir", "expected"),
    [
        ("", "", "/"),
        ("/srv/app", "/image", "/srv/app"),
        ("", "/image/dir", "/image/dir"),
        ("", "rel", "/rel"),
    ],
)
def test_cwd(rootfs: Path, working_dir: str, image_dir: str, expected: str) -> None:
    built = build(rootfs, working_dir=working_dir, image=ImageConfig(working_dir=image_dir))
    assert built.document["process"]["cwd"] == expected
    assert (rootfs / expected.lstrip("/")).is_dir()  # made in the rootfs when missing


def test_cwd_and_volumes_are_made_inside_the_rootfs_only(rootfs: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (rootfs / "escape").symlink_to("../../../../outside")  # climbs above the root: clamped
    (rootfs / "abs").symlink_to(str(outside))  # an absolute host path: taken inside the root
    image = ImageConfig(volumes=("/escape/vol", "/abs/vol", "data"), working_dir="/escape/work")
    build(rootfs, image=image)
    assert not outside.exists()
    assert (rootfs / "outside" / "vol").is_dir() and (rootfs / "outside" / "work").is_dir()
    assert (rootfs / str(outside).lstrip("/") / "vol").is_dir()
    assert (rootfs / "data").stat().st_mode & 0o7777 == 0o755


def test_tty_sets_terminal(rootfs: Path) -> None:
    assert build(rootfs, tty=True, stdin=True).document["process"]["terminal"] is True
    assert build(rootfs).document["process"]["terminal"] is False


def test_no_new_privs(rootfs: Path) -> None:
    assert build(rootfs, sc={"no_new_privs": True}).document["process"]["noNewPrivileges"] is True
    assert build(rootfs).document["process"]["noNewPrivileges"] is False


@pytest.mark.parametrize(("hard", "expected"), [(20000, 20000), (4 * 1048576, 1048576)])
def test_nofile_is_clamped_to_the_daemons_hard_limit(rootfs: Path, hard: int, expected: int) -> None:
    built = build(rootfs, host=host_facts(hard_limits=(("RLIMIT_NOFILE", hard),)))
    assert built.document["process"]["rlimits"] == [
        {"type": "RLIMIT_NOFILE", "hard": expected, "soft": expected}
    ]


@pytest.mark.parametrize(
    ("asked", "can_lower", "expected"),
    [(1000, False, 1000), (-998, False, 0), (-998, True, -998), (0, False, 0)],
)
def test_oom_score_adj(rootfs: Path, asked: int, can_lower: bool, expected: int) -> None:
    built = build(rootfs, resources={"oom_score_adj": asked}, host=host_facts(can_lower_oom_score=can_lower))
    assert built.document["process"]["oomScoreAdj"] == expected
    assert any("oom_score_adj" in n for n in built.notes) == (asked != expected)


# ---- users --------------------------------------------------------------------------------


def user_of(built: spec.BuiltSpec) -> tuple[int, int, tuple[int, ...], str]:
    u = built.document["process"]["user"]
    assert (u["uid"], u["gid"], tuple(u["additionalGids"])) == (built.uid, built.gid, built.additional_gids)
    return built.uid, built.gid, built.additional_gids, built.username


def int64(value: int) -> api_pb2.Int64Value:
    return api_pb2.Int64Value(value=value)


@pytest.mark.parametrize(
    ("sc", "image_user", "expected"),
    [
        ({}, "", (0, 0, (0,), "root")),
        ({}, "app", (1000, 1000, (1000, 2000, 2001, 1001), "app")),
        ({}, "1000", (1000, 1000, (1000, 2000, 2001, 1001), "app")),
        ({}, "app:web", (1000, 33, (33, 2000, 2001, 1001), "app")),
        ({}, "app:7", (1000, 7, (7, 2000, 2001, 1001), "app")),
        ({}, "4242", (4242, 0, (0,), "")),  # not in /etc/passwd: group 0, no groups
        ({}, "4242:4343", (4242, 4343, (4343,), "")),
        ({"run_as_user": int64(33)}, "app", (33, 33, (33, 2000), "web")),
        ({"run_as_user": int64(0)}, "app", (0, 0, (0,), "root")),  # kubelet's "image user is root"
        ({"run_as_user": int64(1000), "run_as_group": int64(5)}, "", (1000, 5, (5, 2000, 2001, 1001), "app")),
        ({"run_as_username": "web"}, "app", (33, 33, (33, 2000), "web")),
        ({"run_as_username": "web", "run_as_user": int64(1000)}, "", (33, 33, (33, 2000), "web")),
        (
            {"run_as_user": int64(1000), "supplemental_groups": [9, 2000]},
            "",
            (1000, 1000, (1000, 2000, 2001, 1001, 9), "app"),
        ),
        (
            {
                "run_as_user": int64(1000),
                "supplemental_groups": [9],
                "supplemental_groups_policy": api_pb2.Strict,
            },
            "",
            (1000, 1000, (1000, 9), "app"),
        ),
    ],
)
def test_users(rootfs: Path, sc: dict[str, Any], image_user: str, expected: tuple[Any, ...]) -> None:
    assert user_of(build(rootfs, sc=sc, image=ImageConfig(user=image_user))) == expected


@pytest.mark.parametrize(
    ("sc", "image_user", "message"),
    [
        ({"run_as_username": "nobody"}, "", "user 'nobody' is not in the image's /etc/passwd"),
        ({}, "ghost", "user 'ghost' is not in the image's /etc/passwd"),
        ({}, "app:ghosts", "group 'ghosts' is not in the image's /etc/group"),
        ({}, "app:", "not user\\[:group\\]"),
        ({}, "a:b:c", "not user\\[:group\\]"),
        ({}, "99999999999", "out of range"),
    ],
)
def test_unknown_users(rootfs: Path, sc: dict[str, Any], image_user: str, message: str) -> None:
    with pytest.raises(FailedPrecondition, match=message):
        build(rootfs, sc=sc, image=ImageConfig(user=image_user))


def test_passwd_symlink_to_the_hosts_files_is_read_inside_the_rootfs(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    host_file = tmp_path / "host-passwd"
    host_file.write_text("evil:x:0:0::/:/bin/sh\n")
    (rootfs / "etc" / "passwd").symlink_to(str(host_file))  # absolute: resolved from the rootfs
    (rootfs / "etc" / "group").symlink_to("../../../../../../" + str(host_file))  # climbs: clamped
    with pytest.raises(FailedPrecondition, match="'evil' is not in the image's /etc/passwd"):
        build(rootfs, sc={"run_as_username": "evil"})
    # The same link target, made inside the rootfs, is what counts.
    inside = rootfs / str(host_file).lstrip("/")
    inside.parent.mkdir(parents=True)
    inside.write_text("evil:x:7:7::/:/bin/sh\n")
    assert user_of(build(rootfs, sc={"run_as_username": "evil"}))[:2] == (7, 7)


def test_etc_as_a_symlink_to_root(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "etc").symlink_to("/")
    (rootfs / "passwd").write_text("x:x:5:6::/:/bin/sh\n")
    assert user_of(build(rootfs, sc={"run_as_username": "x"}))[:2] == (5, 6)


def test_hostile_passwd_files(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    os.mkfifo(rootfs / "etc" / "passwd")  # would block a plain open()
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        build(rootfs, sc={"run_as_username": "app"})
    (rootfs / "etc" / "passwd").unlink()
    (rootfs / "etc" / "passwd").symlink_to("passwd")  # a loop
    with pytest.raises(FailedPrecondition, match="symbolic links"):
        build(rootfs, sc={"run_as_username": "app"})
    (rootfs / "etc" / "passwd").unlink()
    with open(rootfs / "etc" / "passwd", "wb") as f:
        f.truncate(users.MAX_ID_FILE + 1)
    with pytest.raises(FailedPrecondition, match="limit"):
        build(rootfs, sc={"run_as_username": "app"})


def test_no_passwd_file_is_fine_for_numeric_users(tmp_path: Path) -> None:
    rootfs = tmp_path / "empty"
    rootfs.mkdir()
    assert user_of(build(rootfs, image=ImageConfig(user="1234:5678"))) == (1234, 5678, (5678,), "")
    with pytest.raises(FailedPrecondition):
        build(rootfs, image=ImageConfig(user="app"))


def test_malformed_passwd_lines_are_skipped() -> None:
    text = "+nis::0:0\n#c:x:1:1\nbad\nx:x:notnum:1\nok:x:3:4:g:/:/bin/sh\n"
    assert users.parse_passwd(text) == [users.PasswdEntry("ok", 3, 4)]
    assert users.parse_group("g:x:5:a,,b\nbad:x\n") == [users.GroupEntry("g", 5, ("a", "b"))]


def test_rootpath_reads_and_makes_inside_only(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "file").write_text("x")
    assert rootpath.read_file(rootfs, "/../../file", 10) == b"x"
    assert rootpath.read_file(rootfs, "/missing", 10) is None
    with pytest.raises(FailedPrecondition, match="Not a directory"):
        rootpath.make_dirs(rootfs, "/file/sub")
    with pytest.raises(FailedPrecondition, match="directory"):
        rootpath.read_file(rootfs, "/", 10)
    with pytest.raises(FailedPrecondition):
        rootpath.read_file(rootfs, "/file/x", 10)


# ---- capabilities -------------------------------------------------------------------------


def caps_of(built: spec.BuiltSpec) -> set[str]:
    c = built.document["process"]["capabilities"]
    assert c["bounding"] == c["effective"] == c["permitted"]
    return set(c["bounding"])


DEFAULT = set(capabilities.DEFAULT)
HOST = host_facts().capabilities


@pytest.mark.parametrize(
    ("add", "drop", "expected"),
    [
        ([], [], DEFAULT),
        (["NET_ADMIN"], ["CHOWN"], (DEFAULT | {"CAP_NET_ADMIN"}) - {"CAP_CHOWN"}),
        (["cap_sys_ptrace", "CAP_NET_ADMIN"], [], DEFAULT | {"CAP_SYS_PTRACE", "CAP_NET_ADMIN"}),
        (["ALL"], [], HOST),
        (["ALL"], ["SYS_ADMIN"], HOST - {"CAP_SYS_ADMIN"}),
        ([], ["ALL"], set()),
        (["NET_BIND_SERVICE"], ["ALL"], {"CAP_NET_BIND_SERVICE"}),
        (["ALL"], ["ALL"], set()),
        (["NET_ADMIN"], ["NET_ADMIN"], DEFAULT),
        (["SYS_RESOURCE"], [], DEFAULT),  # the daemon lacks it: clamped
    ],
)
def test_capabilities_add_and_drop(rootfs: Path, add: list[str], drop: list[str], expected: set[str]) -> None:
    sc = {"capabilities": api_pb2.Capability(add_capabilities=add, drop_capabilities=drop)}
    built = build(rootfs, sc=sc)
    assert caps_of(built) == expected
    assert built.document["process"]["capabilities"]["inheritable"] == []
    assert any("CAP_SYS_RESOURCE" in n for n in built.notes) == ("SYS_RESOURCE" in add)


def test_privileged_gets_what_the_host_has(rootfs: Path) -> None:
    sc = {"privileged": True, "capabilities": api_pb2.Capability(drop_capabilities=["ALL"])}
    assert caps_of(build(rootfs, sc=sc)) == HOST
    few = frozenset({"CAP_CHOWN", "CAP_KILL"})
    assert caps_of(build(rootfs, sc={"privileged": True}, host=host_facts(capabilities=few))) == few
    assert caps_of(build(rootfs, host=host_facts(capabilities=few))) == few


def test_ambient_capabilities(rootfs: Path) -> None:
    sc = {"capabilities": api_pb2.Capability(add_ambient_capabilities=["NET_ADMIN"])}
    c = build(rootfs, sc=sc).document["process"]["capabilities"]
    assert c["ambient"] == c["inheritable"] == ["CAP_NET_ADMIN"]
    assert "CAP_NET_ADMIN" in c["bounding"]


def test_capability_masks() -> None:
    masks = status_masks("CapBnd:\t000001fffeffffff\nCapEff:\t0000000000000001\nName:\tx\n")
    assert capabilities.from_mask(masks["CapBnd"]) == frozenset(capabilities.NAMES) - {"CAP_SYS_RESOURCE"}
    assert capabilities.from_mask(masks["CapEff"]) == {"CAP_CHOWN"}
    assert capabilities.from_mask(1 << 45 | 1) == {"CAP_CHOWN"}  # unknown bits are left out
    assert capabilities.to_mask(("CAP_CHOWN", "CAP_KILL")) == 0b100001
    assert len(capabilities.NAMES) == 41 and capabilities.NAMES[40] == "CAP_CHECKPOINT_RESTORE"


# ---- masked and read-only paths, AppArmor, SELinux --------------------------------------------


def test_masked_and_readonly_paths(rootfs: Path) -> None:
    linux = build(rootfs).document["linux"]
    assert "/proc/kcore" in linux["maskedPaths"] and "/sys/firmware" in linux["maskedPaths"]
    assert "/proc/sys" in linux["readonlyPaths"]
    own = build(rootfs, sc={"masked_paths": ["/proc/x"], "readonly_paths": ["/proc/y"]}).document["linux"]
    assert (own["maskedPaths"], own["readonlyPaths"]) == (["/proc/x"], ["/proc/y"])
    privileged = build(rootfs, sc={"privileged": True, "masked_paths": ["/proc/x"]}).document["linux"]
    assert (privileged["maskedPaths"], privileged["readonlyPaths"]) == ([], [])


def test_apparmor(rootfs: Path) -> None:
    local = {
        "apparmor": api_pb2.SecurityProfile(
            profile_type=api_pb2.SecurityProfile.Localhost, localhost_ref="p1"
        )
    }
    assert "apparmorProfile" not in build(rootfs, sc=local).document["process"]  # no AppArmor here
    enabled = host_facts(apparmor=True)
    assert build(rootfs, sc=local, host=enabled).document["process"]["apparmorProfile"] == "p1"
    old = {"apparmor_profile": "localhost/p2"}
    assert build(rootfs, sc=old, host=enabled).document["process"]["apparmorProfile"] == "p2"
    assert (
        "apparmorProfile"
        not in build(rootfs, sc={"apparmor": api_pb2.SecurityProfile()}, host=enabled).document["process"]
    )


def test_selinux_options_are_ignored_with_a_note(rootfs: Path) -> None:
    built = build(rootfs, sc={"selinux_options": api_pb2.SELinuxOption(type="spc_t")})
    assert "spc_t" not in json.dumps(built.document) and "selinuxLabel" not in built.document["process"]
    assert any("selinux" in n for n in built.notes)


# ---- mounts -------------------------------------------------------------------------------


STANDARD = ["/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup"]
POD_FILES = ["/dev/shm", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf"]


def test_mounts_in_containerds_order(rootfs: Path) -> None:
    built = build(rootfs)
    assert destinations(built) == STANDARD + POD_FILES
    assert "ro" in mount_at(built, "/sys")["options"] and "ro" in mount_at(built, "/sys/fs/cgroup")["options"]
    assert mount_at(built, "/dev/shm")["source"] == "/run/pods/x/shm"
    assert mount_at(built, "/etc/resolv.conf") == {
        "destination": "/etc/resolv.conf",
        "type": "bind",
        "source": "/run/pods/x/resolv.conf",
        "options": ["rbind", "rprivate", "rw"],
    }


def test_privileged_sys_is_writable(rootfs: Path) -> None:
    built = build(rootfs, sc={"privileged": True})
    assert "rw" in mount_at(built, "/sys")["options"] and "rw" in mount_at(built, "/sys/fs/cgroup")["options"]


def test_pod_files_follow_a_readonly_rootfs_and_node_ipc_binds_dev_shm(rootfs: Path) -> None:
    built = build(rootfs, sc={"readonly_rootfs": True}, pod=pod_context(shm="", files={"hosts": "/h"}))
    assert destinations(built) == [*STANDARD, "/dev/shm", "/etc/hosts"]
    assert "ro" in mount_at(built, "/etc/hosts")["options"]
    assert mount_at(built, "/dev/shm")["source"] == "/dev/shm"


def cri_mount(container_path: str, host_path: str, **fields: Any) -> api_pb2.Mount:
    return api_pb2.Mount(container_path=container_path, host_path=host_path, **fields)


def test_cri_mounts_come_last_shallow_first_and_win(rootfs: Path, tmp_path: Path) -> None:
    hosts = tmp_path / "kubelet-hosts"
    hosts.write_text("")
    config = container_config(
        mounts=[
            cri_mount("/data/sub", str(tmp_path)),
            cri_mount("//etc/./hosts", str(hosts), readonly=True),
            cri_mount("/data", str(tmp_path)),
        ]
    )
    built = build(rootfs, config)
    assert destinations(built) == [
        *STANDARD,
        "/dev/shm",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/data",
        "/data/sub",  # as deep as /etc/hosts, and before it in the request: stable
        "/etc/hosts",
    ]
    assert mount_at(built, "/etc/hosts") == {
        "destination": "/etc/hosts",
        "type": "bind",
        "source": str(hosts),
        "options": ["rbind", "rprivate", "ro"],
    }


def test_a_dev_mount_replaces_everything_under_dev(rootfs: Path, tmp_path: Path) -> None:
    built = build(rootfs, container_config(mounts=[cri_mount("/dev/", str(tmp_path))]))
    assert destinations(built) == [
        "/proc",
        "/sys",
        "/sys/fs/cgroup",
        "/etc/hostname",
        "/etc/hosts",
        "/etc/resolv.conf",
        "/dev",
    ]


@pytest.mark.parametrize(
    ("propagations", "option", "rootfs_propagation"),
    [
        ([api_pb2.PROPAGATION_PRIVATE], "rprivate", None),
        ([api_pb2.PROPAGATION_HOST_TO_CONTAINER], "rslave", "rslave"),
        ([api_pb2.PROPAGATION_BIDIRECTIONAL], "rshared", "rshared"),
        ([api_pb2.PROPAGATION_BIDIRECTIONAL, api_pb2.PROPAGATION_HOST_TO_CONTAINER], "rshared", "rshared"),
    ],
)
def test_propagation(
    rootfs: Path, tmp_path: Path, propagations: list[int], option: str, rootfs_propagation: str | None
) -> None:
    config = container_config(
        mounts=[cri_mount(f"/m{i}", str(tmp_path), propagation=p) for i, p in enumerate(propagations)]
    )
    built = build(rootfs, config)
    assert option in mount_at(built, "/m0")["options"]
    assert built.document["linux"].get("rootfsPropagation") == rootfs_propagation


def test_recursive_read_only(rootfs: Path, tmp_path: Path) -> None:
    config = container_config(
        mounts=[cri_mount("/ro", str(tmp_path), readonly=True, recursive_read_only=True)]
    )
    assert mount_at(build(rootfs, config), "/ro")["options"] == ["rbind", "rprivate", "ro", "rro"]
    with pytest.raises(FailedPrecondition, match="recursive read-only"):
        build(rootfs, config, host=host_facts(rro=False))


def test_host_paths_that_are_symlinks_are_resolved(rootfs: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    built = build(rootfs, container_config(mounts=[cri_mount("/x", str(tmp_path / "link"))]))
    assert mount_at(built, "/x")["source"] == str(real)


def test_prepare_host_makes_missing_host_paths(tmp_path: Path) -> None:
    missing = tmp_path / "a" / "b"
    mounts.prepare_host(container_config(mounts=[cri_mount("/x", str(missing))]))
    assert missing.is_dir()
    mounts.prepare_host(container_config(mounts=[cri_mount("/x", str(missing))]))  # idempotent


MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "30 22 0:25 / /mnt rw - tmpfs tmpfs rw\n"
    "31 30 0:26 / /mnt/slave rw master:7 - tmpfs tmpfs rw\n"
    "32 22 0:27 / /with\\040space rw shared:9 master:3 - tmpfs tmpfs rw\n"
    "33 30 0:28 / /mnt rw shared:4 - tmpfs tmpfs rw\n"
)


def test_mountinfo_and_the_mount_holding_a_path() -> None:
    parsed = mounts.parse_mountinfo(MOUNTINFO)
    assert [m.mount_point for m in parsed] == ["/", "/mnt", "/mnt/slave", "/with space", "/mnt"]
    assert mounts.holding("/etc/x", parsed) == mounts.MountPoint("/", shared=True, slave=False)
    assert mounts.holding("/mnt/slave/x", parsed) == mounts.MountPoint("/mnt/slave", shared=False, slave=True)
    assert mounts.holding("/mnt/slavery", parsed).mount_point == "/mnt"
    assert mounts.holding("/mnt/x", parsed).shared  # the later mount at /mnt covers the first
    assert mounts.holding("/with space/a", parsed) == mounts.MountPoint(
        "/with space", shared=True, slave=True
    )


def test_ensure_propagation_needs_nothing_when_shared_or_slave(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    # Every case here is satisfied already: no mount call is made (this runs without root).
    mounts.ensure_propagation("/etc", api_pb2.PROPAGATION_BIDIRECTIONAL, str(info))
    mounts.ensure_propagation("/mnt/slave/x", api_pb2.PROPAGATION_HOST_TO_CONTAINER, str(info))
    mounts.ensure_propagation("/anything", api_pb2.PROPAGATION_PRIVATE, str(tmp_path / "never-read"))


# ---- devices ---------------------------------------------------------------------------------


def device(container_path: str, host_path: str, permissions: str = "") -> api_pb2.Device:
    return api_pb2.Device(container_path=container_path, host_path=host_path, permissions=permissions)


def test_devices(rootfs: Path) -> None:
    st = os.stat("/dev/null")
    built = build(rootfs, devices=[device("/dev/mynull", "/dev/null", "rw")])
    assert built.document["linux"]["devices"] == [
        {
            "path": "/dev/mynull",
            "type": "c",
            "major": os.major(st.st_rdev),
            "minor": os.minor(st.st_rdev),
            "fileMode": st.st_mode & 0o7777,
            "uid": st.st_uid,
            "gid": st.st_gid,
        }
    ]
    assert built.document["linux"]["resources"]["devices"] == [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"},
    ]
    rules = build(rootfs, devices=[device("/dev/n", "/dev/null")]).document["linux"]["resources"]["devices"]
    assert rules[1]["access"] == "rwm"


def test_bad_devices(rootfs: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(FailedPrecondition, match="not a character or block device"):
        build(rootfs, devices=[device("/dev/x", str(tmp_path / "file"))])
    with pytest.raises(FailedPrecondition, match="No such file"):
        build(rootfs, devices=[device("/dev/x", str(tmp_path / "missing"))])
    with pytest.raises(FailedPrecondition, match="holds no device"):
        build(rootfs, devices=[device("/dev/x", str(tmp_path))])


def test_privileged_gets_every_node_device(rootfs: Path) -> None:
    built = build(rootfs, sc={"privileged": True})
    paths = {d["path"] for d in built.document["linux"]["devices"]}
    assert "/dev/null" in paths and "/dev/zero" in paths
    assert not any(p.startswith(("/dev/pts/", "/dev/shm/")) for p in paths)
    assert built.document["linux"]["resources"]["devices"] == [
        {"allow": False, "access": "rwm"},
        {"allow": True, "access": "rwm"},
    ]


# ---- resources -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "host", "expected"),
    [
        ({}, {}, {}),
        (
            {
                "cpu_shares": 512,
                "cpu_quota": 50000,
                "cpu_period": 100000,
                "cpuset_cpus": "0-1",
                "cpuset_mems": "0",
            },
            {},
            {"cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"}},
        ),
        ({"cpu_shares": 2, "cpuset_cpus": "0"}, {"controllers": frozenset({"cpu"})}, {"cpu": {"shares": 2}}),
        ({"memory_limit_in_bytes": 1 << 26}, {}, {"memory": {"limit": 1 << 26, "swap": 1 << 26}}),
        ({"memory_limit_in_bytes": 1 << 26}, {"swap_accounting": False}, {"memory": {"limit": 1 << 26}}),
        (
            {"memory_limit_in_bytes": 1 << 26, "memory_swap_limit_in_bytes": 1 << 27},
            {},
            {"memory": {"limit": 1 << 26, "swap": 1 << 27}},
        ),
        ({"memory_swap_limit_in_bytes": -1}, {}, {"memory": {"swap": -1}}),
        ({"memory_limit_in_bytes": 1 << 26}, {"controllers": frozenset()}, {}),
        ({"hugepage_limits": [api_pb2.HugepageLimit(page_size="2MB", limit=0)]}, {}, {}),
        (
            {"hugepage_limits": [api_pb2.HugepageLimit(page_size="2MB", limit=4 << 20)]},
            {"controllers": frozenset({"hugetlb"})},
            {"hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 20}]},
        ),
        ({"unified": {"memory.high": "max"}}, {}, {}),
        ({"unified": {"memory.high": "max"}}, {"cgroup_v2": True}, {"unified": {"memory.high": "max"}}),
    ],
)
def test_resources(asked: dict[str, Any], host: dict[str, Any], expected: dict[str, Any]) -> None:
    assert spec.resources(api_pb2.LinuxContainerResources(**asked), host_facts(**host)) == expected


def test_build_resources_have_device_rules_and_notes(rootfs: Path) -> None:
    hugepages = [
        api_pb2.HugepageLimit(page_size="2MB", limit=0),
        api_pb2.HugepageLimit(page_size="1GB", limit=0),
    ]
    built = build(rootfs, resources={"cpu_shares": 2, "hugepage_limits": hugepages, "unified": {"a.b": "1"}})
    assert built.document["linux"]["resources"] == {
        "cpu": {"shares": 2},
        "devices": [{"allow": False, "access": "rwm"}],
    }
    assert any("hugetlb" in n for n in built.notes) and any("cgroup v2" in n for n in built.notes)


# ---- HostFacts.detect ------------------------------------------------------------------------


def test_detect_reads_the_given_proc_and_sys(tmp_path: Path) -> None:
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "status").write_text("CapEff:\t0000000001000000\nCapBnd:\t0000000001000021\n")
    (proc / "self" / "cgroup").write_text("0::/\n")
    (sys / "module" / "apparmor" / "parameters").mkdir(parents=True)
    (sys / "module" / "apparmor" / "parameters" / "enabled").write_text("Y\n")
    (sys / "fs" / "cgroup" / "memory").mkdir(parents=True)
    (sys / "fs" / "cgroup" / "memory" / "memory.memsw.limit_in_bytes").write_text("0")
    facts = spec.HostFacts.detect(
        frozenset({"memory"}), False, proc=proc, sys=sys, seccomp_default=tmp_path / "none.json"
    )
    assert facts.capabilities == {"CAP_CHOWN", "CAP_KILL", "CAP_SYS_RESOURCE"}
    assert facts.can_lower_oom_score and facts.apparmor and facts.swap_accounting
    assert facts.seccomp_default is None and facts.controllers == {"memory"} and not facts.cgroup_v2


def test_detect_on_this_node() -> None:
    facts = spec.HostFacts.detect(frozenset({"cpu", "memory"}), False)
    assert "CAP_CHOWN" in facts.capabilities or os.geteuid() != 0
    assert dict(facts.hard_limits)["RLIMIT_NOFILE"] >= 1024
    assert facts.arch == os.uname().machine
    assert facts.seccomp_default == (SECCOMP_JSON if SECCOMP_JSON.exists() else None)
    assert facts.apparmor == Path("/sys/module/apparmor").exists()
