"""What the benchmarks share: a private pyshim daemon that leaves nothing behind,
latency statistics, and the memory of processes.

The private daemon runs on temp dirs with a bridge, an nftables table, a subnet and
a cgroup root of its own (node forwarding untouched). Closing it removes every pod
through the API, stops the daemon, then sweeps by hand whatever a broken run left:
processes in its cgroups, mounts under its dirs, the cgroups, the bridge, the table
and the dirs. That also runs after a failure or ^C (the daemon has a session of its
own, so ^C reaches only the benchmark, which then cleans up).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from shim._proto import api_pb2, api_pb2_grpc
from shim.cgroups import Cgroups

Stub = api_pb2_grpc.RuntimeServiceStub
T = TypeVar("T")
R = TypeVar("R")


def pod_config(host_network: bool, prefix: str, n: int) -> api_pb2.PodSandboxConfig:
    """A pod as kubelet would ask for it: host network or the pod network, pid mode CONTAINER."""
    mode = api_pb2.NODE if host_network else api_pb2.POD
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=f"{prefix}-{n}", namespace="bench", uid=f"{prefix}-uid-{n}"),
        hostname="" if host_network else f"{prefix}-{n}",
        labels={"bench": prefix, "io.kubernetes.pod.name": f"{prefix}-{n}"},
        annotations={"bench/n": str(n)},
        linux=api_pb2.LinuxPodSandboxConfig(
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(
                    network=mode, pid=api_pb2.CONTAINER, ipc=api_pb2.POD
                )
            )
        ),
    )


# ---- statistics ---------------------------------------------------------------------------


def timed(samples: dict[str, list[float]], name: str, call: Callable[[], Any]) -> Any:
    """Run `call`, append its wall-clock time in ms to samples[name], return its result."""
    start = time.perf_counter()
    result = call()
    samples.setdefault(name, []).append((time.perf_counter() - start) * 1000)
    return result


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        name: {
            "n": len(v),
            "p50": pct(v, 50),
            "p95": pct(v, 95),
            "p99": pct(v, 99),
            "mean": statistics.fmean(v),
        }
        for name, v in samples.items()
    }


def add_up(samples: dict[str, list[float]], name: str, parts: tuple[str, ...]) -> None:
    """samples[name]: per iteration, the sum of the calls in `parts` (same order of runs)."""
    samples[name] = [sum(x) for x in zip(*(samples[k] for k in parts), strict=True)]


def launcher(profile: Path | None) -> tuple[str, ...]:
    """How to run pyshim's CLI: plainly, or under bench/daemon_profile.py writing to `profile`."""
    if profile is None:
        return (sys.executable, "-m", "shim")
    return (sys.executable, str(Path(__file__).with_name("daemon_profile.py")), str(profile.absolute()))


def parallel(call: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """`call` on every item, `workers` at a time; on ^C or an error, what has not begun is dropped."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(call, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---- memory -------------------------------------------------------------------------------


def smaps(pid: int) -> dict[str, int]:
    """Rss and Pss in KiB from /proc/PID/smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key] = int(rest.split()[0])
    return out


def status_kib(pid: int, key: str) -> int:
    """A `VmRSS`/`VmHWM`-style field of /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak(pid: int) -> None:
    """Set VmHWM back to the current RSS (clear_refs 5, Linux >= 4.0), so that VmHWM read
    later is the peak since now rather than since the process started."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


# ---- the private daemon -------------------------------------------------------------------


