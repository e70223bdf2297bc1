"""The specs build() writes are accepted by the real runtimes (root): runc and crun
run a busybox root filesystem with them, and what the container sees inside is what
the spec says (user, groups, capabilities, seccomp, masked paths, read-only root,
resources). No pod here: node namespaces, a cgroup of the test's own."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from containertools import SECCOMP_JSON, busybox_rootfs, container, container_config, host_facts, pod_context

from shim._proto import api_pb2
from shim.containers import capabilities, mounts, spec, validate
from shim.sandbox_record import NamespaceMode

pytestmark = pytest.mark.root

CGROUP_ROOT = Path("/sys/fs/cgroup")
# crun refuses the hybrid layout unless /sys/fs/cgroup/unified is gone from its view
# (DESIGN.md): its create runs in a private mount namespace without that mount.
CRUN_WRAPPER = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "--",
    "sh",
    "-c",
    'if mountpoint -q /sys/fs/cgroup/unified; then umount /sys/fs/cgroup/unified; fi; exec "$@"',
    "sh",
]
SCRIPT = """
echo "== id"; id
echo "== status"; grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs):' /proc/self/status
echo "== mountinfo"; cat /proc/self/mountinfo
echo "== kcore"; if [ -e /proc/kcore ]; then wc -c < /proc/kcore; else echo absent; fi
echo "== keys"; wc -c < /proc/keys
echo "== rootfs"; if touch /probe 2>/dev/null; then echo rw; else echo ro; fi
echo "== data"; if touch /data/probe 2>/dev/null; then echo rw; else echo ro; fi
echo "== nofile"; ulimit -n
echo "== memory"; cat /sys/fs/cgroup/memory/memory.limit_in_bytes
echo "== hostname"; echo "$HOSTNAME"
echo "== cwd"; pwd
"""


@dataclass
class Seen:
    """What the container printed, by section."""

    sections: dict[str, list[str]]

    @classmethod
    def parse(cls, stdout: str) -> Seen:
        sections: dict[str, list[str]] = {}
        current = ""
        for line in stdout.splitlines():
            if line.startswith("== "):
                current = line[3:]
                sections[current] = []
            elif current:
                sections[current].append(line)
        return cls(sections)

    def one(self, name: str) -> str:
        (line,) = self.sections[name]
        return line

    def status(self, key: str) -> str:
        return next(
            line.split(":", 1)[1].strip() for line in self.sections["status"] if line.startswith(key + ":")
        )

    def mount_options(self) -> dict[str, str]:
        """Mount point -> its per-mount options, from the container's mountinfo."""
        return {
            mounts._unescape(fields[4]): fields[5]
            for fields in (line.split(" ") for line in self.sections["mountinfo"])
        }


def remove_cgroup(path: str) -> None:
    """The container's cgroup in every hierarchy: the runtime's delete may leave some."""
    for hierarchy in CGROUP_ROOT.iterdir():
        directory = hierarchy / path.lstrip("/")
        deadline = time.monotonic() + 5
        while directory.is_dir():
            try:
                directory.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture
def cgroup() -> Iterator[str]:
    path = f"/pyshim-spec-test-{secrets.token_hex(4)}"
    try:
        yield path
    finally:
        remove_cgroup(path)
    assert not any((h / path.lstrip("/")).exists() for h in CGROUP_ROOT.iterdir()), "cgroup left behind"


