"""Unit tests of pure modules: no daemon, no root, no network, no processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def leak_check() -> Iterator[None]:
    """Overrides the suite's leak check: nothing here makes pods, mounts or veths."""
    yield
