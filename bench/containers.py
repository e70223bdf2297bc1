#!/usr/bin/env python3
"""Container benchmark: a pod with one busybox `sleep 3600` container, the same client
for every runtime handler (runc, crun), on the pod network and on the host network.

    python bench/containers.py                  # spawn a private pyshim on temp dirs
    python bench/containers.py --socket /run/pyshim/pyshim.sock --daemon-pid PID [--daemon-root DIR]

Per pod, as kubelet does it: RunPodSandbox, CreateContainer (log in the pod's
log_directory), StartContainer, ContainerStatus, StopContainer (timeout 0),
RemoveContainer, StopPodSandbox, RemovePodSandbox. For each handler and network mode:
  1. sequential lifecycles: p50/p95 of every call, "to running" (Run+Create+Start),
     the full lifecycle (the sum of the eight calls)
  2. concurrent lifecycles (--inflight at once): pods+containers per second
  3. --alive pods held, each with its running container: memory per pod =
     (daemon PSS growth + PSS of the pause, conmon and the container's processes) / pods,
     and the same with RSS
Latencies are wall-clock per call as a Python gRPC client sees them. Quote medians.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from busybox import IMAGE, import_image
from harness import Stub, add_up, connect, launcher, parallel, pod_config, smaps, summary, timed

from shim._proto import api_pb2, api_pb2_grpc

CALLS = (
    "RunPodSandbox",
    "CreateContainer",
    "StartContainer",
    "ContainerStatus",
    "StopContainer",
    "RemoveContainer",
    "StopPodSandbox",
    "RemovePodSandbox",
)
PHASES = ("sequential", "concurrent", "held")
TIMEOUT = 120.0


class Bench:
    """One handler and network mode."""

    def __init__(self, stub: Stub, handler: str, host_network: bool, image: str, logs: Path) -> None:
        self.stub = stub
        self.handler = handler
        self.host_network = host_network
        self.image = image
        self.logs = logs

    def pod(self, prefix: str, n: int) -> api_pb2.PodSandboxConfig:
        config = pod_config(self.host_network, prefix, n)
        config.log_directory = str(self.logs / f"{prefix}-{n}")
        return config

    def container(self) -> api_pb2.ContainerConfig:
        return api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="sleep"),
            image=api_pb2.ImageSpec(image=self.image),
            command=["sleep", "3600"],
            log_path="sleep/0.log",
            labels={"io.kubernetes.container.name": "sleep"},
        )

    def call(self, samples: dict[str, list[float]], name: str, request: Any) -> Any:
        """The CRI call `name` (a RuntimeService method), timed into samples[name]."""
        method = getattr(self.stub, name)
        return timed(samples, name, lambda: method(request, timeout=TIMEOUT))

    def to_running(self, prefix: str, n: int, samples: dict[str, list[float]]) -> tuple[str, str]:
        """Run + Create + Start: a pod with its container running. (pod id, container id)"""
        pod = self.pod(prefix, n)
        run = api_pb2.RunPodSandboxRequest(config=pod, runtime_handler=self.handler)
        pod_id = self.call(samples, "RunPodSandbox", run).pod_sandbox_id
        create = api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=self.container(), sandbox_config=pod
        )
        ctr = self.call(samples, "CreateContainer", create).container_id
        self.call(samples, "StartContainer", api_pb2.StartContainerRequest(container_id=ctr))
        return pod_id, ctr

    def lifecycle(self, prefix: str, n: int, samples: dict[str, list[float]]) -> None:
        """The eight calls of CALLS, in order."""
        pod_id, ctr = self.to_running(prefix, n, samples)
        status = self.call(samples, "ContainerStatus", api_pb2.ContainerStatusRequest(container_id=ctr))
        assert status.status.state == api_pb2.CONTAINER_RUNNING, status.status
        self.teardown(pod_id, ctr, samples)

    def teardown(self, pod_id: str, ctr: str, samples: dict[str, list[float]]) -> None:
        """StopContainer (timeout 0), RemoveContainer, StopPodSandbox, RemovePodSandbox."""
        self.call(samples, "StopContainer", api_pb2.StopContainerRequest(container_id=ctr, timeout=0))
        self.call(samples, "RemoveContainer", api_pb2.RemoveContainerRequest(container_id=ctr))
        self.call(samples, "StopPodSandbox", api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        self.call(samples, "RemovePodSandbox", api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def sequential(self, count: int) -> dict[str, Any]:
        samples: dict[str, list[float]] = {}
        prefix = f"cseq{secrets.token_hex(3)}"
        for n in range(count):
            self.lifecycle(prefix, n, samples)
        add_up(samples, "to running", CALLS[:3])
        add_up(samples, "lifecycle", CALLS)
        return {"calls": summary(samples)}

    def concurrent(self, count: int, inflight: int) -> dict[str, Any]:
        samples: dict[str, list[float]] = {}
        lock = threading.Lock()
        prefix = f"ccon{secrets.token_hex(3)}"

        def one(n: int) -> None:
            mine: dict[str, list[float]] = {}
            self.lifecycle(prefix, n, mine)
            with lock:
                for k, v in mine.items():
                    samples.setdefault(k, []).extend(v)

        start = time.perf_counter()
        parallel(one, range(count), inflight)
        elapsed = time.perf_counter() - start
        add_up(samples, "to running", CALLS[:3])
        add_up(samples, "lifecycle", CALLS)
        return {"inflight": inflight, "per_s": count / elapsed, "calls": summary(samples)}

    def held(self, alive: int, daemon_pid: int | None, inflight: int) -> dict[str, Any]:
        """`alive` pods, each with its container running: memory per pod."""
        prefix = f"cheld{secrets.token_hex(3)}"
        before = smaps(daemon_pid) if daemon_pid else None
        made: list[tuple[str, str]] = []
        lock = threading.Lock()

        def one(n: int) -> None:
            ids = self.to_running(prefix, n, {})
            with lock:
                made.append(ids)

        try:
            parallel(one, range(alive), inflight)
            time.sleep(1.0)  # let the last ones settle (runtimes exit, pages touched)
            result = {"alive": alive, **memory(self.processes(made), alive)}
            if daemon_pid and before:
                result |= daemon_growth(daemon_pid, before, alive, result)
            return result
        finally:
            parallel(lambda ids: self.teardown(*ids, {}), made, inflight)

    def processes(self, made: list[tuple[str, str]]) -> dict[str, list[int]]:
        """Each pod's pause, conmon and container processes, as the verbose statuses name them."""
        pids: dict[str, list[int]] = {"pause": [], "conmon": [], "container": []}
        for pod_id, ctr in made:
            request = api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)
            pod_info = json.loads(self.call({}, "PodSandboxStatus", request).info["info"])
            request = api_pb2.ContainerStatusRequest(container_id=ctr, verbose=True)
            ctr_info = json.loads(self.call({}, "ContainerStatus", request).info["info"])
            pids["pause"].append(pod_info["pid"])
            pids["conmon"].append(ctr_info["monitorPid"])
            pids["container"] += descendants(ctr_info["pid"])
        return pids


