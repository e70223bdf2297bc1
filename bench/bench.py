#!/usr/bin/env python3
"""Pod sandbox benchmark: drives a pyshim (or any CRI runtime) over gRPC.

    python bench/bench.py                       # spawn a private pyshim on temp dirs
    python bench/bench.py --socket /run/pyshim/pyshim.sock --daemon-pid PID

Phases, for host-network pods and pods on the built-in pod network:
  1. sequential lifecycles: Run -> Status -> Stop -> Remove, per-call p50/p95/p99
  2. concurrent lifecycles (--inflight at once): pods per second
  3. N pods held alive (each --alive value): ListPodSandbox latency, daemon RSS,
     memory per pod (daemon PSS growth + pause PSS)
Latencies are wall-clock per call as a client sees them. Medians are what to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from shim._proto import api_pb2, api_pb2_grpc

Stub = api_pb2_grpc.RuntimeServiceStub
BENCH_BRIDGE = "psbench0"
BENCH_TABLE = "pyshim_bench"


def pod_config(host_network: bool, prefix: str, n: int) -> api_pb2.PodSandboxConfig:
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


def timed(samples: dict[str, list[float]], name: str, call: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = call()
    samples.setdefault(name, []).append((time.perf_counter() - start) * 1000)
    return result


def lifecycle(stub: Stub, config: api_pb2.PodSandboxConfig, samples: dict[str, list[float]]) -> None:
    sid = timed(
        samples,
        "RunPodSandbox",
        lambda: stub.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config)).pod_sandbox_id,
    )
    timed(
        samples,
        "PodSandboxStatus",
        lambda: stub.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid)),
    )
    t0 = time.perf_counter()
    timed(
        samples,
        "StopPodSandbox",
        lambda: stub.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid)),
    )
    timed(
        samples,
        "RemovePodSandbox",
        lambda: stub.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid)),
    )
    samples.setdefault("Stop+Remove", []).append((time.perf_counter() - t0) * 1000)


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


def sequential(stub: Stub, host_network: bool, count: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    prefix = f"seq{secrets.token_hex(3)}"
    start = time.perf_counter()
    for n in range(count):
        lifecycle(stub, pod_config(host_network, prefix, n), samples)
    samples["lifecycle"] = [
        sum(x)
        for x in zip(
            *(
                samples[k]
                for k in ("RunPodSandbox", "PodSandboxStatus", "StopPodSandbox", "RemovePodSandbox")
            ),
            strict=True,
        )
    ]
    return {"calls": summary(samples), "pods_per_s": count / (time.perf_counter() - start)}


def concurrent(stub: Stub, host_network: bool, count: int, inflight: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    lock = threading.Lock()
    prefix = f"con{secrets.token_hex(3)}"

    def one(n: int) -> None:
        mine: dict[str, list[float]] = {}
        lifecycle(stub, pod_config(host_network, prefix, n), mine)
        with lock:
            for k, v in mine.items():
                samples.setdefault(k, []).extend(v)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=inflight) as pool:
        list(pool.map(one, range(count)))
    elapsed = time.perf_counter() - start
    return {"inflight": inflight, "pods_per_s": count / elapsed, "calls": summary(samples)}


def smaps(pid: int) -> dict[str, int]:
    """Rss and Pss in KiB from /proc/PID/smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key] = int(rest.split()[0])
    return out


def held(stub: Stub, host_network: bool, alive: int, daemon_pid: int | None, inflight: int) -> dict[str, Any]:
    prefix = f"held{secrets.token_hex(3)}"
    before = smaps(daemon_pid) if daemon_pid else None
    with ThreadPoolExecutor(max_workers=inflight) as pool:
        ids = list(
            pool.map(
                lambda n: (
                    stub.RunPodSandbox(
                        api_pb2.RunPodSandboxRequest(config=pod_config(host_network, prefix, n))
                    ).pod_sandbox_id
                ),
                range(alive),
            )
        )
    try:
        time.sleep(0.5)
        result: dict[str, Any] = {"alive": alive}
        samples: dict[str, list[float]] = {}
        for _ in range(50):
            items = timed(
                samples, "ListPodSandbox", lambda: stub.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
            )
        assert len(items) >= alive
        flt = api_pb2.PodSandboxFilter(label_selector={"bench": prefix})
        for _ in range(20):
            timed(
                samples,
                "ListPodSandbox(label)",
                lambda: stub.ListPodSandbox(api_pb2.ListPodSandboxRequest(filter=flt)),
            )
        result["calls"] = summary(samples)
        pauses = [
            json.loads(
                stub.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=i, verbose=True)).info[
                    "info"
                ]
            )["pid"]
            for i in ids[:: max(1, alive // 50)]
        ]
        pause_mem = [smaps(p) for p in pauses if p]
        if pause_mem:
            result["pause_rss_kib"] = statistics.median(m["Rss"] for m in pause_mem)
            result["pause_pss_kib"] = statistics.median(m["Pss"] for m in pause_mem)
        if daemon_pid and before:
            after = smaps(daemon_pid)
            result["daemon_rss_mib"] = after["Rss"] / 1024
            result["daemon_growth_per_pod_kib"] = (after["Pss"] - before["Pss"]) / alive
            if "pause_pss_kib" in result:
                result["memory_per_pod_kib"] = result["daemon_growth_per_pod_kib"] + result["pause_pss_kib"]
        return result
    finally:
        with ThreadPoolExecutor(max_workers=inflight) as pool:
            list(
                pool.map(
                    lambda i: stub.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=i)), ids
                )
            )


