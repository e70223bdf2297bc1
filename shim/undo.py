"""Undo steps of a half-made object, run newest first.

Each step is registered right after what it undoes was made (or just before,
when making it can fail halfway). Every step runs even if an earlier one failed;
a failure is logged and makes run() return False, so that the caller can keep
what is left known instead of forgetting it. `--fail-at undo:NAME` makes the
step NAME fail, for the tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from shim.errors import InjectedFailure

log = logging.getLogger(__name__)


def inject(fail_at: tuple[str, ...], step: str) -> None:
    """Failure injection for tests: STEP raises, crash:STEP kills the daemon outright."""
    if step in fail_at:
        raise InjectedFailure(f"failure injected at step {step!r} (--fail-at)")
    if f"crash:{step}" in fail_at:
        log.error("event=injected_crash step=%s", step)
        os._exit(70)


class Undo:
    def __init__(self, subject: str, fail_at: tuple[str, ...]) -> None:
        self.subject = subject  # "sandbox=<id>" or "container=<id>", for the log
        self.fail_at = fail_at
        self._steps: list[tuple[str, Callable[..., object], tuple[object, ...]]] = []

    def add(self, name: str, step: Callable[..., object], *args: object) -> None:
        self._steps.append((name, step, args))

    def run(self) -> bool:
        clean = True
        for name, step, args in reversed(self._steps):
            try:
                inject(self.fail_at, f"undo:{name}")
                step(*args)
            except Exception:
                log.exception("event=undo_failed %s step=%s", self.subject, name)
                clean = False
        return clean
