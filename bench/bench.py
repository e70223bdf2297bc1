#!/usr/bin/env python3
"""Pod sandbox benchmark: drives a pyshim (or any CRI runtime) over gRPC.

    python bench/bench.py                       # spawn a private pyshim on temp dirs
    python bench/bench.py --socket /run/pyshim/pyshim.sock --daemon-pid PID

Phases, for host-network pods and pods on the built-in pod network:
  1. sequential lifecycles: Run -> Status -> Stop -> Remove, per-call p50/p95/p99
  2. concurrent lifecycles (--inflight at once): pods per second
  3. N pods held alive (each --alive value): ListPodSandbox latency, daemon RSS,
     memory per pod (daemon PSS growth + pause PSS)
Then a burst of large requests (--burst at once, --burst-rounds times): RunPodSandbox
requests just under the largest one the daemon accepts (MAX_REQUEST in shim/server.py,
refused by validation: configs are capped at 2 MiB), then as many of 16 MiB (refused by
the transport); the daemon's RSS before, its peak during the burst, 2 s and 10 s after.
Latencies are wall-clock per call as a client sees them. Medians are what to quote.
"""

from __future__ import annotations

import argparse
import collections
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
from harness import (
    Stub,
    add_up,
    connect,
    launcher,
    parallel,
    pod_config,
    reset_peak,
    smaps,
    status_kib,
    summary,
    timed,
)

from shim._proto import api_pb2
from shim.server import MAX_REQUEST

OVERSIZED = 16 * 1024 * 1024


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


def sequential(stub: Stub, host_network: bool, count: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    prefix = f"seq{secrets.token_hex(3)}"
    start = time.perf_counter()
    for n in range(count):
        lifecycle(stub, pod_config(host_network, prefix, n), samples)
    add_up(samples, "lifecycle", ("RunPodSandbox", "PodSandboxStatus", "StopPodSandbox", "RemovePodSandbox"))
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
    parallel(one, range(count), inflight)
    elapsed = time.perf_counter() - start
    return {"inflight": inflight, "pods_per_s": count / elapsed, "calls": summary(samples)}


def held(stub: Stub, host_network: bool, alive: int, daemon_pid: int | None, inflight: int) -> dict[str, Any]:
    prefix = f"held{secrets.token_hex(3)}"
    before = smaps(daemon_pid) if daemon_pid else None
    ids = parallel(
        lambda n: (
            stub.RunPodSandbox(
                api_pb2.RunPodSandboxRequest(config=pod_config(host_network, prefix, n))
            ).pod_sandbox_id
        ),
        range(alive),
        inflight,
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
        parallel(
            lambda i: stub.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=i)), ids, inflight
        )


def big_request(size: int) -> bytes:
    """A serialised RunPodSandboxRequest of exactly `size` bytes (its bulk in annotations)."""
    config = pod_config(False, "burst", 0)
    fill = max(0, size - 1024)
    for _ in range(5):  # the length prefixes grow with the value: converge on `size`
        config.annotations["bench/fill"] = "x" * fill
        data: bytes = api_pb2.RunPodSandboxRequest(config=config).SerializeToString()
        if len(data) == size:
            return data
        fill += size - len(data)
    raise AssertionError(f"cannot make a request of {size} bytes")


def burst_round(channel: grpc.Channel, daemon_pid: int, payload: bytes, count: int) -> dict[str, Any]:
    """`count` copies of `payload` sent at once; the daemon's RSS before, at its peak, 2 s and 10 s after."""
    # No serialiser: the same bytes go out on every call, the client holds them once.
    send = channel.unary_unary("/runtime.v1.RuntimeService/RunPodSandbox")

    def one(_: int) -> str:
        try:
            send(payload, timeout=120)
            return "OK"
        except grpc.RpcError as exc:
            return str(exc.code().name)

    before = status_kib(daemon_pid, "VmRSS")
    reset_peak(daemon_pid)
    start = time.perf_counter()
    codes = collections.Counter(parallel(one, range(count), count))
    elapsed = time.perf_counter() - start
    peak = status_kib(daemon_pid, "VmHWM")
    time.sleep(2.0)
    after_2s = status_kib(daemon_pid, "VmRSS")
    time.sleep(8.0)
    return {
        "request_bytes": len(payload),
        "requests": count,
        "answers": dict(codes),
        "seconds": elapsed,
        "rss_before_mib": before / 1024,
        "rss_peak_mib": peak / 1024,
        "rss_after_2s_mib": after_2s / 1024,
        "rss_after_10s_mib": status_kib(daemon_pid, "VmRSS") / 1024,
    }


def burst(channel: grpc.Channel, daemon_pid: int, count: int, rounds: int) -> list[dict[str, Any]]:
    largest = big_request(MAX_REQUEST - 64)  # passes the transport; validation refuses it
    oversized = big_request(OVERSIZED)  # refused by the transport
    results = []
    for n in range(rounds):
        for kind, payload in (("just under the limit", largest), ("16 MiB, over the limit", oversized)):
            results.append({"round": n + 1, "kind": kind, **burst_round(channel, daemon_pid, payload, count)})
    return results


def print_report(report: dict[str, Any]) -> None:
    for b in report.get("burst", []):
        print(
            f"burst {b['round']}, {b['requests']} x {b['request_bytes'] / 2**20:.2f} MiB ({b['kind']}): "
            f"{b['answers']} in {b['seconds']:.2f} s; daemon RSS {b['rss_before_mib']:.0f} MiB before, "
            f"peak {b['rss_peak_mib']:.0f} MiB, {b['rss_after_2s_mib']:.0f} MiB 2 s after, "
            f"{b['rss_after_10s_mib']:.0f} MiB 10 s after"
        )
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
    parser.add_argument("--mode", choices=["host", "netns", "both", "none"], default="both")
    parser.add_argument("--burst", type=int, default=64, help="large requests at once (0: no burst)")
    parser.add_argument("--burst-rounds", type=int, default=2)
    parser.add_argument(
        "--profile",
        type=Path,
        help="time the private daemon's steps (bench/daemon_profile.py) into this JSON",
    )
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    opts = parser.parse_args()
    alive = opts.alive or [100, 1000]

    report: dict[str, Any] = {"argv": sys.argv, "nproc": os.cpu_count(), "modes": {}}
    with connect(
        opts.socket, opts.daemon_pid, None, "10.89.0.0/16", launcher=launcher(opts.profile)
    ) as target:
        stub = Stub(target.channel)
        version = stub.Version(api_pb2.VersionRequest())
        report["runtime"] = f"{version.runtime_name} {version.runtime_version}"
        modes = {"host": [True], "netns": [False], "both": [True, False], "none": []}[opts.mode]
        for host_network in modes:
            name = "host network" if host_network else "pod network (bridge, veth, IP)"
            for n in range(20):  # warm-up: imports, thread pools, page cache
                lifecycle(stub, pod_config(host_network, f"warm{secrets.token_hex(2)}", n), {})
            report["modes"][name] = {
                "sequential": sequential(stub, host_network, opts.pods),
                "concurrent": concurrent(stub, host_network, opts.pods, opts.inflight),
                "held": [held(stub, host_network, a, target.pid, opts.inflight) for a in alive],
            }
        if opts.burst and target.pid:
            report["burst"] = burst(target.channel, target.pid, opts.burst, opts.burst_rounds)
    print(f"runtime: {report['runtime']}  cpus: {report['nproc']}")
    print_report(report)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