class PrivateDaemon:
    """A pyshim on temp dirs with its own bridge, table, subnet and cgroup root.

    with PrivateDaemon(subnet="10.89.0.0/16") as daemon:
        stub = Stub(daemon.channel)
    """

    def __init__(
        self,
        subnet: str,
        log_level: str = "warning",
        keep_log: Path | None = None,
        launcher: tuple[str, ...] = (sys.executable, "-m", "shim"),
    ) -> None:
        """`launcher` runs pyshim's CLI (bench/daemon_profile.py wraps it); `keep_log`
        is where the daemon's log is copied when it stops."""
        tag = secrets.token_hex(4)
        self.workdir = Path(tempfile.mkdtemp(prefix="pyshim-bench-"))
        self.socket = self.workdir / "s.sock"
        self.bridge = f"psb{tag}"
        self.nft_table = f"pyshim_bench_{tag}"
        self.cgroup_root = f"/pyshim-bench-{tag}"
        self.subnet = subnet
        self.log_level = log_level
        self.keep_log = keep_log
        self.launcher = launcher
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> Path:
        return self.workdir / "daemon.log"

    def argv(self) -> list[str]:
        return [
            *self.launcher,
            "serve",
            "--config",
            "/dev/null",  # never the node's /etc/pyshim/config.toml
            "--socket",
            str(self.socket),
            "--root",
            str(self.root),
            "--run-root",
            str(self.workdir / "run"),
            "--netns-dir",
            str(self.workdir / "netns"),
            "--log-level",
            self.log_level,
            "--bridge-name",
            self.bridge,
            "--nft-table",
            self.nft_table,
            "--pod-subnet",
            self.subnet,
            "--no-ip-forward",
            "--cgroup-root",
            self.cgroup_root,
            # Neither the node's CNI configuration nor its registry configuration applies.
            "--cni-conf-dir",
            str(self.workdir / "cni-none"),
            "--registry-config-dir",
            str(self.workdir / "certs.d"),
        ]

    def __enter__(self) -> PrivateDaemon:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        # SIGTERM ends the benchmark like ^C: through the cleanup (the default would skip it).
        signal.signal(signal.SIGTERM, _interrupt)
        with open(self.log, "ab") as log:
            # A session of its own: ^C in the terminal reaches the benchmark only, which
            # then removes the pods through the daemon before stopping it.
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=log, cwd=self.workdir, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=30)

    def close(self) -> None:
        """Remove everything this daemon made; safe to call more than once."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second ^C must not stop the sweep
        try:
            self._remove_pods()
            self._stop()
            self._sweep()
        finally:
            signal.signal(signal.SIGINT, previous)

    def _remove_pods(self) -> None:
        if self.channel is None or self.proc is None or self.proc.poll() is not None:
            return
        stub = Stub(self.channel)
        try:
            # Containers first, without a grace period: a `sleep` as PID 1 ignores SIGTERM.
            for ctr in stub.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers:
                stub.StopContainer(api_pb2.StopContainerRequest(container_id=ctr.id, timeout=0), timeout=60)
            for pod in stub.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items:
                stub.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
        except grpc.RpcError as exc:
            print(f"cleanup: removing pods through the API failed: {exc}", file=sys.stderr)

    def _stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _sweep(self) -> None:
        hierarchies = [h.mountpoint for h in Cgroups().hierarchies]
        tops = [m + self.cgroup_root for m in hierarchies if os.path.isdir(m + self.cgroup_root)]
        dirs = [d for top in tops for d, _, _ in os.walk(top)]
        for d in dirs:  # pauses, conmons, containers: only ever this daemon's
            with contextlib.suppress(OSError), open(f"{d}/cgroup.procs") as f:
                for pid in f.read().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        mounts = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4]
                if point.startswith(f"{self.workdir}/"):
                    mounts.append(point)
        for point in reversed(mounts):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        _reap_orphans()
        for d in sorted(dirs, key=len, reverse=True):
            for _ in range(200):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    _reap_orphans()
                    time.sleep(0.01)
            else:
                print(f"cleanup: cgroup {d} is still busy", file=sys.stderr)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        subprocess.run(["nft", "delete", "table", "ip", self.nft_table], capture_output=True, check=False)
        if self.keep_log is not None and self.log.exists():
            shutil.copyfile(self.log, self.keep_log)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _interrupt(signo: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signo}")


def _reap_orphans() -> None:
    """Processes the stopped daemon left re-parent to us when we are PID 1 of a namespace
    (/work/tools/isolate.sh) or a subreaper: reap them so that their cgroups can go."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@dataclass(frozen=True)
class Target:
    """The daemon a benchmark drives: its channel, and where known its pid and --root."""

    channel: grpc.Channel
    pid: int | None
    root: Path | None
    scratch: Path  # a dir of the benchmark's own (pods' log dirs, archives), removed afterwards


@contextlib.contextmanager
def connect(
    socket: Path | None, daemon_pid: int | None, daemon_root: Path | None, subnet: str, **kwargs: Any
) -> Iterator[Target]:
    """The daemon at `socket`, or a private one (PrivateDaemon(subnet, **kwargs)) when it is None."""
    if socket is None:
        with PrivateDaemon(subnet, **kwargs) as daemon:
            assert daemon.channel is not None
            scratch = daemon.workdir / "scratch"
            scratch.mkdir()
            yield Target(daemon.channel, daemon.pid, daemon.root, scratch)
        return
    channel = grpc.insecure_channel(f"unix://{socket}")
    scratch = Path(tempfile.mkdtemp(prefix="pyshim-bench-"))
    try:
        yield Target(channel, daemon_pid, daemon_root, scratch)
    finally:
        channel.close()
        shutil.rmtree(scratch, ignore_errors=True)
