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
from spectools import SECCOMP_JSON, busybox_rootfs, container, container_config, host_facts, pod_context

from shim._proto import api_pb2
from shim.containers import capabilities, mounts, spec, validate
from shim.sandbox_record import NamespaceMode

pytestmark = pytest.mark.root

CGROUP_ROOT = Path("/sys/fs/cgroup")


# crun refuses the hybrid layout unless /sys/fs/cgroup/unified is gone from its view
# (DESIGN.md), so its run goes through a mount namespace of its own without that
# mount. That namespace keeps the node's propagation ("unchanged"): with "private"
# (DESIGN.md's first recipe) or even "slave", mounts would no longer travel between
# the node and the container (HOST_TO_CONTAINER, BIDIRECTIONAL). The unmount must not
# travel to the node either: it propagates through its parent, /sys/fs/cgroup, which
# is made private first (in this namespace only).
def crun_wrapper(cgroup_root: str = "/sys/fs/cgroup") -> list[str]:
    unified = f"{cgroup_root}/unified"
    return [
        "unshare",
        "--mount",
        "--propagation",
        "unchanged",
        "--",
        "sh",
        "-c",
        f'if mountpoint -q "{unified}"; then '
        f'mount --make-private "{cgroup_root}" && umount "{unified}" || exit 125; fi; '
        'exec "$@"',
        "sh",
    ]


NODE = api_pb2.NODE
SCRIPT = """
echo "== id"; id
echo "== status"; grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs):' /proc/self/status
echo "== mountinfo"; cat /proc/self/mountinfo
echo "== kcore"; if [ -e /proc/kcore ]; then wc -c < /proc/kcore; else echo absent; fi
echo "== keys"; wc -c < /proc/keys
echo "== rootfs"; if touch /probe 2>/dev/null; then echo rw; else echo ro; fi
echo "== data"; if touch /data/probe 2>/dev/null; then echo rw; else echo ro; fi
echo "== datasub"; if touch /data/sub/probe 2>/dev/null; then echo rw; else echo ro; fi
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


@contextlib.contextmanager
def started(runtime: str, tmp_path: Path, built: spec.BuiltSpec) -> Iterator[subprocess.Popen[str]]:
    """`RUNTIME run` in the foreground (the container's stdout and stderr come back
    here); killed if still running on the way out, then deleted."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(built.document))
    state = tmp_path / "state"
    cid = f"pyshim-spec-{secrets.token_hex(4)}"
    argv = [shutil.which(runtime) or runtime, "--root", str(state), "run", "--bundle", str(bundle), cid]
    if runtime == "crun":
        argv = [*crun_wrapper(), *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=bundle)
    try:
        yield proc
    finally:
        subprocess.run([runtime, "--root", str(state), "kill", cid, "KILL"], capture_output=True, timeout=30)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        subprocess.run(
            [runtime, "--root", str(state), "delete", "--force", cid], capture_output=True, timeout=30
        )


def run(runtime: str, tmp_path: Path, built: spec.BuiltSpec) -> subprocess.CompletedProcess[str]:
    """Run the container to its end."""
    with started(runtime, tmp_path, built) as proc:
        stdout, stderr = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    """A private tmpfs of the test's own at `path` (isolate.sh gives the suite a
    mount namespace of its own: the node's mounts are never touched)."""
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    try:
        subprocess.run(["mount", "--make-private", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "--recursive", "--lazy", str(path)], check=False)


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
    (tmp_path / "data").mkdir()
    with tmpfs(tmp_path / "data" / "sub"):  # writable below a read-only mount, unless recursive
        built = build_for(rootfs, cgroup, config)
        done = run(runtime, tmp_path, built)
    assert done.returncode == 0, done.stderr
    seen = Seen.parse(done.stdout)
    assert seen.one("id") == "uid=0(root) gid=0(root) groups=0(root)"
    expected = capabilities.to_mask((set(capabilities.DEFAULT) | {"CAP_NET_ADMIN"}) - {"CAP_CHOWN"})
    assert int(seen.status("CapEff"), 16) == int(seen.status("CapBnd"), 16) == expected
    assert seen.status("Seccomp") == "0" and seen.status("NoNewPrivs") == "0"
    assert seen.one("rootfs") == "rw" and (rootfs / "probe").exists()
    assert seen.one("data") == seen.one("datasub") == "ro"  # recursive read-only, even for root


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