def memory(pids: dict[str, list[int]], pods: int) -> dict[str, Any]:
    """Per kind of process: median PSS and RSS; over all of them: PSS and RSS per pod."""
    result: dict[str, Any] = {}
    totals = {"Pss": 0, "Rss": 0}
    for kind, found in pids.items():
        mem = [smaps(p) for p in found if p]
        for key in totals:
            totals[key] += sum(m[key] for m in mem)
        result[kind] = {
            "processes": len(mem),
            "pss_kib_median": statistics.median(m["Pss"] for m in mem),
            "rss_kib_median": statistics.median(m["Rss"] for m in mem),
        }
    result["processes_pss_kib_per_pod"] = totals["Pss"] / pods
    result["processes_rss_kib_per_pod"] = totals["Rss"] / pods
    return result


def daemon_growth(
    daemon_pid: int, before: dict[str, int], pods: int, processes: dict[str, Any]
) -> dict[str, Any]:
    """The daemon's growth since `before`, per pod, and the totals per pod with it."""
    after = smaps(daemon_pid)
    pss = (after["Pss"] - before["Pss"]) / pods
    rss = (after["Rss"] - before["Rss"]) / pods
    return {
        "daemon_rss_mib": after["Rss"] / 1024,
        "daemon_pss_growth_kib_per_pod": pss,
        "daemon_rss_growth_kib_per_pod": rss,
        "pss_kib_per_pod": processes["processes_pss_kib_per_pod"] + pss,
        "rss_kib_per_pod": processes["processes_rss_kib_per_pod"] + rss,
    }


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def ensure_image(channel: grpc.Channel, image: str, root: Path | None, scratch: Path) -> None:
    """Import the busybox image into the store at `root` if given; then it must be there."""
    if root is not None:
        import_image(root, scratch, image)
    images = api_pb2_grpc.ImageServiceStub(channel)
    if not images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image))).image.id:
        raise SystemExit(f"image {image} is not in the daemon's store: pass --daemon-root to import it")


