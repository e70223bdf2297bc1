#!/usr/bin/env python3
"""Run `pyshim serve` with timers around the steps of the pod and container lifecycle,
to see where the time of a call goes. Nothing in shim/ changes: the steps are wrapped
from outside before the server is built, and the durations are written as JSON when
the daemon stops.

    python bench/daemon_profile.py OUT.json serve --socket ... (pyshim serve's flags)
    python bench/containers.py --profile OUT.json ...       # does this for its private daemon
    python bench/daemon_profile.py --summary OUT.json       # calls, p50 and total per step

Steps are named by where they live ("ContainerManager.create", "runtime runc start",
"os.fsync", "rpc RunPodSandbox"); a name the code no longer has is reported and skipped.
Timers nest: a step's time includes the steps it calls. With calls in flight at once the
times include waiting for the CPU and for locks, so profile sequential runs.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (module, attribute path) of every step timed; a method is "Class.method".
STEPS = (
    ("shim.server", "RuntimeService.RunPodSandbox"),
    ("shim.server", "RuntimeService.CreateContainer"),
    ("shim.server", "RuntimeService.StartContainer"),
    ("shim.server", "RuntimeService.ContainerStatus"),
    ("shim.server", "RuntimeService.StopContainer"),
    ("shim.server", "RuntimeService.RemoveContainer"),
    ("shim.server", "RuntimeService.StopPodSandbox"),
    ("shim.server", "RuntimeService.RemovePodSandbox"),
    ("shim.sandbox", "SandboxManager._create"),
    ("shim.sandbox", "SandboxManager._make_cgroup"),
    ("shim.sandbox", "SandboxManager._pin_all"),
    ("shim.sandbox", "SandboxManager._mount_shm"),
    ("shim.sandbox", "SandboxManager._setup_network"),
    ("shim.sandbox", "SandboxManager._stop_locked"),
    ("shim.sandbox", "SandboxManager.remove_pod_cgroups"),
    ("shim.sandbox", "spawn"),
    ("shim.sandbox", "write_pod_files"),
    ("shim.sandbox", "remove_when_empty"),
    ("shim.procs", "TrackedProcess.terminate"),
    ("shim.containers.lifecycle", "ContainerManager._create"),
    ("shim.containers.lifecycle", "ContainerManager._spec"),
    ("shim.containers.lifecycle", "ContainerManager.start"),
    ("shim.containers.lifecycle", "ContainerManager.stop"),
    ("shim.containers.lifecycle", "ContainerManager._signal"),
    ("shim.containers.lifecycle", "ContainerManager._on_monitor_exit"),
    ("shim.containers.lifecycle", "ContainerManager._update"),
    ("shim.containers.lifecycle", "ContainerManager.remove"),
    ("shim.containers.lifecycle", "ContainerManager._teardown"),
    ("shim.containers.lifecycle", "ContainerManager._remove_cgroups"),
    ("shim.containers.lifecycle", "container_mounts.prepare_host"),
    ("shim.containers.conmon", "Conmon.launch"),
    ("shim.containers.conmon", "_read_line"),
    ("shim.containers.conmon", "identify"),
    ("shim.procs", "TrackedProcess.kill_and_reap"),
    ("shim.images.layers", "LayerStore.prepare"),
    ("shim.images.layers", "LayerStore.release"),
    ("shim.images.layers", "LayerStore.remove_unused"),
    ("shim.images", "Images.live_layers"),
    ("shim.cgroups", "Cgroups.make"),
    ("shim.cgroups", "Cgroups._make_in"),
    ("shim.cgroups", "Cgroups.remove"),
    ("shim.cgroups", "Cgroups.remove_dirs"),
    ("shim.store", "RecordStore.save"),
    ("shim.store", "RecordStore.delete"),
    ("shim.mounts", "mount"),
    ("shim.mounts", "umount"),
    ("shim.namespaces", "unpin"),
    ("shim.network.select", "NetworkSelector.setup"),
    ("shim.network.select", "NetworkSelector.teardown"),
)

_samples: dict[str, list[float]] = {}
_lock = threading.Lock()


def _record(name: str, ms: float) -> None:
    with _lock:
        _samples.setdefault(name, []).append(ms)


def timer(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _record(name, (time.perf_counter() - start) * 1000)

    return timed


def named_timer(function: Callable[..., Any], name: Callable[..., str]) -> Callable[..., Any]:
    """A timer whose step is named from the call's arguments."""

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _record(name(*args, **kwargs), (time.perf_counter() - start) * 1000)

    return timed


def _joiner(path: str) -> str:
    """Who joins a cgroup through Cgroups.join: a conmon (pyshim-conmon-<id>) or a pause."""
    return "conmon" if path.rsplit("/", 1)[-1].startswith("pyshim-conmon-") else "pause"


# Steps named by what they act on: the runtime's command, the cgroup file, the process joining.
NAMED: tuple[tuple[str, str, Callable[..., str]], ...] = (
    (
        "shim.containers.runtime",
        "Runtime._run",
        lambda self, args, *_, **__: f"runtime {self.kind} {args[0]}",
    ),
    (
        "shim.cgroups",
        "_write",
        lambda file, value: f"cgroup write {'/'.join(file.split('/')[4:5])}/{file.rsplit('/', 1)[-1]}",
    ),
    ("shim.cgroups", "Cgroups.join", lambda self, path, pid: f"Cgroups.join ({_joiner(path)})"),
)


def _find(module_name: str, path: str) -> tuple[Any, str] | None:
    """(owner, attribute) of module_name's `path` ("Class.method" or "function"), or None
    (with a line on stderr) if the code no longer has it."""
    owner: Any = importlib.import_module(module_name)
    *parents, attribute = path.split(".")
    try:
        for part in parents:
            owner = getattr(owner, part)
        getattr(owner, attribute)
    except AttributeError:
        print(f"daemon_profile: {module_name}.{path} is gone, not timed", file=sys.stderr)
        return None
    return owner, attribute


def install() -> None:
    # os-level calls every module reaches through `os.`: fsync and posix_spawn (pause, conmon).
    for name in ("fsync", "posix_spawn"):
        setattr(os, name, timer(f"os.{name}", getattr(os, name)))
    for module_name, path in STEPS:
        found = _find(module_name, path)
        if found is not None:
            setattr(found[0], found[1], timer(path, getattr(*found)))
    for module_name, path, namer in NAMED:
        found = _find(module_name, path)
        if found is not None:
            setattr(found[0], found[1], named_timer(getattr(*found), namer))


def summarise(path: Path) -> None:
    samples: dict[str, list[float]] = json.loads(path.read_text())
    print(f"{'step':<44} {'calls':>6} {'p50 ms':>8} {'p95 ms':>8} {'total ms':>9}")
    for name, values in sorted(samples.items(), key=lambda item: -sum(item[1])):
        ordered = sorted(values)
        p50, p95 = (ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] for q in (0.5, 0.95))
        print(f"{name:<44} {len(values):>6} {p50:>8.2f} {p95:>8.2f} {sum(values):>9.0f}")


def main() -> int:
    if sys.argv[1] == "--summary":
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly
        summarise(Path(sys.argv[2]))
        return 0
    out = Path(sys.argv[1])
    install()
    atexit.register(lambda: out.write_text(json.dumps(_samples)))
    from shim.cli import main as shim_main

    return int(shim_main(sys.argv[2:]))


if __name__ == "__main__":
    sys.exit(main())
