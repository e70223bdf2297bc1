"""Fixtures: a real pyshim daemon on a temp socket, real gRPC stubs, and a leak
check after every test (namespace mounts, pause processes, state files). Every
program the test process launches is recorded (LAUNCHED) for the check in
test_environment.py that the install script provides it."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cgrouptools import cgroups_under, remove_cgroups_under
from hypothesis import HealthCheck, settings

from shim._proto import api_pb2, api_pb2_grpc

IS_ROOT = os.geteuid() == 0
_PR_SET_CHILD_SUBREAPER = 36

# Property-based tests: a fixed seed and modest example counts in CI; PYSHIM_FUZZ_EXAMPLES=N
# (e.g. 5000) gives every such test N examples from a random seed (printed on failure).
_FUZZ_EXAMPLES = os.environ.get("PYSHIM_FUZZ_EXAMPLES", "")
for _name, _random in (("ci", False), ("long", True)):
    settings.register_profile(
        _name,
        derandomize=not _random,
        database=None,
        deadline=None,  # calls to a real daemon vary in time
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
settings.load_profile("long" if _FUZZ_EXAMPLES else "ci")


def examples(ci: int, long_share: float = 1.0) -> int:
    """How many examples a property-based test runs: `ci`, or PYSHIM_FUZZ_EXAMPLES times
    `long_share` (for tests whose examples take a second, not milliseconds)."""
    return max(1, int(int(_FUZZ_EXAMPLES) * long_share)) if _FUZZ_EXAMPLES else ci


# ---- what the suite runs -----------------------------------------------------------------

# Program (absolute path as it was launched, or the bare name when it was not found) -> the
# tests that launched it. Filled by an audit hook for the whole session; test_environment.py
# checks at the end that scripts/install-system-deps provides each one.
LAUNCHED: dict[str, set[str]] = {}
_current_test = "(collection)"


def _path_arg(value: object) -> str:
    if isinstance(value, str | bytes | os.PathLike):
        return os.fsdecode(value)
    raise TypeError(f"not a path: {value!r}")


def _launched_path(program: object, cwd: object, env: object) -> str:
    """Where `program` is found, as execve/subprocess would find it: a name with a slash is
    taken relative to cwd, a bare name is looked up in the PATH of `env` (else ours)."""
    name = _path_arg(program)
    if "/" in name:
        base = _path_arg(cwd) if cwd is not None else os.getcwd()
        return os.path.normpath(os.path.join(base, name))
    search = os.get_exec_path(env if isinstance(env, dict) else None)
    return shutil.which(name, path=os.pathsep.join(search)) or name


def _record_launch(event: str, args: tuple[object, ...]) -> None:
    """sys.addaudithook hook: note the program of every process this process starts.
    subprocess raises "subprocess.Popen" (executable, args, cwd, env) and then, as the
    case may be, "os.posix_spawn" (path, argv, env) for the same program."""
    if event not in ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn", "os.system"):
        return
    try:
        if event == "subprocess.Popen":
            path = _launched_path(args[0], args[2], args[3])
        elif event == "os.spawn":
            path = _launched_path(args[1], None, args[3])
        elif event == "os.system":
            path = "/bin/sh"
        else:
            path = _launched_path(args[0], None, args[2])
    except Exception as exc:  # never fail the launch itself; the check reports it instead
        path = f"(unreadable program in {event}: {exc!r})"
    LAUNCHED.setdefault(path, set()).add(_current_test)


sys.addaudithook(_record_launch)


def pytest_runtest_setup(item: pytest.Item) -> None:
    global _current_test
    _current_test = item.nodeid


def pytest_configure(config: pytest.Config) -> None:
    if IS_ROOT:
        # Pauses and conmons orphaned by a killed daemon come to us instead of PID 1,
        # which on some machines never reaps; we reap them as a node's PID 1 would.
        ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        threading.Thread(target=_reaper, name="reaper", daemon=True).start()


def _reaper() -> None:
    while True:
        time.sleep(0.02)
        with contextlib.suppress(Exception):
            reap_our_zombies()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs root (namespaces, mounts)")
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(skip)
    # Checks of what the whole session did run after everything else (a stable sort).
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


# ---- what a test may leave behind ------------------------------------------------------


def pause_pids() -> set[int]:
    """Live pyshim-pause processes on the machine."""
    return live_pids("pyshim-pause")


def conmon_pids() -> set[int]:
    """Live conmon processes on the machine."""
    return live_pids("conmon")


def live_pids(comm: str) -> set[int]:
    pids = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if f"({comm})" in stat and stat.rsplit(")", 1)[1].split()[0] != "Z":
            pids.add(int(entry.name))
    return pids


def nsfs_mounts_under(root: Path) -> list[str]:
    return [point for point, fstype in mounts_under(root) if fstype == "nsfs"]


def mounts_under(root: Path) -> list[tuple[str, str]]:
    """(mount point, type) of every mount at or below `root`: pins, overlays, each pod's /dev/shm."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point, fstype = fields[4], fields[fields.index("-") + 1]
            if point == str(root) or point.startswith(f"{root}/"):
                found.append((point, fstype))
    return found