def print_report(report: dict[str, Any]) -> None:
    for name, phases in report["runs"].items():
        print(f"\n== {name}")
        if "sequential" in phases:
            seq = phases["sequential"]["calls"]
            print(f"sequential ({seq['RunPodSandbox']['n']} pods with a container):")
            for call, s in seq.items():
                print(f"  {call:<18} p50 {s['p50']:7.2f} ms   p95 {s['p95']:7.2f}   p99 {s['p99']:7.2f}")
        if "concurrent" in phases:
            con = phases["concurrent"]
            print(
                f"concurrent, {con['inflight']} in flight: {con['per_s']:.1f} pods+containers/s  "
                f"(to running p50 {con['calls']['to running']['p50']:.1f} ms, "
                f"lifecycle p50 {con['calls']['lifecycle']['p50']:.1f} ms)"
            )
        if "held" in phases:
            print_held(phases["held"])


def print_held(h: dict[str, Any]) -> None:
    parts = ", ".join(
        f"{k} PSS {h[k]['pss_kib_median']:.0f} KiB RSS {h[k]['rss_kib_median']:.0f} KiB"
        for k in ("pause", "conmon", "container")
    )
    print(f"{h['alive']} held: {parts} (medians)")
    if "pss_kib_per_pod" in h:
        growth = h["daemon_pss_growth_kib_per_pod"]
        print(f"  daemon RSS {h['daemon_rss_mib']:.1f} MiB, {growth:+.0f} KiB PSS/pod")
        print(
            f"  per pod with its container: {h['pss_kib_per_pod']:.0f} KiB PSS, "
            f"{h['rss_kib_per_pod']:.0f} KiB RSS"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--socket", type=Path, help="CRI socket of a running daemon; unset: spawn a private pyshim"
    )
    parser.add_argument("--daemon-pid", type=int, help="pid of that daemon, for memory figures")
    parser.add_argument(
        "--daemon-root", type=Path, help="that daemon's --root, to import the busybox image into"
    )
    parser.add_argument("--image", default=IMAGE, help="the image to run (`sleep 3600` in it)")
    parser.add_argument(
        "--handler", action="append", help="runtime handler, repeatable; unset: runc and crun"
    )
    parser.add_argument("--mode", choices=["host", "pod", "both"], default="both")
    parser.add_argument("--pods", type=int, default=100, help="lifecycles per sequential/concurrent phase")
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--alive", type=int, default=50, help="pods held, each with its running container")
    parser.add_argument("--log-level", default="warning", help="the private daemon's --log-level")
    parser.add_argument("--daemon-log", type=Path, help="keep the private daemon's log here")
    parser.add_argument(
        "--phase", action="append", choices=PHASES, help="run only this phase (repeatable); unset: all"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="time the private daemon's steps (bench/daemon_profile.py) into this JSON",
    )
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    opts = parser.parse_args()
    phases = opts.phase or list(PHASES)
    handlers = opts.handler or ["runc", "crun"]
    modes = {"host": [True], "pod": [False], "both": [False, True]}[opts.mode]

    report: dict[str, Any] = {"argv": sys.argv, "nproc": os.cpu_count(), "image": opts.image, "runs": {}}
    with connect(
        opts.socket,
        opts.daemon_pid,
        opts.daemon_root,
        "10.90.0.0/16",
        log_level=opts.log_level,
        keep_log=opts.daemon_log,
        launcher=launcher(opts.profile),
    ) as target:
        stub = Stub(target.channel)
        version = stub.Version(api_pb2.VersionRequest())
        report["runtime"] = f"{version.runtime_name} {version.runtime_version}"
        ensure_image(target.channel, opts.image, target.root, target.scratch)
        for handler in handlers:
            for host_network in modes:
                name = f"{handler}, {'host network' if host_network else 'pod network'}"
                bench = Bench(stub, handler, host_network, opts.image, target.scratch / "logs")
                began = time.monotonic()
                for n in range(5):  # warm-up: imports, thread pools, page cache
                    bench.lifecycle(f"warm{secrets.token_hex(2)}", n, {})
                run: dict[str, Any] = report["runs"].setdefault(name, {})
                if "sequential" in phases:
                    run["sequential"] = bench.sequential(opts.pods)
                if "concurrent" in phases:
                    run["concurrent"] = bench.concurrent(opts.pods, opts.inflight)
                if "held" in phases:
                    run["held"] = bench.held(opts.alive, target.pid, opts.inflight)
                print(f"done: {name} in {time.monotonic() - began:.0f} s", file=sys.stderr)
    print(f"runtime: {report['runtime']}  cpus: {report['nproc']}")
    print_report(report)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
