"""A container's command line, environment and working directory: the CRI config
merged with the image config the way Kubernetes defines it (and containerd does it)."""

from __future__ import annotations

import os
import posixpath

from shim._proto import api_pb2
from shim.errors import FailedPrecondition, InvalidArgument
from shim.images.store import ImageConfig

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def args(config: api_pb2.ContainerConfig, image: ImageConfig) -> list[str]:
    """command replaces the image's Entrypoint and args replace its Cmd: a command
    without args runs alone (the image's Cmd is dropped); args alone run after the
    Entrypoint; neither gives Entrypoint + Cmd. An Entrypoint of [""] means none, as in
    Docker. InvalidArgument when nothing at all is left to run."""
    command, arguments = list(config.command), list(config.args)
    if not command:
        if not arguments:
            arguments = list(image.cmd)
        if image.entrypoint != ("",):
            command = list(image.entrypoint)
    argv = command + arguments
    if not argv:
        raise InvalidArgument("no command to run: the container config and the image give none")
    if any("\0" in a for a in argv):
        raise FailedPrecondition("the image's Entrypoint or Cmd holds a NUL character")
    return argv


def env(config: api_pb2.ContainerConfig, image: ImageConfig, hostname: str) -> list[str]:
    """A default PATH, replaced by the image's own; the image's variables; HOSTNAME (the
    pod's, or the node's for a pod on the host network), then the container's, each
    replacing a variable of the same name in place. An image entry without "=" unsets
    the variable (Docker's rule)."""
    merged: dict[str, str] = {}
    _merge(merged, [DEFAULT_PATH])
    _merge(merged, list(image.env))
    _merge(merged, [f"HOSTNAME={hostname or os.uname().nodename}"])
    # Values arrive as bytes; validation checked that they are UTF-8 without NUL.
    _merge(merged, [f"{kv.key}={kv.value.decode()}" for kv in config.envs])
    if any("\0" in entry for entry in merged.values()):
        raise FailedPrecondition("the image's Env holds a NUL character")
    return list(merged.values())


def _merge(merged: dict[str, str], entries: list[str]) -> None:
    for entry in entries:
        key, sep, _ = entry.partition("=")
        if not key:
            continue
        if sep:
            merged[key] = entry  # an existing key keeps its place: dicts keep insertion order
        else:
            merged.pop(key, None)


def cwd(config: api_pb2.ContainerConfig, image: ImageConfig) -> str:
    """working_dir, else the image's WorkingDir (made absolute: Docker allowed relative
    ones), else "/"; normalized so that it can be made inside the rootfs."""
    chosen = config.working_dir or image.working_dir or "/"
    if "\0" in chosen:
        raise FailedPrecondition("the image's WorkingDir holds a NUL character")
    return posixpath.normpath("/" + chosen.lstrip("/"))