def run(runtime: str, tmp_path: Path, built: spec.BuiltSpec) -> subprocess.CompletedProcess[str]:
    """`RUNTIME run` in the foreground: the container's stdout comes back here."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(built.document))
    state = tmp_path / "state"
    cid = f"pyshim-spec-{secrets.token_hex(4)}"
    argv = [shutil.which(runtime) or runtime, "--root", str(state), "run", "--bundle", str(bundle), cid]
    if runtime == "crun":
        argv = [*CRUN_WRAPPER, *argv]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=bundle)
    finally:
        subprocess.run(
            [runtime, "--root", str(state), "delete", "--force", cid], capture_output=True, timeout=30
        )


def build_for(rootfs: Path, cgroup: str, config: api_pb2.ContainerConfig) -> spec.BuiltSpec:
    """A spec that joins nothing: node network and IPC, a pid namespace of its own."""
    pod = pod_context(
        network=NamespaceMode.NODE,
        ipc=NamespaceMode.NODE,
        pid=NamespaceMode.NODE,
        namespaces={},
        files={},
        shm="",
        hostname="",
    )
    checked = validate.container_spec(api_pb2.CreateContainerRequest(pod_sandbox_id="ab" * 32, config=config))
    mounts.prepare_host(checked.config)
    host = spec.HostFacts.detect(frozenset({"cpu", "cpuacct", "cpuset", "memory", "pids", "devices"}), False)
    return spec.build(checked, pod, container(rootfs, cgroups_path=cgroup), host)


def config_for(tmp_path: Path, **sc: object) -> api_pb2.ContainerConfig:
    return container_config(
        command=["sh", "-c", SCRIPT],
        working_dir="/work/dir",
        mounts=[
            api_pb2.Mount(
                container_path="/data",
                host_path=str(tmp_path / "data"),
                readonly=True,
                recursive_read_only=True,
            )
        ],
        resources={"memory_limit_in_bytes": 64 << 20, "cpu_shares": 256},
        sc={
            "namespace_options": api_pb2.NamespaceOption(
                pid=api_pb2.CONTAINER, network=api_pb2.NODE, ipc=api_pb2.NODE
            ),
            **sc,
        },
    )


RUNTIMES = [
    pytest.param(r, marks=pytest.mark.skipif(shutil.which(r) is None, reason=f"{r} is not installed"))
    for r in ("runc", "crun")
]


@pytest.mark.skipif(not SECCOMP_JSON.exists(), reason="golang-github-containers-common missing")
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_confined_non_root_container(runtime: str, tmp_path: Path, cgroup: str) -> None:
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    config = config_for(
        tmp_path,
        run_as_username="app",
        supplemental_groups=[3000],
        readonly_rootfs=True,
        seccomp=api_pb2.SecurityProfile(),  # RuntimeDefault
        no_new_privs=True,
    )
    built = build_for(rootfs, cgroup, config)
    done = run(runtime, tmp_path, built)
    assert done.returncode == 0, done.stderr
    seen = Seen.parse(done.stdout)
    assert (
        seen.one("id")
        # The kernel sorts the group list.
        == "uid=1000(app) gid=1000(app) groups=1000(app),1001(app2),2000(extra),2001(more),3000"
    )
    assert int(seen.status("CapBnd"), 16) == capabilities.to_mask(capabilities.DEFAULT)
    assert int(seen.status("CapEff"), 16) == 0  # a non-root user keeps no capability across exec
    assert seen.status("Seccomp") == "2" and seen.status("NoNewPrivs") == "1"
    options = seen.mount_options()
    for path in built.document["linux"]["maskedPaths"]:
        assert path in options or not os.path.exists(path), f"{path} is not masked"
    assert "/proc/keys" in options and seen.one("keys") == "0"
    assert seen.one("kcore") == ("0" if os.path.exists("/proc/kcore") else "absent")
    assert options["/proc/sys"].startswith("ro")
    assert options["/"].startswith("ro") and seen.one("rootfs") == "ro"
    assert seen.one("data") == "ro"
    assert options["/sys"].startswith("ro")
    assert seen.one("nofile") == str(min(1048576, dict(host_facts_now().hard_limits)["RLIMIT_NOFILE"]))
    assert seen.one("memory") == str(64 << 20)
    assert seen.one("hostname") == os.uname().nodename
    assert seen.one("cwd") == "/work/dir" and (rootfs / "work" / "dir").is_dir()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_an_unconfined_root_container_with_added_capabilities(
    runtime: str, tmp_path: Path, cgroup: str
) -> None:
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    config = config_for(
        tmp_path,
        capabilities=api_pb2.Capability(add_capabilities=["NET_ADMIN"], drop_capabilities=["CHOWN"]),
        seccomp=api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Unconfined),
    )
    built = build_for(rootfs, cgroup, config)
    done = run(runtime, tmp_path, built)
    assert done.returncode == 0, done.stderr
    seen = Seen.parse(done.stdout)
    assert seen.one("id") == "uid=0(root) gid=0(root) groups=0(root)"
    expected = capabilities.to_mask((set(capabilities.DEFAULT) | {"CAP_NET_ADMIN"}) - {"CAP_CHOWN"})
    assert int(seen.status("CapEff"), 16) == int(seen.status("CapBnd"), 16) == expected
    assert seen.status("Seccomp") == "0" and seen.status("NoNewPrivs") == "0"
    assert seen.one("rootfs") == "rw" and (rootfs / "probe").exists()
    assert seen.one("data") == "ro"  # recursive read-only, even for root


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_privileged_container(runtime: str, tmp_path: Path, cgroup: str) -> None:
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    config = config_for(tmp_path, privileged=True, seccomp=api_pb2.SecurityProfile())
    built = build_for(rootfs, cgroup, config)
    done = run(runtime, tmp_path, built)
    assert done.returncode == 0, done.stderr
    seen = Seen.parse(done.stdout)
    assert int(seen.status("CapEff"), 16) == capabilities.to_mask(host_facts_now().capabilities)
    assert seen.status("Seccomp") == "0"  # privileged: unconfined, whatever was asked
    options = seen.mount_options()
    assert "/proc/keys" not in options and options["/sys"].startswith("rw")
    assert {d["path"] for d in built.document["linux"]["devices"]} >= {"/dev/null", "/dev/zero"}


def host_facts_now() -> spec.HostFacts:
    return spec.HostFacts.detect(frozenset(), False)


def test_a_private_host_mount_is_made_shared_for_bidirectional(tmp_path: Path) -> None:
    """ensure_propagation on a tmpfs of the test's own (isolate.sh gives each suite a
    private mount namespace, so the node's mounts are never touched)."""
    target = tmp_path / "mnt"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], check=True)
    try:
        subprocess.run(["mount", "--make-private", str(target)], check=True)
        (target / "sub").mkdir()

        def state() -> mounts.MountPoint:
            with open("/proc/self/mountinfo") as f:
                return mounts.holding(str(target / "sub"), mounts.parse_mountinfo(f.read()))

        assert state() == mounts.MountPoint(str(target), shared=False, slave=False)
        mounts.ensure_propagation(str(target / "sub"), api_pb2.PROPAGATION_HOST_TO_CONTAINER)
        assert state().shared
        mounts.ensure_propagation(str(target / "sub"), api_pb2.PROPAGATION_BIDIRECTIONAL)  # already: nothing
        assert state().shared
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", str(target)], check=True)


def test_host_facts_here() -> None:
    facts = host_facts_now()
    # Root on these machines: every capability but CAP_SYS_RESOURCE (DESIGN.md).
    assert "CAP_SYS_ADMIN" in facts.capabilities
    assert facts.can_lower_oom_score == ("CAP_SYS_RESOURCE" in facts.capabilities)
    assert facts == spec.HostFacts.detect(frozenset(), False)
    assert host_facts()  # the unit tests' idea of this node still builds
