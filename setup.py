"""Builds the native programs when the package is built or installed.

``shim/pause/pause.c`` becomes ``pyshim-pause`` (the process that holds a pod's
namespaces) and ``shim/containers/crun_hybrid.c`` becomes ``pyshim-crun-hybrid``
(crun's create on a hybrid cgroup host), each inside its installed package (and,
for an editable install, next to the source). They are never committed as binaries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

VERSION = tomllib.loads(Path("pyproject.toml").read_text())["project"]["version"]
# (source, program name): each program is built next to its source's package.
PROGRAMS = (
    (Path("shim") / "pause" / "pause.c", "pyshim-pause"),
    (Path("shim") / "containers" / "crun_hybrid.c", "pyshim-crun-hybrid"),
)


def compile_program(source: Path, dest: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit(f"pyshim: a C compiler (gcc) is needed to build {dest.name}")
    base = [cc, "-Os", "-Wall", "-Wextra", "-Werror", f'-DPAUSE_VERSION="{VERSION}"']
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    # Static when libc.a is there (tiny shared footprint per pod); dynamic otherwise.
    for extra in (["-static", "-s"], ["-s"]):
        done = subprocess.run([*base, *extra, "-o", str(tmp), str(source)], check=False)
        if done.returncode == 0:
            tmp.chmod(0o755)
            tmp.replace(dest)
            return
    raise SystemExit(f"pyshim: compiling {source} failed")


class BuildWithPrograms(build_py):
    def run(self) -> None:
        super().run()
        for source, name in PROGRAMS:
            if self.editable_mode:
                compile_program(source, source.with_name(name))
            else:
                compile_program(source, Path(self.build_lib) / source.parent / name)


setup(cmdclass={"build_py": BuildWithPrograms})
