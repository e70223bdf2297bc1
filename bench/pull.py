#!/usr/bin/env python3
"""Image pull benchmark: pyshim's PullImage against `skopeo copy`, from a local
registry (Debian's docker-registry on 127.0.0.1), for a ~50 MB image of 6 layers.

    python bench/pull.py [--runs 5]

Cold: an empty store each run (pyshim: a fresh daemon root; skopeo: a fresh dir).
Warm: the image is already there (pyshim checks the manifest and finds every blob).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from imagetools import layer_tar, oci_layout, push, start_registry

from shim._proto import api_pb2, api_pb2_grpc

LAYER_MB = (12, 12, 10, 8, 6, 2)  # ~50 MB, incompressible


def build_image(base: Path) -> Path:
    layout = base / "layout"
    layers = [layer_tar({f"data/{i}.bin": os.urandom(mb * 1024 * 1024)}) for i, mb in enumerate(LAYER_MB)]
    oci_layout(layout, "bench", layers)
    return layout


def start_daemon(root: Path) -> tuple[subprocess.Popen[bytes], grpc.Channel]:
    sock = root / "s.sock"
    argv = [
        sys.executable,
        "-m",
        "shim",
        "serve",
        "--socket",
        str(sock),
        "--root",
        str(root / "root"),
        "--run-root",
        str(root / "run"),
        "--netns-dir",
        str(root / "netns"),
        "--bridge-name",
        "pspull0",
        "--nft-table",
        "pyshim_pull",
        "--pod-subnet",
        "10.94.0.0/24",
        "--no-ip-forward",
        "--cni-conf-dir",
        str(root / "nocni"),
        "--registry-config-dir",
        str(root / "certs.d"),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    while not sock.exists():
        time.sleep(0.02)
    channel = grpc.insecure_channel(f"unix://{sock}")
    grpc.channel_ready_future(channel).result(timeout=30)
    return proc, channel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    opts = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="pyshim-pull-bench-"))
    registry = start_registry(base / "registry")
    try:
        push(build_image(base), "bench", registry, "bench/big")
        ref = f"{registry.host}/bench/big:bench"
        cold, warm, skopeo = [], [], []
        for run in range(opts.runs):
            root = base / f"daemon{run}"
            root.mkdir()
            proc, channel = start_daemon(root)
            stub = api_pb2_grpc.ImageServiceStub(channel)
            request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref))
            start = time.perf_counter()
            stub.PullImage(request, timeout=300)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            stub.PullImage(request, timeout=300)
            warm.append(time.perf_counter() - start)
            channel.close()
            proc.terminate()
            proc.wait()
            shutil.rmtree(root, ignore_errors=True)
            dest = base / f"skopeo{run}"
            start = time.perf_counter()
            subprocess.run(
                ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"dir:{dest}"],
                check=True,
            )
            skopeo.append(time.perf_counter() - start)
            shutil.rmtree(dest, ignore_errors=True)
        mb = sum(LAYER_MB)
        print(f"image: {mb} MB in {len(LAYER_MB)} layers, {opts.runs} runs, medians")
        print(f"pyshim PullImage cold  {statistics.median(cold) * 1000:8.1f} ms")
        print(f"pyshim PullImage warm  {statistics.median(warm) * 1000:8.1f} ms")
        print(f"skopeo copy cold       {statistics.median(skopeo) * 1000:8.1f} ms")
        print(f"cold ratio pyshim/skopeo {statistics.median(cold) / statistics.median(skopeo):.2f}")
    finally:
        registry.stop()
        subprocess.run(["ip", "link", "del", "pspull0"], capture_output=True, check=False)
        subprocess.run(["nft", "delete", "table", "ip", "pyshim_pull"], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
