"""Single-use, short-lived tokens for streaming requests.

An Exec, Attach or PortForward call stores what it was asked for under a fresh
token and answers with a URL that names the token. The first connection that
presents the token takes the request; a used, unknown or expired token finds
nothing. The token is the only credential: 32 random bytes, so it cannot be
guessed, and the URL is only ever given to the CRI client (kubelet, crictl).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from shim.errors import ResourceExhausted

# As kubelet's streaming server: a client has a minute to connect.
TTL = 60.0
# Tokens waiting for their connection; beyond this a caller floods us, not kubelet.
MAX_PENDING = 1000

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Pending(Generic[T]):
    request: T
    expires: float


class RequestCache(Generic[T]):
    def __init__(self, ttl: float = TTL, max_pending: int = MAX_PENDING) -> None:
        self._ttl = ttl
        self._max = max_pending
        self._lock = threading.Lock()
        # Insertion order is expiry order (one TTL for all): expired ones are at the front.
        self._pending: OrderedDict[str, _Pending[T]] = OrderedDict()

    def insert(self, request: T) -> str:
        now = time.monotonic()
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._expire(now)
            if len(self._pending) >= self._max:
                raise ResourceExhausted(
                    f"{self._max} streaming requests are waiting for their clients to connect; "
                    "try again when some have connected or expired"
                )
            self._pending[token] = _Pending(request, now + self._ttl)
        return token

    def consume(self, token: str) -> T | None:
        """The request stored under `token`, once; None if unknown, used or expired."""
        with self._lock:
            self._expire(time.monotonic())
            pending = self._pending.pop(token, None)
        return pending.request if pending is not None else None

    def __len__(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._pending)

    def _expire(self, now: float) -> None:
        while self._pending:
            token, first = next(iter(self._pending.items()))
            if first.expires > now:
                return
            del self._pending[token]
