"""Benchmark of commands and ports in a running pod: ExecSync, a streaming exec
(Exec call, connect, run `true`, exit code back) over SPDY and over WebSocket, and
port forwarding over SPDY (throughput both ways through one connection, and new
connections per second).

    python bench/streaming.py [--handler crun] [--execs 200] [--megabytes 256]

Spawns a private pyshim (see bench/harness.py) unless --socket names a running
daemon. The port-forward target is a small TCP server the benchmark runs inside the
pod's network namespace. Figures are medians over the samples.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import streamclient
from busybox import IMAGE
from containers import ensure_image
from harness import Stub, connect, pod_config, summary, timed

from shim._proto import api_pb2

TIMEOUT = 60
PORT = 7100
# Inside the pod: "up" reads to EOF and answers the byte count; "down N" sends N
# bytes; "ping" answers "pong". One line of command first, then the data.
SERVER = """
import socket, sys, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(256)
print("ready", flush=True)
def serve(conn):
    with conn:
        f = conn.makefile("rb")
        words = f.readline().split()
        if words[0] == b"up":
            total = 0
            while data := f.read1(1 << 20):
                total += len(data)
            conn.sendall(str(total).encode())
        elif words[0] == b"down":
            left, chunk = int(words[1]), b"x" * (1 << 20)
            while left > 0:
                conn.sendall(chunk[:left])
                left -= min(left, len(chunk))
        else:
            conn.sendall(b"pong")
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def run_container(stub: Stub, handler: str, logs: Path) -> tuple[str, str]:
    config = pod_config(False, "stream", 0)
    config.log_directory = str(logs)
    sandbox = stub.RunPodSandbox(
        api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler), timeout=TIMEOUT
    ).pod_sandbox_id
    container = stub.CreateContainer(
        api_pb2.CreateContainerRequest(
            pod_sandbox_id=sandbox,
            sandbox_config=config,
            config=api_pb2.ContainerConfig(
                metadata=api_pb2.ContainerMetadata(name="sleep"),
                image=api_pb2.ImageSpec(image=IMAGE),
                command=["sleep", "3600"],
                log_path="sleep.log",
            ),
        ),
        timeout=TIMEOUT,
    ).container_id
    stub.StartContainer(api_pb2.StartContainerRequest(container_id=container), timeout=TIMEOUT)
    return sandbox, container


def execs(stub: Stub, container: str, n: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    sync = api_pb2.ExecSyncRequest(container_id=container, cmd=["true"], timeout=10)
    streaming = api_pb2.ExecRequest(container_id=container, cmd=["true"], stdout=True, stderr=True)
    for _ in range(5):  # warm-up
        stub.ExecSync(sync, timeout=TIMEOUT)
        streamclient.spdy_exec(stub.Exec(streaming, timeout=TIMEOUT).url)
    for _ in range(n):
        timed(samples, "ExecSync true", lambda: stub.ExecSync(sync, timeout=TIMEOUT))
        timed(samples, "Exec+SPDY true", lambda: _check(streamclient.spdy_exec(stub.Exec(streaming).url)))
        timed(samples, "Exec+WebSocket true", lambda: _check(streamclient.ws_exec(stub.Exec(streaming).url)))
    return summary(samples)


def _check(result: streamclient.Result) -> None:
    if result.exit_code != 0:
        raise SystemExit(f"exec failed: {result}")


def forwarding(stub: Stub, sandbox: str, megabytes: int, connections: int) -> dict[str, Any]:
    info = json.loads(
        stub.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox, verbose=True), timeout=TIMEOUT
        ).info["info"]
    )
    server = subprocess.Popen(
        ["nsenter", f"--net={info['namespaces']['net']}", sys.executable, "-c", SERVER, str(PORT)],
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        url = stub.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=sandbox), timeout=TIMEOUT).url
        client = streamclient.spdy_connect(url, ["portforward.k8s.io"], method="POST")
        try:
            return _forwarding(client, megabytes, connections)
        finally:
            client.close()
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()


def _forwarding(client: streamclient.SpdyClient, megabytes: int, connections: int) -> dict[str, Any]:
    size = megabytes << 20
    payload = b"up\n" + os.urandom(1 << 20) * megabytes
    began = time.perf_counter()
    data, error = streamclient.spdy_forward(client, 1, PORT, payload)
    up = time.perf_counter() - began
    if error or int(data) != size:
        raise SystemExit(f"upload: {data[:80]!r} {error!r}")
    began = time.perf_counter()
    data, error = streamclient.spdy_forward(client, 3, PORT, f"down {size}\n".encode())
    down = time.perf_counter() - began
    if error or len(data) != size:
        raise SystemExit(f"download: got {len(data)} bytes {error!r}")
    ids = iter(range(5, 5 + 2 * connections * 2, 2))

    def ping(_: int) -> None:
        got = streamclient.spdy_forward(client, next(ids), PORT, b"ping\n")
        if got != (b"pong", b""):
            raise SystemExit(f"ping: {got!r}")

    began = time.perf_counter()
    for i in range(connections):
        ping(i)
    sequential = time.perf_counter() - began
    began = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(ping, range(connections)))
    concurrent = time.perf_counter() - began
    return {
        "upload MB/s": size / up / 1e6,
        "download MB/s": size / down / 1e6,
        "connections/s sequential": connections / sequential,
        "connections/s 8 at once": connections / concurrent,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, help="CRI socket of a running daemon; unset: a private pyshim")
    parser.add_argument(
        "--daemon-root", type=Path, help="that daemon's --root, to import the busybox image into"
    )
    parser.add_argument("--handler", default="", help="runtime handler; unset: the default")
    parser.add_argument("--execs", type=int, default=200, help="samples of each kind of exec")
    parser.add_argument("--megabytes", type=int, default=256, help="size of each forwarded transfer")
    parser.add_argument("--connections", type=int, default=500, help="forwarded connections per phase")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    opts = parser.parse_args()
    report: dict[str, Any] = {"argv": sys.argv, "nproc": os.cpu_count()}
    with connect(opts.socket, None, opts.daemon_root, "10.91.0.0/16") as target:
        stub = Stub(target.channel)
        ensure_image(target.channel, IMAGE, target.root, target.scratch)
        sandbox, container = run_container(stub, opts.handler, target.scratch / "logs")
        report["exec"] = execs(stub, container, opts.execs)
        report["portforward"] = forwarding(stub, sandbox, opts.megabytes, opts.connections)
        stub.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox), timeout=TIMEOUT)
        stub.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox), timeout=TIMEOUT)
    for name, s in report["exec"].items():
        print(f"{name:<22} p50 {s['p50']:7.2f} ms   p95 {s['p95']:7.2f}   p99 {s['p99']:7.2f}")
    for name, value in report["portforward"].items():
        print(f"port forward {name:<26} {value:8.1f}")
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
