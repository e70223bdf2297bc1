"""Keeping the daemon's memory near its baseline after bursts of large requests.

glibc keeps what it frees: by default a large buffer raises the mmap threshold,
so the next ones come from the heap and stay there, and every request thread
may get an arena of its own. Measured here: 64 parallel 4 MiB requests left
~180 MiB resident for good. A fixed mmap threshold returns large buffers to the
kernel when they are freed, two arenas bound the fragmentation, and a trim after
large requests hands back what the heap still holds.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024
ARENA_MAX = 2
# A request at least this large schedules a trim.
LARGE_REQUEST = 256 * 1024
# Trims are batched: a burst costs one, shortly after it ends.
_TRIM_DELAY = 0.5
# Without large decoded requests, a trim when resident memory grew this much since the last one.
_CHECK_INTERVAL = 5.0
_GROWTH = 8 * 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(None, use_errno=True)
_pending = threading.Event()


def tune_allocator() -> None:
    """Call once at start, before the request threads exist."""
    if not hasattr(_libc, "mallopt"):  # not glibc: nothing to tune
        return
    for option, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_ARENA_MAX, ARENA_MAX)):
        if _libc.mallopt(option, value) != 1:
            log.warning("event=mallopt_failed option=%d", option)
    threading.Thread(target=_trimmer, name="malloc-trim", daemon=True).start()


def note_request(size: int) -> None:
    """Called with the size of each request as it is decoded."""
    if size >= LARGE_REQUEST:
        _pending.set()


def _trimmer() -> None:
    baseline = _rss()
    again = False  # a second pass after a burst: replies still in flight free memory late
    while True:
        if _pending.wait(_CHECK_INTERVAL):
            # Wait for the burst to end: requests still arriving set the flag again.
            while _pending.wait(_TRIM_DELAY):
                _pending.clear()
                threading.Event().wait(_TRIM_DELAY)
            again = True
        elif again:
            again = False
        elif _rss() - baseline < _GROWTH:
            # Requests the transport refused (too large) are never decoded, so they never
            # set the flag: growth since the last trim is what tells of them.
            continue
        _libc.malloc_trim(0)
        baseline = _rss()


def _rss() -> int:
    """Resident bytes of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE
