"""Builds the native pause program when the package is built or installed.

The pause is compiled from ``shim/pause/pause.c`` into an executable named
``pyshim-pause`` inside the installed ``shim.pause`` package (and, for an
editable install, next to the source). It is never committed as a binary.
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
SOURCE = Path("shim") / "pause" / "pause.c"


def compile_pause(dest: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("pyshim: a C compiler (gcc) is needed to build pyshim-pause")
    base = [cc, "-Os", "-Wall", "-Wextra", "-Werror", f'-DPAUSE_VERSION="{VERSION}"']
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    # Static when libc.a is there (tiny shared footprint per pod); dynamic otherwise.
    for extra in (["-static", "-s"], ["-s"]):
        done = subprocess.run([*base, *extra, "-o", str(tmp), str(SOURCE)], check=False)
        if done.returncode == 0:
            tmp.chmod(0o755)
            tmp.replace(dest)
            return
    raise SystemExit("pyshim: compiling shim/pause/pause.c failed")


class BuildWithPause(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            compile_pause(SOURCE.with_name("pyshim-pause"))
        else:
            compile_pause(Path(self.build_lib) / "shim" / "pause" / "pyshim-pause")


setup(cmdclass={"build_py": BuildWithPause})
