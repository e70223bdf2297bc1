"""The start-up sweep of containers: what a Create the daemon died in left behind.

A bundle dir (the intent marker of a Create) or a root filesystem without a record
is undone by what it names: its conmon (found by argv), the runtimes' state of its
id, its cgroups (config.json names them), its overlay, conmon's attach link, the
dir itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from shim.containers.conmon import forget, monitors_of
from shim.containers.runtime import Runtime
from shim.errors import ShimError
from shim.images.layers import LayerStore
from shim.store import is_id

log = logging.getLogger(__name__)


def unrecorded(
    bundles: Path,
    attach_dir: Path,
    recorded: set[str],
    runtimes: list[Runtime],
    layers: LayerStore,
    remove_cgroups: Callable[[str], None],
) -> None:
    for bundle in bundles.iterdir():
        if is_id(bundle.name) and bundle.name not in recorded:
            _sweep(bundle, runtimes, layers, remove_cgroups)
    for rootfs in layers.mounts_dir.iterdir():
        if is_id(rootfs.name) and rootfs.name not in recorded:
            with contextlib.suppress(ShimError):
                layers.release(rootfs.name)
    for link in attach_dir.iterdir():
        if is_id(link.name) and link.name not in recorded:
            forget(attach_dir, link.name)


def _sweep(
    bundle: Path, runtimes: list[Runtime], layers: LayerStore, remove_cgroups: Callable[[str], None]
) -> None:
    container_id = bundle.name
    for pid in monitors_of(container_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for runtime in runtimes:
        with contextlib.suppress(ShimError):
            runtime.delete(container_id)
    try:
        cgroup = str(json.loads((bundle / "config.json").read_bytes())["linux"]["cgroupsPath"])
    except (OSError, ValueError, KeyError, TypeError):
        cgroup = ""
    if cgroup:
        with contextlib.suppress(ShimError):
            remove_cgroups(cgroup)
    with contextlib.suppress(ShimError):
        layers.release(container_id)
    shutil.rmtree(bundle, ignore_errors=True)
    log.warning("event=swept_half_made container=%s", container_id)
