"""cgroups a test made, for fixtures and leak checks.

Test cgroups live under a prefix of their own (`/pyshim-test-<random>`): the machine's
cgroups are shared with other suites running at the same time. A leak check lists what is
under the prefix (or under a daemon's cgroup parent) before and after:

    before = cgroups_under("/kubepods")
    yield
    assert cgroups_under("/kubepods") == before, "cgroups left behind"
"""

from __future__ import annotations

import errno
import os
import time

from shim.cgroups import Cgroups, check_path


def cgroups_under(prefix: str, cgroups: Cgroups | None = None) -> list[str]:
    """Every cgroup directory at or below `prefix` in every hierarchy (filesystem paths,
    parents first). Empty when none is left."""
    check_path(prefix)
    found: list[str] = []
    for h in (cgroups or Cgroups()).hierarchies:
        top = h.mountpoint + prefix
        if os.path.isdir(top):
            found += [d for d, _, _ in os.walk(top)]
    return found


def remove_cgroups_under(prefix: str, cgroups: Cgroups | None = None) -> list[str]:
    """Remove every cgroup at or below `prefix`, deepest first, and return what was there.
    A process still inside (the test should have ended it) is moved to its hierarchy's
    root rather than killed, so that cleanup never kills what it does not know."""
    cgroups = cgroups or Cgroups()
    left = cgroups_under(prefix, cgroups)
    for d in reversed(left):
        root = next(h.mountpoint for h in cgroups.hierarchies if d.startswith(h.mountpoint + "/"))
        for _ in range(100):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
            try:
                with open(f"{d}/cgroup.procs") as f:
                    pids = f.read().split()
            except FileNotFoundError:
                pids = []
            for pid in pids:
                try:
                    with open(f"{root}/cgroup.procs", "w") as f:
                        f.write(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
    return left