def test_a_private_host_mount_is_made_shared(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt") as target:
        (target / "sub").mkdir()

        def state() -> mounts.MountPoint:
            with open("/proc/self/mountinfo") as f:
                return mounts.holding(str(target / "sub"), mounts.parse_mountinfo(f.read()))

        assert state() == mounts.MountPoint(str(target), shared=False, slave=False)
        mounts.ensure_propagation(str(target / "sub"), api_pb2.PROPAGATION_HOST_TO_CONTAINER)
        assert state().shared
        mounts.ensure_propagation(str(target / "sub"), api_pb2.PROPAGATION_BIDIRECTIONAL)  # already: nothing
        assert state().shared


WAIT_FOR_MARKER = """
echo ready
i=0
while [ ! -e /prop/late/marker ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ -e /prop/late/marker ]; then echo seen; else echo unseen; fi
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(
    "propagation",
    [api_pb2.PROPAGATION_HOST_TO_CONTAINER, api_pb2.PROPAGATION_BIDIRECTIONAL],
    ids=["rslave", "rshared"],
)
def test_host_mounts_reach_a_running_container(
    runtime: str, propagation: int, tmp_path: Path, cgroup: str
) -> None:
    """prepare_host makes the private host mount shared; a mount made on the node after
    the container started shows inside it."""
    with tmpfs(tmp_path / "shared") as shared:
        (shared / "late").mkdir()
        config = container_config(
            command=["sh", "-c", WAIT_FOR_MARKER],
            mounts=[api_pb2.Mount(container_path="/prop", host_path=str(shared), propagation=propagation)],
            sc={"namespace_options": api_pb2.NamespaceOption(pid=api_pb2.CONTAINER, network=NODE, ipc=NODE)},
        )
        built = build_for(busybox_rootfs(tmp_path / "rootfs"), cgroup, config)
        assert built.document["linux"]["rootfsPropagation"] == ("rslave" if propagation == 1 else "rshared")
        with started(runtime, tmp_path, built) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n", proc.communicate(timeout=30)
            with tmpfs(shared / "late") as late:
                (late / "marker").write_text("")
                stdout, stderr = proc.communicate(timeout=30)
        assert (proc.returncode, stdout) == (0, "seen\n"), stderr


MOUNT_BACK = """
mount -t tmpfs -o size=1m tmpfs /prop/back && echo mounted
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_container_mounts_reach_the_node_when_bidirectional(
    runtime: str, tmp_path: Path, cgroup: str
) -> None:
    with tmpfs(tmp_path / "shared") as shared:
        (shared / "back").mkdir()
        rootfs = busybox_rootfs(tmp_path / "rootfs", tools=("sh", "mount"))
        config = container_config(
            command=["sh", "-c", MOUNT_BACK],
            mounts=[
                api_pb2.Mount(
                    container_path="/prop",
                    host_path=str(shared),
                    propagation=api_pb2.PROPAGATION_BIDIRECTIONAL,
                )
            ],
            sc={
                "capabilities": api_pb2.Capability(add_capabilities=["SYS_ADMIN"]),
                "namespace_options": api_pb2.NamespaceOption(pid=api_pb2.CONTAINER, network=NODE, ipc=NODE),
            },
        )
        done = run(runtime, tmp_path, build_for(rootfs, cgroup, config))
        assert (done.returncode, done.stdout) == (0, "mounted\n"), done.stderr
        with open("/proc/self/mountinfo") as f:
            assert mounts.holding(str(shared / "back"), mounts.parse_mountinfo(f.read())).mount_point == str(
                shared / "back"
            )
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()


def test_the_crun_wrapper_leaves_the_nodes_cgroup_mounts_alone(tmp_path: Path) -> None:
    before = Path("/proc/self/mountinfo").read_text()
    done = subprocess.run([*crun_wrapper(), "true"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert Path("/proc/self/mountinfo").read_text() == before
    # The same recipe on shared mounts of the test's own (here the node's cgroup mounts
    # may be private already): the unmount stays in the wrapper's namespace.
    with tmpfs(tmp_path / "cg") as cg:
        subprocess.run(["mount", "--make-shared", str(cg)], check=True)
        with tmpfs(cg / "unified"):
            subprocess.run(["mount", "--make-shared", str(cg / "unified")], check=True)
            script = f'mountpoint -q "{cg}/unified" && echo still there || echo gone'
            inside = subprocess.run(
                [*crun_wrapper(str(cg)), "sh", "-c", script], capture_output=True, text=True, timeout=30
            )
            assert inside.stdout == "gone\n", inside.stderr
            assert os.path.ismount(cg / "unified")


def test_host_facts_here() -> None:
    facts = host_facts_now()
    # Root on these machines: every capability but CAP_SYS_RESOURCE (DESIGN.md).
    assert "CAP_SYS_ADMIN" in facts.capabilities
    assert facts.can_lower_oom_score == ("CAP_SYS_RESOURCE" in facts.capabilities)
    assert facts == spec.HostFacts.detect(frozenset(), False)
    assert host_facts()  # the unit tests' idea of this node still builds
