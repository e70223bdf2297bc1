"""pyshim: a small CRI (runtime.v1) container runtime for Kubernetes nodes."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pyshim")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