def _in_test_cgroup(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return "/pyshim-test-" in f.read()
    except OSError:
        return False


# Children a test started itself and put in a test cgroup (tests/test_cgroups.py): their
# own Popen waits for them, and the reaper below must not take their exit status first.
OWN_CHILDREN: set[int] = set()


def reap_our_zombies() -> None:
    """Reap pauses, conmons and containers' processes re-parented to this process (see
    pytest_configure); never a child the tests started themselves (their Popen waits)."""
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" or int(fields[1]) != me:
            continue
        # A daemon's pauses, conmons and containers are in its test cgroups; a pause or a
        # program a test started itself is not, and its own Popen waits for it.
        if _in_test_cgroup(entry.name) and int(entry.name) not in OWN_CHILDREN:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)


# ---- the daemon -------------------------------------------------------------------------


def veth_names() -> set[str]:
    """pyshim's host-side veths (any daemon's)."""
    return {name for name in os.listdir("/sys/class/net") if name.startswith("psh")}


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@dataclass
class Daemon:
    """A pyshim daemon subprocess with its own state dirs, bridge, subnet and
    nftables table, and stubs to drive it."""

    base: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added to the test's own environment
    proc: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    # A /24 of its own in 10.200-249.x: pods' addresses exist only in namespaces the test made.
    pod_subnet: str = field(
        default_factory=lambda: f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}.0/24"
    )
    # A network namespace (under /run/netns) the test made for this daemon, or "" for the node's.
    netns: str = ""

    @property
    def bridge(self) -> str:
        return f"pst{self.tag}"

    @property
    def cgroup_root(self) -> str:
        """Pods that name no cgroup parent get theirs under this one, the test's own."""
        return f"/pyshim-test-{self.tag}"

    @property
    def nft_table(self) -> str:
        return f"pyshim_test_{self.tag}"

    @property
    def socket(self) -> Path:
        return self.base / "pyshim.sock"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def run_root(self) -> Path:
        return self.base / "run"

    @property
    def netns_dir(self) -> Path:
        return self.base / "netns"

    @property
    def log(self) -> Path:
        return self.base / "daemon.log"

    def argv(self) -> list[str]:
        # In a network namespace of the test's own, if it made one (see `netns`).
        enter = ["nsenter", f"--net=/run/netns/{self.netns}"] if self.netns else []
        return [
            *enter,
            sys.executable,
            "-m",
            "shim",
            "serve",
            "--socket",
            str(self.socket),
            "--root",
            str(self.root),
            "--run-root",
            str(self.run_root),
            "--netns-dir",
            str(self.netns_dir),
            "--log-level",
            "debug",
            "--bridge-name",
            self.bridge,
            "--pod-subnet",
            self.pod_subnet,
            "--nft-table",
            self.nft_table,
            "--no-ip-forward",
            # No CNI unless a test asks for it: the node's /etc/cni/net.d never applies.
            "--cni-conf-dir",
            str(self.base / "cni-none"),
            # Nor does the node's configuration file (/etc/pyshim/config.toml).
            "--config",
            "/dev/null",
            # Nor does the node's registry configuration.
            "--registry-config-dir",
            str(self.base / "certs.d"),
            "--cgroup-root",
            self.cgroup_root,
            *self.extra_args,
        ]

    def start(self, extra_args: list[str] | None = None) -> Daemon:
        if extra_args is not None:
            self.extra_args = extra_args
        if self.netns:  # a fresh namespace's loopback is down: the streaming server listens there
            subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=log, cwd=self.base, env={**os.environ, **self.env}
            )
        deadline = time.monotonic() + 30
        # Until it accepts a connection: after a kill -9 the dead daemon's socket file is
        # still there, and a channel that connects too early waits out gRPC's ~1 s backoff.
        while not _accepts(self.socket):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not serve on its socket:\n{self.log.read_text()}")
            time.sleep(0.02)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=30)
        return self

    @property
    def runtime(self) -> api_pb2_grpc.RuntimeServiceStub:
        assert self.channel is not None
        return api_pb2_grpc.RuntimeServiceStub(self.channel)

    @property
    def images(self) -> api_pb2_grpc.ImageServiceStub:
        assert self.channel is not None
        return api_pb2_grpc.ImageServiceStub(self.channel)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._close_channel()

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self._close_channel()
        return code

    def restart(self, kill: bool = True, extra_args: list[str] | None = None) -> Daemon:
        self.kill9() if kill else self.terminate()
        return self.start(extra_args)

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def cleanup(self) -> None:
        """Remove every pod through the API, stop the daemon, then sweep by hand what
        a broken daemon may have left (only what lives under this test's dirs)."""
        ids = {p.stem for p in (self.root / "sandboxes").glob("*.json")}
        ids |= {p.name for p in (self.run_root / "sandboxes").glob("*")}
        leftovers: list[str] = []
        api_ok = False
        try:
            if self.proc is not None and self.proc.poll() is None and self.channel is not None:
                # As kubelet: containers stopped first (here at once), then their pods removed.
                for ctr in self.runtime.ListContainers(
                    api_pb2.ListContainersRequest(), timeout=10
                ).containers:
                    self.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=ctr.id), timeout=30)
                for pod in self.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items:
                    self.runtime.RemovePodSandbox(
                        api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=30
                    )
                # Every pod is gone: none of their host ports may stay in the table's maps.
                leftovers = self.nft_map_elements()
                api_ok = True
        except Exception as exc:  # the daemon still stops and the sweep below still runs
            test = os.environ.get("PYTEST_CURRENT_TEST")
            print(f"cleanup ({test}): removing pods through the API failed: {exc!r}")
        finally:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self.terminate()
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        for pid in pause_pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if any(i.encode() in argv for i in ids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for pid in conmon_pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    mine = str(self.base).encode() in f.read()
            except OSError:
                continue
            if mine:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        cgroups_left = [d for d in cgroups_under(self.cgroup_root) if not d.endswith(self.cgroup_root)]
        for directory in cgroups_left:  # a container's processes: only ever in this test's cgroups
            with contextlib.suppress(OSError), open(f"{directory}/cgroup.procs") as f:
                for pid in f.read().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        for mountpoint, _ in reversed(mounts_under(self.base)):
            subprocess.run(["umount", "-l", mountpoint], check=False)
        time.sleep(0.05)
        reap_our_zombies()
        remove_cgroups_under(self.cgroup_root)
        # The node-level network pieces this daemon made: its bridge and its table.
        ip = ["ip", "-n", self.netns] if self.netns else ["ip"]
        subprocess.run([*ip, "link", "del", self.bridge], capture_output=True, check=False)
        subprocess.run([*self.nft, "delete", "table", "ip", self.nft_table], capture_output=True, check=False)
        assert leftovers == [], f"host-port map elements left after every pod was removed: {leftovers}"
        # Once every pod was removed through the API (none was left unloadable), no cgroup may stay.
        removed_all = api_ok and not list((self.root / "sandboxes").glob("*.json"))
        assert not removed_all or cgroups_left == [], f"cgroups left: {cgroups_left}"
        if removed_all:
            # Every container went with its pod: no record, root filesystem, bundle or link.
            dirs = (self.root / "containers", self.root / "rootfs", self.run_root / "containers")
            files_left = [
                str(f) for d in (*dirs, self.run_root / "attach") if d.is_dir() for f in d.iterdir()
            ]
            assert files_left == [], f"container files left: {files_left}"

    @property
    def nft(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, "nft"] if self.netns else ["nft"]

    def nft_map_elements(self) -> list[str]:
        """Elements of every map in this daemon's table ("map: element" strings)."""
        done = subprocess.run(
            [*self.nft, "-j", "list", "table", "ip", self.nft_table], capture_output=True, text=True
        )
        if done.returncode != 0:
            return []  # no table (a daemon that never got that far)
        found = []
        for item in json.loads(done.stdout)["nftables"]:
            nft_map = item.get("map")
            if nft_map:
                found += [f"{nft_map['name']}: {element}" for element in nft_map.get("elem", [])]
        return found


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[type[Daemon]]:
    """Makes daemons on dirs under this test's tmp_path; all are cleaned up after."""
    made: list[Daemon] = []

    def make(extra_args: list[str] | None = None, start: bool = True) -> Daemon:
        base = tmp_path / f"d{len(made)}"
        base.mkdir()
        d = Daemon(base=base, extra_args=extra_args or [])
        made.append(d)
        return d.start() if start else d

    yield make  # type: ignore[misc]
    errors = []
    for d in made:
        try:
            d.cleanup()
        except Exception as exc:  # clean up the other daemons all the same
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def daemon(daemon_factory: type[Daemon]) -> Daemon:
    return daemon_factory()  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def busybox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image archive of Debian's busybox-static (tests/containertools.py), made once."""
    from containertools import busybox_archive

    return busybox_archive(tmp_path_factory.mktemp("busybox"))


@pytest.fixture
def cdaemon(daemon: Daemon, busybox: Path) -> Daemon:
    """A daemon with the busybox image imported."""
    from containertools import import_image

    import_image(daemon, busybox)
    return daemon


@pytest.fixture(autouse=True)
def leak_check(tmp_path: Path) -> Iterator[None]:
    """After each test: no pause it made is alive, no namespace pin is mounted, no veth left."""
    before = pause_pids()
    conmons_before = conmon_pids()
    veths_before = veth_names() if IS_ROOT else set()
    forward_before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    default_bridge_before = Path("/sys/class/net/pyshim0").exists()
    ruleset_before = nft_ruleset() if IS_ROOT else ""
    yield
    reap_our_zombies()
    deadline = time.monotonic() + 5
    while (
        (pause_pids() - before) or (conmon_pids() - conmons_before) or (veth_names() - veths_before)
    ) and time.monotonic() < deadline:
        time.sleep(0.05)
        reap_our_zombies()
    assert pause_pids() - before == set(), "pause processes left behind"
    assert conmon_pids() - conmons_before == set(), "conmon processes left behind"
    assert mounts_under(tmp_path) == [], "mounts left (pins, root filesystems, /dev/shm)"
    assert veth_names() - veths_before == set(), "veths left behind"
    # Tests run their daemons on bridges of their own and never touch node-wide settings.
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forward_before, "ip_forward changed"
    assert Path("/sys/class/net/pyshim0").exists() == default_bridge_before, "default bridge touched"
    # Every table a test's daemon made (rules, maps and their elements) is gone with it.
    assert not IS_ROOT or nft_ruleset() == ruleset_before, "nftables rules or map elements left behind"


def nft_ruleset() -> str:
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout


# ---- requests -----------------------------------------------------------------------------


def unique(prefix: str = "t") -> str:
    return f"{prefix}{secrets.token_hex(4)}"


def pod_config(
    name: str | None = None,
    *,
    namespace: str = "default",
    uid: str | None = None,
    attempt: int = 0,
    hostname: str = "",
    network: int = api_pb2.POD,
    pid: int = api_pb2.CONTAINER,
    ipc: int = api_pb2.POD,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    sysctls: dict[str, str] | None = None,
) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(
            name=name or unique("pod-"), namespace=namespace, uid=uid or unique("uid-"), attempt=attempt
        ),
        hostname=hostname,
        labels=labels or {},
        annotations=annotations or {},
        linux=api_pb2.LinuxPodSandboxConfig(
            sysctls=sysctls or {},
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(network=network, pid=pid, ipc=ipc)
            ),
        ),
    )


def run_pod(daemon: Daemon, config: api_pb2.PodSandboxConfig | None = None, **kwargs: object) -> str:
    cfg = config if config is not None else pod_config(**kwargs)  # type: ignore[arg-type]
    return str(
        daemon.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cfg), timeout=30).pod_sandbox_id
    )


def status(daemon: Daemon, sandbox_id: str, verbose: bool = False) -> api_pb2.PodSandboxStatusResponse:
    return daemon.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose), timeout=10
    )


def sandbox_pid(daemon: Daemon, sandbox_id: str) -> int:
    import json

    return int(json.loads(status(daemon, sandbox_id, verbose=True).info["info"])["pid"])
