"""The OCI runtimes (runc, crun) as command-line programs, one per runtime handler.

Each runtime keeps its state under a root dir of pyshim's own, so that other
engines' containers on the node are never seen or touched. `create` is run by
conmon (shim.containers.conmon); everything else is run from here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.errors import FailedPrecondition, Internal, InvalidArgument

log = logging.getLogger(__name__)

RUNTIME_TIMEOUT = 60.0
_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

# crun refuses a hybrid cgroup layout ("cgroups in hybrid mode not supported"); only
# its `create` needs to run without the cgroup2 mount in view (start, kill, exec and
# delete work as they are): the native pyshim-crun-hybrid does that (see its source).
HYBRID_HELPER = "pyshim-crun-hybrid"


class RuntimeFailed(Internal):
    """The OCI runtime failed; the message carries what it said."""


@dataclass(frozen=True, slots=True)
class Runtime:
    handler: str  # the RuntimeClass handler name that selects it ("" is never stored)
    binary: Path
    root: Path  # the runtime's --root: state of pyshim's containers only
    create_program: Path  # what conmon runs for `create`: the binary, or a helper around it
    create_env: tuple[tuple[str, str], ...] = ()  # what that helper needs to know

    @property
    def kind(self) -> str:
        """ "runc" or "crun" (or another OCI runtime's program name)."""
        return self.binary.name

    def argv(self, *args: str) -> list[str]:
        return [str(self.binary), "--root", str(self.root), *args]

    def _run(self, args: list[str], stdin: bytes | None = None, what: str = "") -> str:
        try:
            done = subprocess.run(
                self.argv(*args),
                input=stdin,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=RUNTIME_TIMEOUT,
                env=_ENV,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeFailed(f"{self.kind} {args[0]} timed out after {RUNTIME_TIMEOUT:.0f}s") from None
        if done.returncode != 0:
            raise RuntimeFailed(f"{self.kind} {what or args[0]}: {_message(done.stderr or done.stdout)}")
        return done.stdout.decode(errors="replace")

    def start(self, container_id: str) -> None:
        self._run(["start", container_id])

    def kill(self, container_id: str, signal: int, every_process: bool = False) -> None:
        args = ["kill", *(["--all"] if every_process else []), container_id, str(signal)]
        self._run(args)

    def delete(self, container_id: str) -> None:
        """Force-delete; a container the runtime does not know is done already."""
        try:
            self._run(["delete", "--force", container_id])
        except RuntimeFailed as exc:
            if "not exist" in str(exc) or "not found" in str(exc) or "No such file" in str(exc):
                return
            raise

    def state(self, container_id: str) -> dict[str, Any] | None:
        """The runtime's view ("status": created|running|stopped|paused), or None if unknown."""
        try:
            out = self._run(["state", container_id])
        except RuntimeFailed:
            return None
        try:
            state = json.loads(out)
        except ValueError:
            return None
        return state if isinstance(state, dict) else None

    def update(self, container_id: str, resources: dict[str, Any]) -> None:
        payload = json.dumps(resources).encode()
        try:
            self._run(["update", "--resources", "-", container_id], stdin=payload, what="update")
        except RuntimeFailed as exc:
            raise FailedPrecondition(f"updating the resources of {container_id}: {exc}") from None


def _message(output: bytes) -> str:
    """The runtime's error, without its log framing (runc logs JSON-ish lines)."""
    text = output.decode(errors="replace").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "failed with no message"
    if last.startswith("{"):
        with contextlib.suppress(ValueError, AttributeError):
            last = str(json.loads(last).get("msg", last))
    elif 'msg="' in last:
        last = last.split('msg="', 1)[1].rsplit('"', 1)[0]
    return last[:500]


def _hybrid_helper() -> Path:
    helper = Path(__file__).with_name(HYBRID_HELPER)
    if not os.access(helper, os.X_OK):
        raise FailedPrecondition(f"{helper} is missing: reinstall pyshim (pip builds it)")
    return helper


def load(handlers: tuple[tuple[str, str], ...], state_root: Path, hybrid_cgroups: bool) -> dict[str, Runtime]:
    """Runtimes by handler name from ("name", "path or program") pairs; the first
    is the default (also under the name ""). A program that is not installed is refused."""
    runtimes: dict[str, Runtime] = {}
    for name, program in handlers:
        found = shutil.which(program, path=_ENV["PATH"]) if "/" not in program else program
        if found is None or not os.access(found, os.X_OK):
            raise InvalidArgument(f"runtime handler {name!r}: {program!r} is not an installed program")
        binary = Path(found).resolve()
        root = state_root / name
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        create = binary
        env: tuple[tuple[str, str], ...] = ()
        if hybrid_cgroups and binary.name == "crun":
            create, env = _hybrid_helper(), (("PYSHIM_RUNTIME", str(binary)),)
        runtimes[name] = Runtime(
            handler=name, binary=binary, root=root, create_program=create, create_env=env
        )
    runtimes[""] = runtimes[handlers[0][0]]
    return runtimes


@functools.cache
def program_version(program: Path) -> str:
    """The first line of `PROGRAM --version` (for verbose status); "" if it says nothing."""
    try:
        done = subprocess.run(
            [str(program), "--version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10, env=_ENV
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.decode(errors="replace").partition("\n")[0].strip()
