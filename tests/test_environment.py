"""Every program the suite and the daemon run comes from scripts/install-system-deps.

A fresh Debian machine has the packages that are on every machine (Essential: yes or
Priority: required) and what `scripts/install-system-deps ROLE` installs, nothing
else: a test that runs a program from anywhere else passes on a developer's machine
and fails on a fresh one. conftest.py records every program the test process
launches; the last test of the session checks each one."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import LAUNCHED

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install-system-deps"
# Where Debian's packages put programs (/usr/local is the operator's own).
SYSTEM_PATH = os.pathsep.join(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
# What the daemon runs and the files it builds with or reads.
DAEMON_NEEDS = (
    "nft",  # shim/network/bridge.py: pyshim's own table
    "crun",  # containers: the default runtime handler
    "runc",  # containers: the other runtime handler
    "conmon",  # containers: the monitor
    "/usr/lib/cni/bridge",  # CNI mode: Debian's plugins
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/loopback",
    "/usr/lib/cni/portmap",
    "gcc",  # setup.py compiles the native programs (the pause, crun's helper) when pyshim is installed
    f"/usr/lib/{sysconfig.get_config_var('MULTIARCH')}/libc.a",  # ... statically (else silently dynamic)
    "/usr/share/containers/seccomp.json",  # containers: the default seccomp profile
)
# The top directories that Debian 12's merged /usr makes links to /usr/...: dpkg may record a
# file under either name.
MERGED = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")

pytestmark = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian system")


@functools.cache
def role_packages(role: str) -> frozenset[str]:
    done = subprocess.run(["bash", str(INSTALL), "--list", role], capture_output=True, text=True, check=True)
    return frozenset(done.stdout.split())


def dpkg_names(path: str) -> list[str]:
    """The names dpkg may know `path` by: as given, through its directory's real path, and
    with or without the /usr prefix of the merged directories."""
    names = {path, os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))}
    for name in list(names):
        for top in MERGED:
            if name.startswith(f"/usr/{top}/"):
                names.add(name.removeprefix("/usr"))
            elif name.startswith(f"/{top}/"):
                names.add("/usr" + name)
    return sorted(names)


def owners(path: str) -> set[str]:
    """The installed packages that ship `path` (dpkg -S), under any of its names."""
    done = subprocess.run(
        ["dpkg-query", "-S", *dpkg_names(path)], capture_output=True, text=True, check=False
    )
    found = set()
    for line in done.stdout.splitlines():
        if line.startswith(("diversion by ", "local diversion ")):
            continue
        packages, sep, _ = line.partition(": ")
        if sep:
            found |= {p.strip().split(":")[0] for p in packages.split(",")}
    return found


@functools.cache
def on_every_machine(package: str) -> bool:
    """Essential: yes or Priority: required: Debian installs it everywhere."""
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Essential}|${Priority}\n", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return any(line.startswith("yes|") or line.endswith("|required") for line in done.stdout.splitlines())


def unprovided(program: str, packages: frozenset[str], own_dirs: tuple[Path, ...]) -> str | None:
    """Why `program` (a path as launched, or a bare name that was not found) would be missing
    on a fresh machine where `packages` were installed, or None if it would be there. Programs
    under `own_dirs` (the venv, the checkout, the tests' temp dirs) are made by the build or
    the tests. A symlink no package ships (an alternative) is followed to its target."""
    fix = "add the package that provides it to scripts/install-system-deps"
    if not os.path.isabs(program):
        return f"{program}: not found on PATH; {fix}"
    for candidate in (Path(program), Path(os.path.realpath(program))):
        if any(candidate.is_relative_to(d) or candidate.is_relative_to(d.resolve()) for d in own_dirs):
            return None
    current = program
    for _ in range(40):
        found = owners(current)
        if any(p in packages or on_every_machine(p) for p in found):
            return None
        via = "" if current == program else f" (through {current})"
        if found:
            names = " or ".join(sorted(found))
            return (
                f"{program}{via} comes from {names}: add {names} to scripts/install-system-deps "
                "(it does not install it, and it is not on every Debian machine)"
            )
        if not os.path.islink(current):
            return f"{program}{via} belongs to no Debian package; {fix}, or make it in the test"
        current = os.path.normpath(os.path.join(os.path.dirname(current), os.readlink(current)))
    return f"{program}: too many symbolic links"


def test_roles_are_split() -> None:
    daemon, test = role_packages("daemon"), role_packages("test")
    assert daemon < test
    # A production node must never get these from pyshim (docker-registry serves port 5000 on
    # every interface as soon as Debian installs it).
    assert {"docker-registry", "skopeo", "openssl", "busybox-static"} <= test - daemon


def test_launches_are_recorded(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The recording the session check relies on sees subprocess and posix_spawn launches,
    by the path the program was found at."""
    true = shutil.which("true")
    assert true is not None
    subprocess.run(["true"], check=True)
    assert request.node.nodeid in LAUNCHED.get(true, set())
    made = tmp_path / "made-here"
    made.symlink_to(true)
    assert os.waitpid(os.posix_spawn(made, [str(made)], {}), 0)[1] == 0
    assert LAUNCHED.get(str(made)) == {request.node.nodeid}


def test_the_check_names_what_the_install_does_not_provide(tmp_path: Path) -> None:
    daemon = role_packages("daemon")
    skopeo = shutil.which("skopeo", path=SYSTEM_PATH)
    assert skopeo is not None
    # A test-only program is not there after the daemon's install.
    reason = unprovided(skopeo, daemon, ())
    assert reason is not None and "add skopeo to scripts/install-system-deps" in reason
    assert unprovided(skopeo, role_packages("test"), ()) is None
    # A program of a package that is only a dependency of a listed one (gcc-12 for gcc).
    gcc = os.path.realpath(shutil.which("gcc", path=SYSTEM_PATH) or "gcc")
    reason = unprovided(gcc, daemon, ())
    assert reason is not None and "comes from gcc-" in reason
    # A program no package ships, unless the tests made it.
    made = tmp_path / "tool"
    made.write_text("#!/bin/sh\n")
    made.chmod(0o755)
    reason = unprovided(str(made), daemon, ())
    assert reason is not None and "belongs to no Debian package" in reason
    assert unprovided(str(made), daemon, (tmp_path,)) is None
    assert "not found on PATH" in (unprovided("no-such-program-here", daemon, ()) or "")
    # On every machine, whatever the list; under either name of the merged /usr.
    assert unprovided("/bin/sh", frozenset(), ()) is None
    assert unprovided("/usr/bin/sh", frozenset(), ()) is None


def test_the_daemon_install_provides_what_the_daemon_runs() -> None:
    packages = role_packages("daemon")
    problems = []
    for need in DAEMON_NEEDS:
        path = need if need.startswith("/") else shutil.which(need, path=SYSTEM_PATH)
        if path is None or not os.path.exists(path):
            problems.append(
                f"{need}: missing; add the package that provides it to scripts/install-system-deps"
            )
        elif reason := unprovided(path, packages, ()):
            problems.append(reason)
    assert not problems, "the daemon's install (scripts/install-system-deps daemon) lacks:\n" + "\n".join(
        problems
    )


@pytest.mark.last
def test_every_program_the_suite_ran_comes_from_the_test_install(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Runs after every other test (conftest.py orders it last): what the session launched."""
    own_dirs = (Path(sys.prefix), ROOT, tmp_path_factory.getbasetemp())
    packages = role_packages("test")
    problems = []
    for program, tests in sorted(dict(LAUNCHED).items()):
        reason = unprovided(program, packages, own_dirs)
        if reason is not None:
            ran_by = ", ".join(sorted(tests)[:3]) + (", ..." if len(tests) > 3 else "")
            problems.append(f"{reason} (run by {ran_by})")
    assert not problems, "programs the tests ran that a fresh machine lacks:\n" + "\n".join(problems)