def spawn_daemon(workdir: Path) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "shim",
        "serve",
        "--socket",
        str(workdir / "s.sock"),
        "--root",
        str(workdir / "root"),
        "--run-root",
        str(workdir / "run"),
        "--netns-dir",
        str(workdir / "netns"),
        "--log-level",
        "warning",
        # A network of its own, removed afterwards; node-wide forwarding left alone.
        "--bridge-name",
        BENCH_BRIDGE,
        "--nft-table",
        BENCH_TABLE,
        "--pod-subnet",
        "10.89.0.0/16",
        "--no-ip-forward",
    ]
    with open(workdir / "daemon.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while not (workdir / "s.sock").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"daemon did not start: {(workdir / 'daemon.log').read_text()}")
        time.sleep(0.05)
    return proc


def print_report(report: dict[str, Any]) -> None:
    for mode, phases in report["modes"].items():
        print(f"\n== {mode}")
        seq = phases["sequential"]
        print(f"sequential ({seq['calls']['RunPodSandbox']['n']} pods): {seq['pods_per_s']:.0f} pods/s")
        for name, s in seq["calls"].items():
            print(f"  {name:<18} p50 {s['p50']:7.2f} ms   p95 {s['p95']:7.2f}   p99 {s['p99']:7.2f}")
        con = phases["concurrent"]
        print(
            f"concurrent, {con['inflight']} in flight: {con['pods_per_s']:.0f} pods/s  "
            f"(Run p50 {con['calls']['RunPodSandbox']['p50']:.2f} ms)"
        )
        for h in phases["held"]:
            line = (
                f"{h['alive']} alive: ListPodSandbox p50 {h['calls']['ListPodSandbox']['p50']:.2f} ms "
                f"p95 {h['calls']['ListPodSandbox']['p95']:.2f}"
            )
            if "daemon_rss_mib" in h:
                growth = h["daemon_growth_per_pod_kib"]
                line += f"; daemon RSS {h['daemon_rss_mib']:.1f} MiB, +{growth:.1f} KiB PSS/pod"
            if "pause_pss_kib" in h:
                line += f"; pause RSS {h['pause_rss_kib']:.0f} KiB PSS {h['pause_pss_kib']:.0f} KiB"
            if "memory_per_pod_kib" in h:
                line += f"; per pod {h['memory_per_pod_kib']:.0f} KiB"
            print(f"  {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--socket", type=Path, help="CRI socket of a running daemon; unset: spawn a private pyshim"
    )
    parser.add_argument("--daemon-pid", type=int, help="pid of that daemon, for memory figures")
    parser.add_argument("--pods", type=int, default=300, help="lifecycles per sequential/concurrent phase")
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument(
        "--alive", type=int, action="append", help="pods held alive for list/memory (repeatable)"
    )
    parser.add_argument("--mode", choices=["host", "netns", "both"], default="both")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    opts = parser.parse_args()
    alive = opts.alive or [100, 1000]

    tmp = None
    proc = None
    socket_path = opts.socket
    daemon_pid = opts.daemon_pid
    if socket_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="pyshim-bench-")
        proc = spawn_daemon(Path(tmp.name))
        socket_path, daemon_pid = Path(tmp.name) / "s.sock", proc.pid
    channel = grpc.insecure_channel(f"unix://{socket_path}")
    stub = Stub(channel)
    version = stub.Version(api_pb2.VersionRequest())
    report: dict[str, Any] = {
        "runtime": f"{version.runtime_name} {version.runtime_version}",
        "argv": sys.argv,
        "nproc": os.cpu_count(),
        "modes": {},
    }
    try:
        modes = {"host": [True], "netns": [False], "both": [True, False]}[opts.mode]
        for host_network in modes:
            name = "host network" if host_network else "pod network (bridge, veth, IP)"
            for n in range(20):  # warm-up: imports, thread pools, page cache
                lifecycle(stub, pod_config(host_network, f"warm{secrets.token_hex(2)}", n), {})
            report["modes"][name] = {
                "sequential": sequential(stub, host_network, opts.pods),
                "concurrent": concurrent(stub, host_network, opts.pods, opts.inflight),
                "held": [held(stub, host_network, a, daemon_pid, opts.inflight) for a in alive],
            }
    finally:
        channel.close()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
            subprocess.run(["ip", "link", "del", BENCH_BRIDGE], capture_output=True, check=False)
            subprocess.run(["nft", "delete", "table", "ip", BENCH_TABLE], capture_output=True, check=False)
        if tmp is not None:
            tmp.cleanup()
    print(f"runtime: {report['runtime']}  cpus: {report['nproc']}")
    print_report(report)
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
